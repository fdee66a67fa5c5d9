"""Decoder LLMs (Hugging Face `model_type` llama, qwen2, gemma, qwen3, gemma2, gemma3_text) as
`Family` tables.

Pre-norm RMSNorm blocks, RoPE (`rotate_half` layout; rope types default, linear and llama3),
gated MLP and grouped-query attention. Qwen2 has q/k/v biases only; the Gemmas scale token
embeddings by sqrt(hidden_size) and their RMSNorms by (1 + w); Qwen3 and Gemma 3 RMS-normalise
each query and key head; Gemma 2/3 add sandwich norms, scale logits by query_pre_attn_scalar and
(Gemma 2) soft-cap them; Gemma 2/3 and Qwen3 with `use_sliding_window` have sliding-window layers
(`layer_types`), Gemma 3's with their own RoPE base. The LM head is dropped: only hidden states
matter (the final-logit soft-cap is kept in `final_logit_softcap` for `gembed.llm` generation).

The attention is causal unless config.json says otherwise (`is_causal: false` or
`use_bidirectional_attention: true`) or the importer is told; the export writes the flags the
family's transformers class reads. A sliding window of W in config.json means the W latest keys
(the query's own included) in causal mode; bidirectional, transformers lets a query see keys at
distance <= W (`is_causal: false`) or, Gemma 3 with `use_bidirectional_attention`, < W // 2 + 1;
gembed's `sliding_window` is that exclusive bound (W, W + 1, W // 2 + 1).
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
QK_NORM_MODULES = {"layer_{i}/attention/query_norm": "layers.{i}.self_attn.q_norm",
                   "layer_{i}/attention/key_norm": "layers.{i}.self_attn.k_norm"}
# Gemma 2/3 call the norm after attention post_attention_layernorm, the one before the MLP
# pre_feedforward_layernorm.
SANDWICH_MODULES = {**MODULES,
                    "layer_{i}/attention_post_norm": "layers.{i}.post_attention_layernorm",
                    "layer_{i}/mlp_norm": "layers.{i}.pre_feedforward_layernorm",
                    "layer_{i}/mlp_post_norm": "layers.{i}.post_feedforward_layernorm"}
GEMMAS = ("gemma", "gemma2", "gemma3_text")
QK_NORM = ("qwen3", "gemma3_text")
SANDWICH = ("gemma2", "gemma3_text")
ROPE_TYPES = ("default", "linear", "llama3")
DEFAULT_THETA = {"gemma3_text": 1_000_000.0}
DEFAULT_LOCAL_THETA = 10_000.0   # Gemma 3's sliding layers


def _rope_fields(rope: Mapping[str, Any], theta: float, where: pathlib.Path) -> dict[str, Any]:
    """ModelConfig RoPE fields of one transformers rope_parameters dict."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise GembedUserError(
            f"{where}: rope type {rope_type!r} is not supported ({', '.join(ROPE_TYPES)}); "
            f"import a model with one of those.")
    fields = {"rope_theta": float(rope.get("rope_theta") or theta),
              "rope_scaling": "none" if rope_type == "default" else rope_type}
    if rope_type != "default":
        fields["rope_scaling_factor"] = float(rope["factor"])
    if rope_type == "llama3":
        fields |= {"rope_low_freq_factor": float(rope["low_freq_factor"]),
                   "rope_high_freq_factor": float(rope["high_freq_factor"]),
                   "rope_original_max_positions": int(rope["original_max_position_embeddings"])}
    return fields


