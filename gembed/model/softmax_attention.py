"""Masked softmax attention with a hand-written backward pass.

Autodiff of softmax(mask(q·kᵀ))·v stores and re-reads several [B, N, L, L] intermediates; the
backward here uses the FlashAttention identities instead: with P the probabilities and O the
output, dS = P ⊙ (dO·vᵀ - rowsum(dO ⊙ O)) at the visible keys (0 at the others), so it makes one
elementwise pass over [B, N, L, L] between four matmuls, which made the CPU train step faster
(README, "Speed"). Not differentiated (encode), the forward on the CPU is `blocked_attention` for
at least KEY_BLOCK keys (cache-sized key blocks instead of whole [B, N, L, L] logits), else
`jax.nn.dot_product_attention`. Differentiated, the values are that function's: tests/test_model.py
checks outputs and gradients against it.

Gemma 2's soft-capped logits (c·tanh(logits / c)) take plain autodiff of the reference formula.

Grouped-query attention groups the queries, [B, L, K, G, H] with G = N/K (query head n uses
key/value head n // G), so keys and values are never repeated.

Shapes: B batch, T queries, S keys, N query heads, K key/value heads (N a multiple of K), G = N/K,
H head_dim. Logits, softmax and its gradient are float32; matmul inputs are in the inputs' dtype.
"""
import functools

import jax
import jax.numpy as jnp

from gembed.model.blocked_attention import KEY_BLOCK, blocked_attention

MASKED_LOGIT = -1e30   # finite: a query with no visible key attends uniformly instead of NaN


def softmax_attention(query: jax.Array, key: jax.Array, value: jax.Array, visible: jax.Array,
                      is_causal: bool = False, scale: float | None = None,
                      logit_softcap: float | None = None) -> jax.Array:
    """query: [B, T, N, H]; key, value: [B, S, K, H]; visible: bool[B, 1, 1 or T, S] (which keys
    each query sees) → [B, T, N, H]; logits scaled by `scale` (None: 1/sqrt(H)), then soft-capped
    to (-logit_softcap, logit_softcap) when that is set."""
    batch, length, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    if is_causal:
        visible = visible & jnp.tril(jnp.ones((length, key.shape[1]), bool))
    scale = head_dim ** -0.5 if scale is None else scale
    grouped = query.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    if logit_softcap is not None:
        probabilities = _probabilities(grouped, key, visible[:, :, None], scale, logit_softcap)
        return jnp.einsum("bkgts,bskh->btkgh", probabilities.astype(value.dtype),
                          value).reshape(query.shape)
    return _attention(grouped, key, value, visible[:, :, None], scale).reshape(query.shape)


def _probabilities(query: jax.Array, key: jax.Array, visible: jax.Array, scale: float,
                   logit_softcap: float | None = None) -> jax.Array:
    """float32[B, K, G, T, S] softmax over the visible keys of the scaled (soft-capped) logits."""
    logits = jnp.einsum("btkgh,bskh->bkgts", query, key, preferred_element_type=jnp.float32) * scale
    if logit_softcap is not None:
        logits = logit_softcap * jnp.tanh(logits / logit_softcap)
    logits = jnp.where(visible, logits, MASKED_LOGIT)
    return jax.nn.softmax(logits, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(query, key, value, visible, scale):
    """query [B, T, K, G, H]; key, value [B, S, K, H]; visible bool[B, 1, 1, 1 or T, S]."""
    batch, length, kv_heads, group, head_dim = query.shape
    flat = query.reshape(batch, length, kv_heads * group, head_dim)
    if (jax.default_backend() == "cpu" and key.shape[1] >= KEY_BLOCK
            and not jax.sharding.get_abstract_mesh().manual_axes):   # not inside a shard_map
        output = blocked_attention(flat, jnp.repeat(key, group, axis=2),
                                   jnp.repeat(value, group, axis=2), visible[:, :, 0], scale)
    else:
        output = jax.nn.dot_product_attention(flat, key, value, mask=visible[:, :, 0], scale=scale)
    return output.reshape(query.shape)


def _attention_forward(query, key, value, visible, scale):
    probabilities = _probabilities(query, key, visible, scale)
    output = jnp.einsum("bkgts,bskh->btkgh", probabilities.astype(value.dtype), value)
    return output, (query, key, value, visible, probabilities, output)


def _attention_backward(scale, residuals, output_grad):
    query, key, value, visible, probabilities, output = residuals
    probabilities_grad = jnp.einsum("btkgh,bskh->bkgts", output_grad, value,
                                    preferred_element_type=jnp.float32)
    row_dot = jnp.einsum("btkgh,btkgh->bkgt", output_grad.astype(jnp.float32),
                         output.astype(jnp.float32))
    logits_grad = jnp.where(visible, probabilities * (probabilities_grad - row_dot[..., None]), 0.0)
    logits_grad = (logits_grad * scale).astype(query.dtype)
    query_grad = jnp.einsum("bkgts,bskh->btkgh", logits_grad, key)
    key_grad = jnp.einsum("bkgts,btkgh->bskh", logits_grad, query)
    value_grad = jnp.einsum("bkgts,btkgh->bskh", probabilities.astype(output_grad.dtype), output_grad)
    return query_grad, key_grad, value_grad, None


_attention.defvjp(_attention_forward, _attention_backward)
