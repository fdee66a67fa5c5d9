"""Building blocks of the encoder: norm, rotary embedding, attention, MLP, transformer block.

Shapes: B batch, L sequence length, D hidden_size, N query heads, K key/value heads,
H head_dim. Parameters are float32; activations are in `config.compute_dtype`.

Decoding (`gembed.generation`) passes a `cache_index`: the keys and values of the L new tokens are
written into the "cache" collection (cached_key, cached_value: [B, S, K, H], S slots) at slots
cache_index..cache_index+L-1, and the queries attend over all S slots under `visible`.

Local (sliding-window) layers, `config.local_layers`, attend under `visible & sliding_window_mask`
and rotate by `rope_local_theta`; the global layers by `rope_theta` with `rope_scaling`.
"""
import math

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name
import numpy as np

from gembed.model.config import ModelConfig
from gembed.model.attention import Visibility, attend
from gembed.model.matmul_precision import dot_general_with_inputs, matmul_input_dtype

KERNEL_INIT = nn.initializers.normal(stddev=0.02)
NARROW_MLP_HIDDEN = "narrow_mlp_hidden"   # checkpoint_name of the MLP's bfloat16 down-layer input

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def dense(config: ModelConfig, features: int, use_bias: bool, name: str) -> nn.Dense:
    """A Dense layer with float32 params (kernel [in, features]) computing in the compute dtype,
    its matmul inputs as `config.matmul_precision` says (gembed.model.matmul_precision)."""
    input_dtype = matmul_input_dtype(config)
    return nn.Dense(features, use_bias=use_bias, dtype=config.compute_dtype,
                    param_dtype=jnp.float32, kernel_init=KERNEL_INIT, name=name,
                    dot_general=dot_general_with_inputs(input_dtype))


class Norm(nn.Module):
    """LayerNorm (params scale, bias) or RMSNorm (param scale) over the last axis.

    Statistics are computed in float32; the output is in the compute dtype.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., D] → [..., D]."""
        config = self.config
        x = x.astype(jnp.float32)
        features = x.shape[-1]
        if config.norm == "layernorm":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + config.norm_eps)
        scale_init = nn.initializers.zeros if config.rmsnorm_unit_offset else nn.initializers.ones
        scale = self.param("scale", scale_init, (features,), jnp.float32)
        x = x * (1 + scale if config.rmsnorm_unit_offset else scale)
        if config.norm == "layernorm":
            x = x + self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        return x.astype(config.compute_dtype)


def rope_frequencies(config: ModelConfig, local: bool) -> np.ndarray:
    """float32[H/2] inverse frequencies theta^(-2i/H) of a global or local layer, the global ones
    rescaled as `rope_scaling` says ('linear': / factor; 'llama3': transformers'
    `_compute_llama3_parameters`, wavelengths measured against rope_original_max_positions)."""
    head_dim = config.effective_head_dim
    theta = config.rope_local_theta if local and config.rope_local_theta else config.rope_theta
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    frequencies = (1.0 / np.float32(theta) ** exponents).astype(np.float32)
    if local or config.rope_scaling == "none":
        return frequencies
    factor = config.rope_scaling_factor
    if config.rope_scaling == "linear":
        return (frequencies / factor).astype(np.float32)
    original, low, high = (config.rope_original_max_positions, config.rope_low_freq_factor,
                           config.rope_high_freq_factor)
    wavelengths = 2 * math.pi / frequencies
    scaled = np.where(wavelengths > original / low, frequencies / factor, frequencies)
    smooth = (original / wavelengths - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelengths >= original / high) & (wavelengths <= original / low)
    return np.where(medium, blended, scaled).astype(np.float32)