def _rope(config: dict[str, Any], model_type: str, has_local: bool, where: pathlib.Path
          ) -> dict[str, Any]:
    """RoPE fields from config.json: top-level rope_theta / rope_scaling, or transformers 5's
    rope_parameters (per layer type for Gemma 3: full_attention, sliding_attention)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = config.get("rope_theta") or DEFAULT_THETA.get(model_type, 10000.0)
    if model_type != "gemma3_text":
        fields = _rope_fields(rope, theta, where)
        if has_local and fields["rope_scaling"] != "none":
            raise GembedUserError(f"{where}: RoPE scaling with sliding-window layers is supported "
                                  f"for gemma3_text only; import a model without one of them.")
        return fields
    global_rope = rope.get("full_attention", rope)
    local_rope = rope.get("sliding_attention", {})
    fields = _rope_fields(global_rope, theta, where)
    local = _rope_fields(local_rope, config.get("rope_local_base_freq") or DEFAULT_LOCAL_THETA,
                         where)
    if local["rope_scaling"] != "none":
        raise GembedUserError(f"{where}: RoPE scaling of the sliding-window layers is not "
                              f"supported; import a model whose sliding_attention rope is default.")
    return fields | {"rope_local_theta": local["rope_theta"]}


def _local_layers(config: dict[str, Any], model_type: str) -> tuple[int, ...]:
    """Indices of the sliding-window layers: `layer_types`, else the family's default pattern."""
    layers = config["num_hidden_layers"]
    if model_type in ("qwen2", "qwen3") and not config.get("use_sliding_window"):
        return ()
    types = config.get("layer_types")
    if types is None:
        if model_type == "gemma2":
            types = ["sliding_attention" if (i + 1) % 2 else "full" for i in range(layers)]
        elif model_type == "gemma3_text":
            pattern = config.get("sliding_window_pattern", 6)
            types = ["sliding_attention" if (i + 1) % pattern else "full" for i in range(layers)]
        elif model_type in ("qwen2", "qwen3"):
            start = config.get("max_window_layers", layers)
            types = ["sliding_attention" if i >= start else "full" for i in range(layers)]
        else:
            types = []
    return tuple(i for i, kind in enumerate(types) if kind == "sliding_attention")


def _sliding_window(config: dict[str, Any], model_type: str, attention: str) -> int:
    """gembed's exclusive distance bound of the source's sliding window (module docstring)."""
    window = config["sliding_window"]
    if attention == "causal":
        return window
    gemma3_flag = model_type == "gemma3_text" and config.get("use_bidirectional_attention")
    if config.get("is_causal") is False:
        return (window // 2 + 1 if gemma3_flag else window) + 1
    return window // 2 + 1 if model_type == "gemma3_text" else window + 1


def _hf_sliding_window(model: ModelConfig, model_type: str) -> int:
    """config.json's sliding_window of gembed's (the inverse of `_sliding_window`)."""
    if model.attention_mask == "causal":
        return model.sliding_window
    return (model.sliding_window - 1) * (2 if model_type == "gemma3_text" else 1)


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
    """The gembed architecture of a decoder family's config.json (`Family.model_config`)."""
    model_type = config["model_type"]
    local_layers = _local_layers(config, model_type)
    if local_layers and model_type not in ("qwen3", "gemma2", "gemma3_text"):
        raise GembedUserError(f"{where}: sliding-window attention is not supported for "
                              f"{model_type}; import a model with full attention in every layer.")
    activation = config.get("hidden_activation") or config.get("hidden_act", "silu")
    if activation not in ACTIVATIONS:
        raise GembedUserError(f"{where}: activation {activation!r} is not supported "
                              f"({', '.join(ACTIVATIONS)}).")
    use_bias, qkv_bias = _biases(config, model_type, where)
    attention = attention or configured_attention(config)
    gemma = model_type in GEMMAS
    num_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // num_heads
    scalar = config.get("query_pre_attn_scalar", 256) if model_type in SANDWICH else None
    return source_model_config(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        num_layers=config["num_hidden_layers"], num_heads=num_heads,
        num_kv_heads=config.get("num_key_value_heads") or num_heads, head_dim=head_dim,
        mlp_dim=config["intermediate_size"], mlp_activation=ACTIVATIONS[activation],
        mlp_gated=True, norm="rmsnorm", norm_eps=config.get("rms_norm_eps", 1e-6),
        rmsnorm_unit_offset=gemma, norm_position="pre", final_norm=True,
        position_embedding="rope", max_position_embeddings=config.get("max_position_embeddings", 512),
        **_rope(config, model_type, bool(local_layers), where), embedding_scale=gemma,
        use_bias=use_bias, qkv_bias=qkv_bias, attention_mask=attention,
        local_layers=local_layers,
        sliding_window=_sliding_window(config, model_type, attention) if local_layers else None,
        qk_norm=model_type in QK_NORM, sandwich_norm=model_type in SANDWICH,
        query_pre_attn_scalar=None if scalar in (None, head_dim) else int(scalar),
        attention_logit_softcap=config.get("attn_logit_softcapping") if model_type in SANDWICH
        else None,
        final_logit_softcap=config.get("final_logit_softcapping") if model_type in SANDWICH
        else None,
        pooling=pooling, dtype="float32")


def _hf_rope(model: ModelConfig, model_type: str) -> dict[str, Any]:
    """transformers 5's rope_parameters of a gembed architecture (the inverse of `_rope`)."""
    rope = {"rope_type": "default" if model.rope_scaling == "none" else model.rope_scaling,
            "rope_theta": model.rope_theta}
    if model.rope_scaling != "none":
        rope["factor"] = model.rope_scaling_factor
    if model.rope_scaling == "llama3":
        rope |= {"low_freq_factor": model.rope_low_freq_factor,
                 "high_freq_factor": model.rope_high_freq_factor,
                 "original_max_position_embeddings": model.rope_original_max_positions}
    if model_type != "gemma3_text":
        return rope
    local_theta = model.rope_local_theta or model.rope_theta
    return {"full_attention": rope,
            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}}


