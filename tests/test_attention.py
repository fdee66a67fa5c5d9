"""Every attention implementation that runs on CPU against one NumPy reference: values and
query/key/value gradients with padding, packed segments, grouped-query heads and causal masks
(splash in the Pallas interpreter)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gembed.model.attention import Visibility, attend, resolve

BATCH, LENGTH, HEADS, KV_HEADS, HEAD_DIM = 2, 128, 4, 2, 16


def numpy_attention(query, key, value, visible):
    """float64 softmax(q·kᵀ/sqrt(H) at the visible keys)·v per head; query head n uses key/value
    head n // (N / K); visible: bool[B, T, S] → [B, T, N, H]."""
    query, key, value = (np.asarray(x, np.float64) for x in (query, key, value))
    group = query.shape[2] // key.shape[2]
    out = np.zeros_like(query)
    for n in range(query.shape[2]):
        logits = np.einsum("bth,bsh->bts", query[:, :, n], key[:, :, n // group])
        logits = np.where(visible, logits / np.sqrt(query.shape[-1]), -np.inf)
        with np.errstate(invalid="ignore"):   # padding queries see no key: NaN, never compared
            weights = np.exp(logits - logits.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
        out[:, :, n] = np.einsum("bts,bsh->bth", weights, value[:, :, n // group])
    return out


def numpy_visible(mask, segment_ids, is_causal):
    """bool[B, T, S]: real keys of the query's own segment (and not later, if causal)."""
    visible = mask[:, None, :] & (segment_ids[:, :, None] == segment_ids[:, None, :])
    if is_causal:
        visible &= np.tril(np.ones((mask.shape[1],) * 2, bool))
    return visible


def case(packed: bool):
    rng = np.random.default_rng(1 if packed else 0)
    query = rng.standard_normal((BATCH, LENGTH, HEADS, HEAD_DIM)).astype(np.float32)
    key, value = (rng.standard_normal((BATCH, LENGTH, KV_HEADS, HEAD_DIM)).astype(np.float32)
                  for _ in range(2))
    mask = np.arange(LENGTH)[None] < np.array([[LENGTH], [77]])
    if packed:   # row 0: texts of 40, 50, 38 tokens; row 1: 30, 47 and padding
        segment_ids = np.stack([np.repeat([0, 1, 2], [40, 50, 38]),
                                np.repeat([3, 4, 0], [30, 47, 51])]).astype(np.int32)
    else:
        segment_ids = np.zeros((BATCH, LENGTH), np.int32)
    return query, key, value, mask, segment_ids


@pytest.mark.parametrize("implementation", ["xla", "cpu", "splash"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["bidirectional", "causal"])
def test_attention_matches_numpy_reference(implementation, packed, is_causal):
    query, key, value, mask, segment_ids = case(packed)
    visible = Visibility(jnp.asarray(mask), jnp.asarray(segment_ids) if packed else None)
    real = mask[:, :, None, None]   # outputs at padding queries are unspecified
    weights = np.random.default_rng(2).standard_normal(query.shape).astype(np.float32) * real

    def loss(attention):
        return lambda q, k, v: jnp.sum(attention(q, k, v) * weights)

    ours = jax.jit(jax.value_and_grad(loss(lambda q, k, v: attend(
        q, k, v, visible, is_causal=is_causal, implementation=implementation)),
        argnums=(0, 1, 2)))
    (_, grads) = ours(query, key, value)
    got = attend(query, key, value, visible, is_causal=is_causal, implementation=implementation)
    want = numpy_attention(query, key, value, numpy_visible(mask, segment_ids, is_causal))
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0),
                               rtol=2e-5, atol=2e-5)

    # gradients of the same weighted sum through a plain-jnp dense reference
    dense = jnp.asarray(numpy_visible(mask, segment_ids, is_causal))[:, None]

    def plain(q, k, v):
        k, v = (jnp.repeat(x, HEADS // KV_HEADS, axis=2) for x in (k, v))
        logits = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(HEAD_DIM)
        probabilities = jax.nn.softmax(jnp.where(dense, logits, -jnp.inf), axis=-1)
        return jnp.einsum("bnts,bsnh->btnh", jnp.nan_to_num(probabilities), v)

    want_grads = jax.grad(loss(plain), argnums=(0, 1, 2))(query, key, value)
    for name, g, w in zip(("query", "key", "value"), grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5, err_msg=f"{name} grad")


def test_auto_picks_the_platform_kernel_and_falls_back_to_xla():
    assert resolve("auto", "tpu", jnp.bfloat16, 64, 512) == "splash"
    assert resolve("auto", "tpu", jnp.bfloat16, 64, 100) == "xla"           # not 128-aligned
    assert resolve("auto", "tpu", jnp.bfloat16, 64, 512, dense_mask=True) == "xla"   # KV cache
    assert resolve("auto", "gpu", jnp.bfloat16, 64) == "cudnn"
    assert resolve("auto", "gpu", jnp.float32, 64) == "xla"
    assert resolve("auto", "gpu", jnp.bfloat16, 256) == "xla"
    assert resolve("auto", "cpu", jnp.float32, 64) == "cpu"
    assert resolve("cudnn", "cpu", jnp.bfloat16, 64) == "xla"
