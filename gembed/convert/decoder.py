"""Decoder LLMs (Hugging Face `model_type` llama, qwen2, gemma) as `Family` tables.

Pre-norm RMSNorm blocks, RoPE (`rotate_half` layout, default rope type only), gated MLP and
grouped-query attention. Qwen2 has q/k/v biases only; Gemma scales token embeddings by
sqrt(hidden_size) and its RMSNorm by (1 + w). The LM head is dropped: only hidden states matter.
The attention is causal unless config.json says otherwise (`is_causal: false` or
`use_bidirectional_attention: true`) or the importer is told; the export writes both flags.
"""
from __future__ import annotations

import pathlib
from typing import Any, Mapping

import numpy as np

from gembed.convert.model_config import source_model_config
from gembed.convert.weight_table import Family
from gembed.errors import GembedUserError
from gembed.model import ModelConfig

ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "gelu": "gelu", "relu": "relu"}
HF_ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "relu": "relu"}
# Tensors that play no part in the embedding: the LM head, rotary buffers.
IGNORED = r"lm_head\.weight|layers\.\d+\.self_attn\.rotary_emb\.inv_freq"
MODULES = {
    "token_embedding": "embed_tokens",
    "layer_{i}/attention_norm": "layers.{i}.input_layernorm",
    "layer_{i}/attention/query": "layers.{i}.self_attn.q_proj",
    "layer_{i}/attention/key": "layers.{i}.self_attn.k_proj",
    "layer_{i}/attention/value": "layers.{i}.self_attn.v_proj",
    "layer_{i}/attention/output": "layers.{i}.self_attn.o_proj",
    "layer_{i}/mlp_norm": "layers.{i}.post_attention_layernorm",
    "layer_{i}/mlp/gate": "layers.{i}.mlp.gate_proj",
    "layer_{i}/mlp/up": "layers.{i}.mlp.up_proj",
    "layer_{i}/mlp/down": "layers.{i}.mlp.down_proj",
    "final_norm": "norm",
}


def _rope_theta(config: dict[str, Any], where: pathlib.Path) -> float:
    """rope_theta from config.json (top level, or in transformers 5's rope_parameters)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise GembedUserError(
            f"{where}: rope type {rope_type!r} is not supported (only 'default'); "
            f"import a model without RoPE scaling.")
    return float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0)


def _biases(config: dict[str, Any], model_type: str, where: pathlib.Path) -> tuple[bool, bool]:
    """(use_bias: o-proj and MLP biases, qkv_bias) of the family."""
    if model_type == "qwen2":
        return False, True
    attention_bias = bool(config.get("attention_bias", False))
    mlp_bias = bool(config.get("mlp_bias", False))
    if attention_bias != mlp_bias:
        raise GembedUserError(
            f"{where}: attention_bias={attention_bias} with mlp_bias={mlp_bias} is not supported "
            f"(gembed ties the o-proj and MLP biases); import a model with both equal.")
    return mlp_bias, attention_bias


def configured_attention(config: dict[str, Any]) -> str:
    """'bidirectional' when config.json turns the causal mask off, else 'causal'."""
    if config.get("is_causal") is False or config.get("use_bidirectional_attention") is True:
        return "bidirectional"
    return "causal"


def decoder_model_config(config: dict[str, Any], tensors: Mapping[str, np.ndarray] | None,
                         attention: str | None, pooling: str, where: pathlib.Path) -> ModelConfig:
    """The gembed architecture of a Llama/Qwen2/Gemma config.json (`Family.model_config`)."""
    model_type = config["model_type"]
    if config.get("use_sliding_window") or any(
            kind != "full_attention" for kind in config.get("layer_types") or ()):
        raise GembedUserError(f"{where}: sliding-window attention is not supported; "
                              f"import a model with full attention in every layer.")
    activation = config.get("hidden_activation") or config.get("hidden_act", "silu")
    if activation not in ACTIVATIONS:
        raise GembedUserError(f"{where}: activation {activation!r} is not supported "
                              f"({', '.join(ACTIVATIONS)}).")
    use_bias, qkv_bias = _biases(config, model_type, where)
    gemma = model_type == "gemma"
    num_heads = config["num_attention_heads"]
    return source_model_config(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        num_layers=config["num_hidden_layers"], num_heads=num_heads,
        num_kv_heads=config.get("num_key_value_heads") or num_heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // num_heads,
        mlp_dim=config["intermediate_size"], mlp_activation=ACTIVATIONS[activation],
        mlp_gated=True, norm="rmsnorm", norm_eps=config.get("rms_norm_eps", 1e-6),
        rmsnorm_unit_offset=gemma, norm_position="pre", final_norm=True,
        position_embedding="rope", max_position_embeddings=config.get("max_position_embeddings", 512),
        rope_theta=_rope_theta(config, where), embedding_scale=gemma, use_bias=use_bias,
        qkv_bias=qkv_bias, attention_mask=attention or configured_attention(config),
        pooling=pooling, dtype="float32")


def _decoder_hf_config(model_type: str):
    """The `Family.hf_config` of one decoder family."""

    def hf_config(model: ModelConfig) -> dict[str, Any]:
        activation = HF_ACTIVATIONS[model.mlp_activation]
        config = {
            "model_type": model_type, "vocab_size": model.vocab_size,
            "hidden_size": model.hidden_size, "num_hidden_layers": model.num_layers,
            "num_attention_heads": model.num_heads,
            "num_key_value_heads": model.effective_num_kv_heads,
            "head_dim": model.effective_head_dim, "intermediate_size": model.mlp_dim,
            "hidden_act": activation, "rms_norm_eps": model.norm_eps,
            "max_position_embeddings": model.max_position_embeddings,
            "rope_theta": model.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_theta},
            "attention_dropout": 0.0, "tie_word_embeddings": False,
            # transformers >= 5.2 reads is_causal; TEI reads is_causal (Qwen2) or
            # use_bidirectional_attention (Llama); transformers' Gemma reads both.
            "is_causal": model.attention_mask == "causal",
            "use_bidirectional_attention": model.attention_mask == "bidirectional",
        }
        if model_type == "llama":
            config |= {"attention_bias": model.effective_qkv_bias, "mlp_bias": model.use_bias}
        if model_type == "qwen2":
            config |= {"use_sliding_window": False}
        if model_type == "gemma":
            config |= {"hidden_activation": activation}
        return config

    return hf_config


def _family(model_type: str, architecture: str) -> Family:
    return Family(model_type=model_type, architecture=architecture, modules=MODULES,
                  prefix="model.", ignored=IGNORED, default_pooling="last",
                  model_config=decoder_model_config, hf_config=_decoder_hf_config(model_type))


LLAMA = _family("llama", "LlamaModel")
QWEN2 = _family("qwen2", "Qwen2Model")
GEMMA = _family("gemma", "GemmaModel")
FAMILIES = (LLAMA, QWEN2, GEMMA)
MODEL_TYPES = tuple(family.model_type for family in FAMILIES)
