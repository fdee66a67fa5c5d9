"""Softmax attention in key blocks with an online softmax (the FlashAttention forward), for CPU.

XLA:CPU evaluates `jax.nn.dot_product_attention` as whole [B, N, L, L] logits and probabilities,
which at long sequence lengths leave the caches and make attention memory-bound. Here each group of
BATCH_BLOCK rows walks over KEY_BLOCK keys at a time, keeping a running maximum, normalizer and
output, so the working set is [BATCH_BLOCK, N, L, KEY_BLOCK]. Forward only: `softmax_attention`
uses it where nothing is differentiated (encode) and keeps its own backward for training.

Shapes: B batch, L query length, S key length, N heads (key/value heads already repeated), H
head_dim. Logits, softmax and the accumulation are float32.
"""
import jax
import jax.numpy as jnp

KEY_BLOCK = 64
BATCH_BLOCK = 2


def blocked_attention(query: jax.Array, key: jax.Array, value: jax.Array, visible: jax.Array,
                      scale: float | None = None) -> jax.Array:
    """query: [B, L, N, H]; key, value: [B, S, N, H]; visible: bool[B, 1, 1 or L, S] → [B, L, N, H],
    softmax over the visible keys of the logits times `scale` (None: 1/sqrt(H)). A query that sees
    no key gets the mean of the values of its S keys, as `softmax_attention` gives it."""
    batch, length, heads, head_dim = query.shape
    keys = key.shape[1]
    visible = jnp.broadcast_to(visible, (batch, 1, length, keys))
    batch_pad, key_pad = -batch % BATCH_BLOCK, -keys % KEY_BLOCK
    query = jnp.pad(query, ((0, batch_pad), (0, 0), (0, 0), (0, 0)))
    key, value = (jnp.pad(x, ((0, batch_pad), (0, key_pad), (0, 0), (0, 0))) for x in (key, value))
    # a padded key must not count for queries that see nothing: it gets its own logit below
    real_key = jnp.pad(jnp.ones((keys,), bool), (0, key_pad))
    visible = jnp.pad(visible, ((0, batch_pad), (0, 0), (0, 0), (0, key_pad)))
    groups, blocks = (batch + batch_pad) // BATCH_BLOCK, (keys + key_pad) // KEY_BLOCK

    def by_key_block(x):   # [B', S', ...] -> [groups, blocks, BATCH_BLOCK, KEY_BLOCK, ...]
        x = x.reshape(groups, BATCH_BLOCK, blocks, KEY_BLOCK, *x.shape[2:])
        return jnp.swapaxes(x, 1, 2)

    key_blocks, value_blocks = by_key_block(key), by_key_block(value)
    visible_blocks = jnp.moveaxis(
        visible.reshape(groups, BATCH_BLOCK, 1, length, blocks, KEY_BLOCK), 4, 1)
    real_blocks = real_key.reshape(blocks, KEY_BLOCK)
    scale = head_dim ** -0.5 if scale is None else scale
    scaled = (query * scale).reshape(groups, BATCH_BLOCK, length, heads, head_dim)

    def attend_group(group):
        q, k_blocks, v_blocks, vis_blocks = group

        def step(carry, block):
            running_max, normalizer, output = carry
            k, v, vis, real = block
            logits = jnp.einsum("bqnh,bknh->bnqk", q, k, preferred_element_type=jnp.float32)
            # masked real keys share one very low logit (uniform when nothing is visible); padded
            # keys one lower still, so they never take weight from a real key
            logits = jnp.where(vis, logits, jnp.where(real, -1e30, -2e30))
            new_max = jnp.maximum(running_max, logits.max(axis=-1))
            probabilities = jnp.exp(logits - new_max[..., None])
            correction = jnp.exp(running_max - new_max)
            normalizer = normalizer * correction + probabilities.sum(axis=-1)
            output = output * correction[..., None] + jnp.einsum(
                "bnqk,bknh->bnqh", probabilities.astype(v.dtype), v,
                preferred_element_type=jnp.float32)
            return (new_max, normalizer, output), None

        shape = (BATCH_BLOCK, heads, length)
        init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros((*shape, head_dim), jnp.float32))
        (_, normalizer, output), _ = jax.lax.scan(step, init,
                                                  (k_blocks, v_blocks, vis_blocks, real_blocks))
        return jnp.swapaxes(output / normalizer[..., None], 1, 2)   # [BATCH_BLOCK, L, N, H]

    out = jax.lax.map(attend_group, (scaled, key_blocks, value_blocks, visible_blocks))
    return out.reshape(groups * BATCH_BLOCK, length, heads, head_dim)[:batch].astype(query.dtype)