def _decoder_hf_config(model_type: str):
    """The `Family.hf_config` of one decoder family."""

    def hf_config(model: ModelConfig) -> dict[str, Any]:
        activation = HF_ACTIVATIONS[model.mlp_activation]
        causal = model.attention_mask == "causal"
        config = {
            "model_type": model_type, "vocab_size": model.vocab_size,
            "hidden_size": model.hidden_size, "num_hidden_layers": model.num_layers,
            "num_attention_heads": model.num_heads,
            "num_key_value_heads": model.effective_num_kv_heads,
            "head_dim": model.effective_head_dim, "intermediate_size": model.mlp_dim,
            "hidden_act": activation, "rms_norm_eps": model.norm_eps,
            "max_position_embeddings": model.max_position_embeddings,
            "rope_theta": model.rope_theta, "rope_parameters": _hf_rope(model, model_type),
            "attention_dropout": 0.0, "tie_word_embeddings": False,
            # transformers >= 5.2 reads is_causal; TEI reads is_causal (Qwen2) or
            # use_bidirectional_attention (Llama); transformers' Gemma reads both.
            "is_causal": causal, "use_bidirectional_attention": not causal,
        }
        if model_type == "gemma3_text":   # is_causal would widen its bidirectional windows
            del config["is_causal"], config["rope_theta"]
        if model_type in ("llama", "qwen3", "gemma2", "gemma3_text"):
            config |= {"attention_bias": model.effective_qkv_bias}
        if model_type == "llama":
            config |= {"mlp_bias": model.use_bias}
        if model_type in ("qwen2", "qwen3"):
            config |= {"use_sliding_window": bool(model.local_layers)}
        if model_type in GEMMAS:
            config |= {"hidden_activation": activation}
        if model_type in SANDWICH:
            config |= {"query_pre_attn_scalar": model.query_pre_attn_scalar or model.effective_head_dim,
                       "attn_logit_softcapping": model.attention_logit_softcap,
                       "final_logit_softcapping": model.final_logit_softcap}
        if model_type in ("qwen2", "qwen3", "gemma2", "gemma3_text"):
            config |= {"layer_types": ["sliding_attention" if i in model.local_layers
                                       else "full_attention" for i in range(model.num_layers)]}
            if model.local_layers:
                config |= {"sliding_window": _hf_sliding_window(model, model_type)}
        return config

    return hf_config


def _family(model_type: str, architecture: str, modules: Mapping[str, str] = MODULES) -> Family:
    return Family(model_type=model_type, architecture=architecture, modules=modules,
                  prefix="model.", ignored=IGNORED, default_pooling="last",
                  model_config=decoder_model_config, hf_config=_decoder_hf_config(model_type))


LLAMA = _family("llama", "LlamaModel")
QWEN2 = _family("qwen2", "Qwen2Model")
GEMMA = _family("gemma", "GemmaModel")
QWEN3 = _family("qwen3", "Qwen3Model", {**MODULES, **QK_NORM_MODULES})
GEMMA2 = _family("gemma2", "Gemma2Model", SANDWICH_MODULES)
GEMMA3 = _family("gemma3_text", "Gemma3TextModel", {**SANDWICH_MODULES, **QK_NORM_MODULES})
FAMILIES = (LLAMA, QWEN2, GEMMA, QWEN3, GEMMA2, GEMMA3)
MODEL_TYPES = tuple(family.model_type for family in FAMILIES)
