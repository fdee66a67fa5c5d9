"""Rematerialisation policies (`ModelConfig.remat`) change what the backward pass keeps, never the
gradients: each policy against the plain backward, on packed rows with dropout."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gembed.model import EmbeddingModel, ModelConfig, init_params

CONFIG = ModelConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                     mlp_dim=64, position_embedding="rope", dropout_rate=0.1)


@functools.cache
def loss_and_grads(remat: str):
    config = dataclasses.replace(CONFIG, remat=remat)
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    token_ids = jnp.asarray(rng.integers(0, 50, (2, 16)), jnp.int32)
    mask = jnp.arange(16)[None] < jnp.asarray([[16], [11]])
    segment_ids = jnp.asarray([[0] * 6 + [1] * 10, [2] * 11 + [0] * 5], jnp.int32)
    positions = jnp.asarray([list(range(6)) + list(range(10)), list(range(11)) + [0] * 5])
    targets = jnp.asarray(rng.standard_normal((3, CONFIG.embedding_size)), jnp.float32)

    def loss(params):
        embeddings = EmbeddingModel(config).apply(
            {"params": params}, token_ids, mask, deterministic=False, segment_ids=segment_ids,
            positions=positions, num_texts=3, rngs={"dropout": jax.random.PRNGKey(1)})
        return jnp.sum(embeddings * targets)

    text = str(jax.make_jaxpr(jax.grad(loss))(params))
    return jax.jit(jax.value_and_grad(loss))(params), "checkpoint" in text or "remat" in text


@pytest.mark.parametrize("remat", ["dots_saveable", "full"])
def test_remat_policies_give_the_plain_gradients(remat):
    (plain_loss, plain_grads), plain_rematted = loss_and_grads("none")
    (loss, grads), rematted = loss_and_grads(remat)
    assert rematted and not plain_rematted
    np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads),
                                 jax.tree.leaves(plain_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))