def apply_rotary_embedding(x: jax.Array, positions: jax.Array,
                           inverse_frequencies: np.ndarray) -> jax.Array:
    """Rotates x: [B, L, heads, H] by its token positions int32[B or 1, L] (HF Llama `rotate_half`).

    Dimension i of the first half pairs with dimension i + H/2, rotated by angle
    position * inverse_frequencies[i] (`rope_frequencies`). Computed in float32, returned in
    x's dtype.
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inverse_frequencies)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    first_half, second_half = jnp.split(x32, 2, axis=-1)
    rotated_half = jnp.concatenate([-second_half, first_half], axis=-1)
    return (x32 * jnp.cos(angles) + rotated_half * jnp.sin(angles)).astype(x.dtype)


def attention_mask(mask: jax.Array, segment_ids: jax.Array | None) -> Visibility:
    """Which keys each query may see: the real keys (mask: bool[B, L]) of the query's own text
    (segment_ids: int32[B, L], None for one text per row); `Visibility.dense()` is the
    bool[B, 1, 1 or L, L] form."""
    return Visibility(mask, segment_ids)


def sliding_window_mask(query_positions: jax.Array, key_positions: jax.Array,
                        window: int) -> jax.Array:
    """bool[B or 1, 1, Lq, Lk]: key within `window` positions of the query, |q - k| < window,
    from the token positions int32[B or 1, Lq] of the queries and int32[B or 1, Lk] of the keys.
    The causal mask, applied with it in causal models, keeps the keys before."""
    distance = jnp.abs(query_positions[:, :, None] - key_positions[:, None, :])
    return (distance < window)[:, None]


class Attention(nn.Module):
    """Multi-head (or grouped-query) self-attention under an `attention_mask`.

    Submodules query, key, value, output (and query_norm, key_norm with `qk_norm`). Logits and
    softmax are in float32; a query whose keys are all masked attends uniformly, so fully padded
    rows stay finite. `local`: a sliding-window layer (its RoPE frequencies; the window is in
    `visible`).
    """

    config: ModelConfig
    local: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, visible: jax.Array, positions: jax.Array,
                 cache_index: jax.Array | None = None) -> jax.Array:
        """x: [B, L, D]; visible: `attention_mask`'s `Visibility`; positions:
        int32[B or 1, L] (RoPE) → [B, L, D]. With `cache_index` (int32 scalar), keys and values
        go through the KV cache and visible is bool[B, 1, L, S] over its slots."""
        config = self.config
        batch, length, hidden = x.shape
        heads, kv_heads, head_dim = (
            config.num_heads, config.effective_num_kv_heads, config.effective_head_dim)
        query = dense(config, heads * head_dim, config.effective_qkv_bias, "query")(x)
        key = dense(config, kv_heads * head_dim, config.effective_qkv_bias, "key")(x)
        value = dense(config, kv_heads * head_dim, config.effective_qkv_bias, "value")(x)
        query = query.reshape(batch, length, heads, head_dim)
        key = key.reshape(batch, length, kv_heads, head_dim)
        value = value.reshape(batch, length, kv_heads, head_dim)
        if config.qk_norm:
            query = Norm(config, name="query_norm")(query)
            key = Norm(config, name="key_norm")(key)
        if config.position_embedding == "rope":
            frequencies = rope_frequencies(config, self.local)
            query = apply_rotary_embedding(query, positions, frequencies)
            key = apply_rotary_embedding(key, positions, frequencies)
        causal = config.attention_mask == "causal"
        if cache_index is not None:   # visible already holds the causal mask over cache slots
            key, value = self._through_cache(key, value, cache_index)
            causal = False
        scale = None if config.query_pre_attn_scalar is None else config.query_pre_attn_scalar ** -0.5
        input_dtype = matmul_input_dtype(config)
        if input_dtype is not None:
            query, key, value = (t.astype(input_dtype) for t in (query, key, value))
        attended = attend(query, key, value, visible, is_causal=causal, implementation=config.attention,
                          scale=scale, logit_softcap=config.attention_logit_softcap)
        attended = attended.reshape(batch, length, heads * head_dim)
        return dense(config, hidden, config.use_bias, "output")(attended)

    def _through_cache(self, key: jax.Array, value: jax.Array, cache_index: jax.Array):
        """Writes key, value [B, L, K, H] at slot cache_index of the cached [B, S, K, H] (created
        with the inputs' shape when initialising) and returns the whole updated cache."""
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
        cached_key.value = jax.lax.dynamic_update_slice_in_dim(
            cached_key.value, key.astype(cached_key.value.dtype), cache_index, axis=1)
        cached_value.value = jax.lax.dynamic_update_slice_in_dim(
            cached_value.value, value.astype(cached_value.value.dtype), cache_index, axis=1)
        return cached_key.value, cached_value.value


class Mlp(nn.Module):
    """Feed-forward layer: act(x·up) → down, or gated act(x·gate) * (x·up) → down.

    Submodules gate (gated only), up, down.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, L, D] → [B, L, D]."""
        config = self.config
        activation = ACTIVATIONS[config.mlp_activation]
        up = dense(config, config.mlp_dim, config.use_bias, "up")(x)
        if config.mlp_gated:
            gate = dense(config, config.mlp_dim, config.use_bias, "gate")(x)
            hidden = activation(gate) * up
        else:
            hidden = activation(up)
        input_dtype = matmul_input_dtype(config)
        if input_dtype is not None:
            # kept by the "dots_saveable" remat policy (half the bytes of a float32 activation):
            # recomputed, XLA:CPU fused the activation into the transposing copy for the down
            # layer's weight gradient, reading its inputs in transposed order
            hidden = checkpoint_name(hidden.astype(input_dtype), NARROW_MLP_HIDDEN)
        return dense(config, x.shape[-1], config.use_bias, "down")(hidden)


def residual(x: jax.Array, norm: Norm, sublayer, dropout: nn.Dropout, norm_position: str,
             post_norm: Norm | None = None) -> jax.Array:
    """Pre-norm x + dropout(f(norm(x))), or post-norm norm(x + dropout(f(x))); x: [B, L, D].
    `post_norm` (pre-norm only, Gemma 2/3 "sandwich"): x + dropout(post_norm(f(norm(x))))."""
    if norm_position == "pre":
        output = sublayer(norm(x))
        return x + dropout(output if post_norm is None else post_norm(output))
    return norm(x + dropout(sublayer(x)))


class TransformerBlock(nn.Module):
    """Attention then MLP, each inside a `residual` connection with its norm.

    Submodules attention_norm, attention, mlp_norm, mlp (and attention_post_norm, mlp_post_norm
    with `sandwich_norm`). Dropout (rng collection 'dropout') precedes each residual add when not
    deterministic. `local`: a sliding-window layer (see `Attention`).
    """

    config: ModelConfig
    local: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, visible: jax.Array, positions: jax.Array,
                 deterministic: bool = True, cache_index: jax.Array | None = None) -> jax.Array:
        """x: [B, L, D]; visible, positions, cache_index: see `Attention` → [B, L, D].
        (deterministic is positional for `nn.remat`'s static_argnums.)"""
        config = self.config
        attention = Attention(config, self.local, name="attention")
        dropout = nn.Dropout(config.dropout_rate, deterministic=deterministic)
        sandwich = config.sandwich_norm
        x = residual(x, Norm(config, name="attention_norm"),
                     lambda y: attention(y, visible, positions, cache_index),
                     dropout, config.norm_position,
                     Norm(config, name="attention_post_norm") if sandwich else None)
        return residual(x, Norm(config, name="mlp_norm"), Mlp(config, name="mlp"),
                        dropout, config.norm_position,
                        Norm(config, name="mlp_post_norm") if sandwich else None)
