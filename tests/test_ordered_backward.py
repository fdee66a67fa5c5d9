"""`gembed.model.ordered_backward`: the block-by-block backward keeps the gradients and lowers what
XLA:CPU plans to hold at once (the plain backward, `call_in_order` replaced by a plain call, is the
reference)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gembed.model.encoder as encoder
from gembed import compile_plan
from gembed.model import EmbeddingModel, ModelConfig, init_params
from gembed.model.ordered_backward import after

CONFIG = ModelConfig(vocab_size=50, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                     mlp_dim=64, position_embedding="rope")


def plain_call(block, x, visible, positions, deterministic):
    return block(x, visible, positions, deterministic)


def loss_and_grads(config: ModelConfig, batch: int, length: int):
    """A jitted value_and_grad of a linear function of the packed rows' embeddings, and its args."""
    params = init_params(config, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    token_ids = jnp.asarray(rng.integers(0, config.vocab_size, (batch, length)), jnp.int32)
    half = length // 2
    mask = jnp.arange(length)[None] < jnp.asarray(rng.integers(half + 1, length + 1, (batch, 1)))
    segment_ids = jnp.where(jnp.arange(length)[None] < half, 0, 1) + 2 * jnp.arange(batch)[:, None]
    positions = jnp.where(jnp.arange(length) < half, jnp.arange(length), jnp.arange(length) - half)
    positions = jnp.broadcast_to(positions, (batch, length))
    targets = jnp.asarray(rng.standard_normal((2 * batch, config.embedding_size)), jnp.float32)

    def loss(params):
        embeddings = EmbeddingModel(config).apply(
            {"params": params}, token_ids, mask, deterministic=False, segment_ids=segment_ids,
            positions=positions, num_texts=2 * batch, rngs={"dropout": jax.random.PRNGKey(1)})
        return jnp.sum(embeddings * targets)

    return jax.jit(jax.value_and_grad(loss)), params


@pytest.mark.parametrize("remat", ["none", "full"])
def test_block_by_block_backward_gives_the_plain_gradients(remat, monkeypatch):
    config = dataclasses.replace(CONFIG, remat=remat)
    step, params = loss_and_grads(config, batch=2, length=16)
    loss, grads = step(params)
    monkeypatch.setattr(encoder, "call_in_order", plain_call)
    plain_step, _ = loss_and_grads(config, batch=2, length=16)
    plain_loss, plain_grads = plain_step(params)
    np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads),
                                 jax.tree.leaves(plain_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max(),
                                   err_msg=jax.tree_util.keystr(path))


def test_full_remat_plans_less_than_half_the_plain_backwards_temporaries(monkeypatch):
    config = dataclasses.replace(CONFIG, hidden_size=64, num_layers=6, mlp_dim=256, remat="full",
                                 dropout_rate=0.0)

    def temporaries() -> int:
        step, params = loss_and_grads(config, batch=16, length=64)
        return step.lower(params).compile().memory_analysis().temp_size_in_bytes

    ordered = temporaries()
    monkeypatch.setattr(encoder, "call_in_order", plain_call)
    plain = temporaries()
    assert ordered < 0.5 * plain, (ordered, plain)


def test_after_keeps_values_and_ignores_non_floats():
    x = {"a": jnp.asarray([-1.5, 0.0, 2.0]), "b": jnp.asarray([1, 2], jnp.int32)}
    anchors = (jnp.asarray([[3.0, -7.0]]), jnp.asarray(True))
    tied = jax.jit(after)(x, anchors)
    np.testing.assert_array_equal(tied["a"], x["a"])
    assert tied["b"].dtype == jnp.int32 and np.array_equal(tied["b"], x["b"])


def test_after_is_an_optimization_barrier_when_compiling_for_tpu():
    pytest.importorskip("libtpu", reason="the aot extra (libtpu) is not installed")
    devices = np.asarray(compile_plan.topology_devices("v5e:2x2"))
    mesh = jax.sharding.Mesh(devices.reshape(4), ("data",))
    x, anchors = jnp.ones(3), jnp.ones(2)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        tpu = jax.jit(after).lower(x, anchors).as_text()
    cpu = jax.jit(after).lower(x, anchors).as_text()
    assert "optimization_barrier" in tpu and "optimization_barrier" not in cpu
