"""Decoder LLMs (Hugging Face `model_type` llama, qwen2, gemma) -> gembed.

Pre-norm RMSNorm blocks, RoPE (`rotate_half` layout, default rope type only), gated MLP and
grouped-query attention. Qwen2 has q/k/v biases only; Gemma scales token embeddings by
sqrt(hidden_size) and its RMSNorm by (1 + w). The LM head is dropped: only hidden states matter.
The causal mask can be kept or removed (bidirectional), and the pooling chosen.
"""
from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from gembed.convert.model_config import source_model_config
from gembed.convert.weight_map import WeightMap
from gembed.errors import GembedUserError
from gembed.model import ModelConfig

MODEL_TYPES = ("llama", "qwen2", "gemma")
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "gelu": "gelu", "relu": "relu"}
# Tensors that play no part in the embedding: the LM head, rotary buffers.
IGNORED = r"lm_head\.weight|layers\.\d+\.self_attn\.rotary_emb\.inv_freq"


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


def decoder_model_config(config: dict[str, Any], attention_mask: str, pooling: str,
                         where: pathlib.Path) -> ModelConfig:
    """The gembed architecture of a Llama/Qwen2/Gemma config.json."""
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
        qkv_bias=qkv_bias, attention_mask=attention_mask, pooling=pooling, dtype="float32")


def decoder_params(weights: dict[str, np.ndarray], model: ModelConfig, where: pathlib.Path) -> dict:
    """gembed `encoder` params from decoder tensors (with or without the "model." prefix)."""
    prefix = "model." if any(name.startswith("model.") for name in weights) else ""
    source = WeightMap(weights, prefix, where)
    hidden, mlp = model.hidden_size, model.mlp_dim
    query_width = model.num_heads * model.effective_head_dim
    kv_width = model.effective_num_kv_heads * model.effective_head_dim
    qkv_bias, bias = model.effective_qkv_bias, model.use_bias
    encoder = {"token_embedding": {"embedding": source.tensor(
        "embed_tokens.weight", (model.vocab_size, hidden))}}
    for index in range(model.num_layers):
        layer = f"layers.{index}."
        encoder[f"layer_{index}"] = {
            "attention_norm": source.norm(f"{layer}input_layernorm", hidden, bias=False),
            "attention": {
                "query": source.linear(f"{layer}self_attn.q_proj", hidden, query_width, qkv_bias),
                "key": source.linear(f"{layer}self_attn.k_proj", hidden, kv_width, qkv_bias),
                "value": source.linear(f"{layer}self_attn.v_proj", hidden, kv_width, qkv_bias),
                "output": source.linear(f"{layer}self_attn.o_proj", query_width, hidden, bias),
            },
            "mlp_norm": source.norm(f"{layer}post_attention_layernorm", hidden, bias=False),
            "mlp": {"gate": source.linear(f"{layer}mlp.gate_proj", hidden, mlp, bias),
                    "up": source.linear(f"{layer}mlp.up_proj", hidden, mlp, bias),
                    "down": source.linear(f"{layer}mlp.down_proj", mlp, hidden, bias)},
        }
    encoder["final_norm"] = source.norm("norm", hidden, bias=False)
    source.check_all_used(IGNORED)
    return encoder
