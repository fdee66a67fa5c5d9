"""Masked softmax attention with a hand-written backward pass.

Autodiff of softmax(mask(q·kᵀ))·v stores and re-reads several [B, N, L, L] intermediates; the
backward here uses the FlashAttention identities instead: with P the probabilities and O the
output, dS = P ⊙ (dO·vᵀ - rowsum(dO ⊙ O)) at the visible keys (0 at the others), so it makes one
elementwise pass over [B, N, L, L] between four matmuls, which made the CPU train step faster
(README, "Speed"). Not differentiated (encode), the forward on the CPU is `blocked_attention` for
at least KEY_BLOCK keys (cache-sized key blocks instead of whole [B, N, L, L] logits), else
`jax.nn.dot_product_attention`. Differentiated, the values are that function's: tests/test_model.py
checks outputs and gradients against it.

Shapes: B batch, L sequence length, N query heads, K key/value heads (N a multiple of K), H
head_dim. Logits, softmax and its gradient are float32; the matmul inputs are in the inputs' dtype.
"""
import jax
import jax.numpy as jnp

from gembed.model.blocked_attention import KEY_BLOCK, blocked_attention

MASKED_LOGIT = -1e30   # finite: a query with no visible key attends uniformly instead of NaN


def softmax_attention(query: jax.Array, key: jax.Array, value: jax.Array, visible: jax.Array,
                      is_causal: bool = False) -> jax.Array:
    """query: [B, L, N, H]; key, value: [B, L, K, H]; visible: bool[B, 1, 1 or L, L] (which keys
    each query sees) → [B, L, N, H], scaled by 1/sqrt(H)."""
    heads, kv_heads = query.shape[2], key.shape[2]
    if heads != kv_heads:
        key = jnp.repeat(key, heads // kv_heads, axis=2)
        value = jnp.repeat(value, heads // kv_heads, axis=2)
    if is_causal:
        length = query.shape[1]
        visible = visible & jnp.tril(jnp.ones((length, length), bool))
    return _attention(query, key, value, visible)


def _probabilities(query: jax.Array, key: jax.Array, visible: jax.Array) -> jax.Array:
    """float32[B, N, L, L] softmax over the visible keys of the scaled logits."""
    logits = jnp.einsum("bqnh,bknh->bnqk", query, key, preferred_element_type=jnp.float32)
    logits = jnp.where(visible, logits * query.shape[-1] ** -0.5, MASKED_LOGIT)
    return jax.nn.softmax(logits, axis=-1)


@jax.custom_vjp
def _attention(query, key, value, visible):
    if jax.default_backend() == "cpu" and key.shape[1] >= KEY_BLOCK:
        return blocked_attention(query, key, value, visible)
    return jax.nn.dot_product_attention(query, key, value, mask=visible)


def _attention_forward(query, key, value, visible):
    probabilities = _probabilities(query, key, visible)
    output = jnp.einsum("bnqk,bknh->bqnh", probabilities.astype(value.dtype), value)
    return output, (query, key, value, visible, probabilities, output)


def _attention_backward(residuals, output_grad):
    query, key, value, visible, probabilities, output = residuals
    probabilities_grad = jnp.einsum("bqnh,bknh->bnqk", output_grad, value,
                                    preferred_element_type=jnp.float32)
    row_dot = jnp.einsum("bqnh,bqnh->bnq", output_grad.astype(jnp.float32),
                         output.astype(jnp.float32))
    logits_grad = jnp.where(visible, probabilities * (probabilities_grad - row_dot[..., None]), 0.0)
    logits_grad = (logits_grad * query.shape[-1] ** -0.5).astype(query.dtype)
    query_grad = jnp.einsum("bnqk,bknh->bqnh", logits_grad, key)
    key_grad = jnp.einsum("bnqk,bqnh->bknh", logits_grad, query)
    value_grad = jnp.einsum("bnqk,bqnh->bknh", probabilities.astype(output_grad.dtype), output_grad)
    return query_grad, key_grad, value_grad, None


_attention.defvjp(_attention_forward, _attention_backward)
