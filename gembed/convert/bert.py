"""BERT-style encoders: BERT (BERT, MiniLM, BGE, E5, ...: `model_type: bert`) and Megatron-BERT
(`model_type: megatron-bert`), as `Family` tables.

BERT: post-norm blocks, learned absolute positions, a token-type table whose row 0 is added to
every token, an embedding LayerNorm and no final norm. Megatron-BERT is the pre-norm variant: no
embedding norm, a LayerNorm before attention and before the MLP, and one after the last block, so
gembed's pre-norm LayerNorm encoders with learned positions (model/tiny.gin) export to it.

An all-zero token-type table adds nothing: it imports as `type_vocab_size=0`, and a gembed model
without one exports a single zero row (the transformers classes always add one).
"""
from __future__ import annotations

import pathlib
from typing import Any, Mapping

import numpy as np

from gembed.convert.model_config import source_model_config
from gembed.convert.weight_table import Family
from gembed.errors import GembedUserError
from gembed.model import ModelConfig

ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "relu": "relu", "silu": "silu"}
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}
TOKEN_TYPES = "embeddings.token_type_embeddings.weight"
# Tensors that play no part in the embedding: the [CLS] pooler, MLM/NSP heads, buffers, and an
# all-zero token-type table (the only way that table goes unused).
IGNORED = r"pooler\..*|cls\..*|embeddings\.position_ids|" + TOKEN_TYPES.replace(".", r"\.")

EMBEDDINGS = {
    "token_embedding": "embeddings.word_embeddings",
    "position_embedding": "embeddings.position_embeddings",
    "token_type_embedding": "embeddings.token_type_embeddings",
}
LINEARS = {
    "layer_{i}/attention/query": "encoder.layer.{i}.attention.self.query",
    "layer_{i}/attention/key": "encoder.layer.{i}.attention.self.key",
    "layer_{i}/attention/value": "encoder.layer.{i}.attention.self.value",
    "layer_{i}/attention/output": "encoder.layer.{i}.attention.output.dense",
    "layer_{i}/mlp/up": "encoder.layer.{i}.intermediate.dense",
    "layer_{i}/mlp/down": "encoder.layer.{i}.output.dense",
}
BERT_MODULES = {
    **EMBEDDINGS, **LINEARS,
    "embedding_norm": "embeddings.LayerNorm",
    "layer_{i}/attention_norm": "encoder.layer.{i}.attention.output.LayerNorm",
    "layer_{i}/mlp_norm": "encoder.layer.{i}.output.LayerNorm",
}
MEGATRON_MODULES = {
    **EMBEDDINGS, **LINEARS,
    "layer_{i}/attention_norm": "encoder.layer.{i}.attention.ln",
    "layer_{i}/mlp_norm": "encoder.layer.{i}.ln",
    "final_norm": "encoder.ln",
}


def _encoder_model_config(pre_norm: bool):
    """The `Family.model_config` of BERT (post-norm) or Megatron-BERT (pre-norm)."""

    def model_config(config: dict[str, Any], tensors: Mapping[str, np.ndarray], attention: str | None,
                     pooling: str, where: pathlib.Path) -> ModelConfig:
        if attention not in (None, "bidirectional"):
            raise GembedUserError(f"--attention={attention}: BERT-style encoders are "
                                  f"bidirectional; drop the flag.")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise GembedUserError(
                f"{where}: position_embedding_type={config['position_embedding_type']!r} is not "
                f"supported (only 'absolute').")
        activation = config.get("hidden_act", "gelu")
        if activation not in ACTIVATIONS:
            raise GembedUserError(f"{where}: hidden_act={activation!r} is not supported "
                                  f"({', '.join(ACTIVATIONS)}).")
        token_types = tensors.get(TOKEN_TYPES)
        type_vocab_size = (0 if token_types is not None and not token_types.any()
                           else config.get("type_vocab_size", 2))
        return source_model_config(
            vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
            mlp_dim=config["intermediate_size"], mlp_activation=ACTIVATIONS[activation],
            norm="layernorm", norm_eps=config.get("layer_norm_eps", 1e-12),
            norm_position="pre" if pre_norm else "post", final_norm=pre_norm,
            position_embedding="learned", max_position_embeddings=config["max_position_embeddings"],
            type_vocab_size=type_vocab_size, embedding_norm=not pre_norm, use_bias=True,
            attention_mask="bidirectional", pooling=pooling, dtype="float32")

    return model_config


def _encoder_hf_config(model_type: str):
    """The `Family.hf_config` of BERT or Megatron-BERT."""

    def hf_config(model: ModelConfig) -> dict[str, Any]:
        return {
            "model_type": model_type, "vocab_size": model.vocab_size,
            "hidden_size": model.hidden_size, "num_hidden_layers": model.num_layers,
            "num_attention_heads": model.num_heads, "intermediate_size": model.mlp_dim,
            "hidden_act": HF_ACTIVATIONS[model.mlp_activation], "layer_norm_eps": model.norm_eps,
            "max_position_embeddings": model.max_position_embeddings,
            "type_vocab_size": max(1, model.type_vocab_size),
            "position_embedding_type": "absolute", "hidden_dropout_prob": model.dropout_rate,
            "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
        }

    return hf_config


def _constant_tensors(model: ModelConfig) -> dict[str, np.ndarray]:
    """A zero [CLS] pooler (transformers builds one; gembed never reads it), and the zero
    token-type row of a model without token types."""
    hidden = model.hidden_size
    tensors = {"pooler.dense.weight": np.zeros((hidden, hidden), np.float32),
               "pooler.dense.bias": np.zeros(hidden, np.float32)}
    if model.type_vocab_size == 0:
        tensors[TOKEN_TYPES] = np.zeros((1, hidden), np.float32)
    return tensors


BERT = Family(model_type="bert", architecture="BertModel", modules=BERT_MODULES, prefix="bert.",
              ignored=IGNORED, default_pooling="mean",
              model_config=_encoder_model_config(pre_norm=False),
              hf_config=_encoder_hf_config("bert"), constant_tensors=_constant_tensors)
MEGATRON_BERT = Family(model_type="megatron-bert", architecture="MegatronBertModel",
                       modules=MEGATRON_MODULES, prefix="bert.", ignored=IGNORED,
                       default_pooling="mean", model_config=_encoder_model_config(pre_norm=True),
                       hf_config=_encoder_hf_config("megatron-bert"),
                       constant_tensors=_constant_tensors)
