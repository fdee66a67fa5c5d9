"""The embedding model: `ModelConfig`, `Encoder`, `EmbeddingModel` and `init_params`."""
from gembed.model.config import ModelConfig
from gembed.model.encoder import EmbeddingModel, Encoder, init_params

__all__ = ["ModelConfig", "Encoder", "EmbeddingModel", "init_params"]
