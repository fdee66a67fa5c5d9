"""BERT-family encoders (BERT, MiniLM, BGE, E5, ...: Hugging Face `model_type: bert`) -> gembed.

Post-norm blocks, learned absolute positions, token-type row 0 added to every token, an embedding
LayerNorm and no final norm. Torch Linear weights [out, in] become Dense kernels [in, out].
"""
from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from gembed.convert.model_config import source_model_config
from gembed.convert.weight_map import WeightMap
from gembed.errors import GembedUserError
from gembed.model import ModelConfig

MODEL_TYPES = ("bert",)
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "relu": "relu", "silu": "silu"}
# Tensors that play no part in the embedding: the [CLS] pooler, MLM/NSP heads, buffers.
IGNORED = r"pooler\..*|cls\..*|embeddings\.position_ids"


def bert_model_config(config: dict[str, Any], pooling: str, where: pathlib.Path) -> ModelConfig:
    """The gembed architecture of a BERT config.json, with the given pooling."""
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise GembedUserError(
            f"{where}: position_embedding_type={config['position_embedding_type']!r} is not "
            f"supported (only 'absolute').")
    activation = config.get("hidden_act", "gelu")
    if activation not in ACTIVATIONS:
        raise GembedUserError(f"{where}: hidden_act={activation!r} is not supported "
                              f"({', '.join(ACTIVATIONS)}).")
    return source_model_config(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
        mlp_dim=config["intermediate_size"], mlp_activation=ACTIVATIONS[activation],
        norm="layernorm", norm_eps=config.get("layer_norm_eps", 1e-12), norm_position="post",
        final_norm=False, position_embedding="learned",
        max_position_embeddings=config["max_position_embeddings"],
        type_vocab_size=config.get("type_vocab_size", 2), embedding_norm=True, use_bias=True,
        attention_mask="bidirectional", pooling=pooling, dtype="float32")


def bert_params(weights: dict[str, np.ndarray], model: ModelConfig, where: pathlib.Path) -> dict:
    """gembed `encoder` params from BERT tensors (with or without the "bert." prefix)."""
    prefix = "bert." if any(name.startswith("bert.") for name in weights) else ""
    source = WeightMap(weights, prefix, where)
    hidden, mlp = model.hidden_size, model.mlp_dim
    encoder = {
        "token_embedding": {"embedding": source.tensor(
            "embeddings.word_embeddings.weight", (model.vocab_size, hidden))},
        "position_embedding": {"embedding": source.tensor(
            "embeddings.position_embeddings.weight", (model.max_position_embeddings, hidden))},
        "token_type_embedding": {"embedding": source.tensor(
            "embeddings.token_type_embeddings.weight", (model.type_vocab_size, hidden))},
        "embedding_norm": source.norm("embeddings.LayerNorm", hidden, bias=True),
    }
    for index in range(model.num_layers):
        layer = f"encoder.layer.{index}."
        encoder[f"layer_{index}"] = {
            "attention": {
                name: source.linear(f"{layer}attention.self.{name}", hidden, hidden, bias=True)
                for name in ("query", "key", "value")
            } | {"output": source.linear(f"{layer}attention.output.dense", hidden, hidden, True)},
            "attention_norm": source.norm(f"{layer}attention.output.LayerNorm", hidden, bias=True),
            "mlp": {"up": source.linear(f"{layer}intermediate.dense", hidden, mlp, bias=True),
                    "down": source.linear(f"{layer}output.dense", mlp, hidden, bias=True)},
            "mlp_norm": source.norm(f"{layer}output.LayerNorm", hidden, bias=True),
        }
    source.check_all_used(IGNORED)
    return encoder
