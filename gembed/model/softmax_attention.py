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

Shapes: B batch, L sequence length, N query heads, K key/value heads (N a multiple of K), H
head_dim. Logits, softmax and its gradient are float32; the matmul inputs are in the inputs' dtype.
"""
import functools

import jax
import jax.numpy as jnp

from gembed.model.blocked_attention import KEY_BLOCK, blocked_attention

MASKED_LOGIT = -1e30   # finite: a query with no visible key attends uniformly instead of NaN


def softmax_attention(query: jax.Array, key: jax.Array, value: jax.Array, visible: jax.Array,
                      is_causal: bool = False, scale: float | None = None,
                      logit_softcap: float | None = None) -> jax.Array:
    """query: [B, L, N, H]; key, value: [B, L, K, H]; visible: bool[B, 1, 1 or L, L] (which keys
    each query sees) → [B, L, N, H]; logits scaled by `scale` (None: 1/sqrt(H)), then soft-capped
    to (-logit_softcap, logit_softcap) when that is set."""
    heads, kv_heads = query.shape[2], key.shape[2]
    if heads != kv_heads:
        key = jnp.repeat(key, heads // kv_heads, axis=2)
        value = jnp.repeat(value, heads // kv_heads, axis=2)
    if is_causal:
        length = query.shape[1]
        visible = visible & jnp.tril(jnp.ones((length, length), bool))
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if logit_softcap is not None:
        probabilities = _probabilities(query, key, visible, scale, logit_softcap)
        return jnp.einsum("bnqk,bknh->bqnh", probabilities.astype(value.dtype), value)
    return _attention(query, key, value, visible, scale)


def _probabilities(query: jax.Array, key: jax.Array, visible: jax.Array, scale: float,
                   logit_softcap: float | None = None) -> jax.Array:
    """float32[B, N, L, L] softmax over the visible keys of the scaled (soft-capped) logits."""
    logits = jnp.einsum("bqnh,bknh->bnqk", query, key, preferred_element_type=jnp.float32) * scale
    if logit_softcap is not None:
        logits = logit_softcap * jnp.tanh(logits / logit_softcap)
    logits = jnp.where(visible, logits, MASKED_LOGIT)
    return jax.nn.softmax(logits, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(query, key, value, visible, scale):
    if jax.default_backend() == "cpu" and key.shape[1] >= KEY_BLOCK:
        return blocked_attention(query, key, value, visible, scale)
    return jax.nn.dot_product_attention(query, key, value, mask=visible, scale=scale)


def _attention_forward(query, key, value, visible, scale):
    probabilities = _probabilities(query, key, visible, scale)
    output = jnp.einsum("bnqk,bknh->bqnh", probabilities.astype(value.dtype), value)
    return output, (query, key, value, visible, probabilities, output)


def _attention_backward(scale, residuals, output_grad):
    query, key, value, visible, probabilities, output = residuals
    probabilities_grad = jnp.einsum("bqnh,bknh->bnqk", output_grad, value,
                                    preferred_element_type=jnp.float32)
    row_dot = jnp.einsum("bqnh,bqnh->bnq", output_grad.astype(jnp.float32),
                         output.astype(jnp.float32))
    logits_grad = jnp.where(visible, probabilities * (probabilities_grad - row_dot[..., None]), 0.0)
    logits_grad = (logits_grad * scale).astype(query.dtype)
    query_grad = jnp.einsum("bnqk,bknh->bqnh", logits_grad, key)
    key_grad = jnp.einsum("bnqk,bqnh->bknh", logits_grad, query)
    value_grad = jnp.einsum("bnqk,bqnh->bknh", probabilities.astype(output_grad.dtype), output_grad)
    return query_grad, key_grad, value_grad, None


_attention.defvjp(_attention_forward, _attention_backward)
