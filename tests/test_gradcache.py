"""Gradient caching, packing and the row-tiled loss give the plain full-batch step's numbers.

For several (batch, chunk, hard negatives, Matryoshka, loss direction) combinations, one optimizer
step (AdamW with clipping) with caching, on padded or packed batches, must give the plain padded
step's loss, gradients and updated params to a relative 1e-5 in float32, on 1 device here and on 8
in a subprocess.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from gembed import gradcache, lora, sharding
from gembed.config import LossConfig, TrainConfig
from gembed.data.packing import pack
from gembed.errors import GembedUserError
from gembed.losses.contrastive import contrastive_loss, text_keys
from gembed.model import ModelConfig
from gembed.objective import batch_loss, embeddings_loss
from gembed.train import init_state, learning_rate_schedule, make_optimizer, train_step

RTOL = 1e-5
LENGTH, VOCAB = 8, 64


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    chunk: int
    hard_negatives: int = 0
    output_sizes: tuple[int, ...] | None = None
    symmetric: bool = True
    same_tower: bool = False


CASES = [
    Case(batch=16, chunk=2, hard_negatives=2, output_sizes=(8, 32)),
    Case(batch=32, chunk=4, hard_negatives=1, symmetric=False, same_tower=True),
    Case(batch=16, chunk=16, output_sizes=(16, 32), same_tower=True),
]


def model_config(case: Case, dropout_rate: float = 0.0) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64,
                       max_position_embeddings=LENGTH, projection_dim=32,
                       output_sizes=case.output_sizes, dropout_rate=dropout_rate)


def synthetic_batch(case: Case, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens of random lengths, some missing hard negatives, some duplicate texts."""
    rng = np.random.default_rng(seed)
    slots = 2 + case.hard_negatives
    token_ids = rng.integers(4, VOCAB, size=(case.batch, slots, LENGTH), dtype=np.int32)
    lengths = rng.integers(1, LENGTH + 1, size=(case.batch, slots))
    token_mask = np.arange(LENGTH) < lengths[..., None]
    text_valid = np.ones((case.batch, slots), bool)
    text_valid[:, 2:] = rng.random((case.batch, case.hard_negatives)) < 0.7
    token_mask &= text_valid[..., None]
    names = [f"text {i}" for i in rng.integers(0, 3 * case.batch, size=case.batch * slots)]
    duplicate = rng.integers(0, case.batch)  # a query repeated in the batch, same tokens
    token_ids[(duplicate + 1) % case.batch, 0] = token_ids[duplicate, 0]
    token_mask[(duplicate + 1) % case.batch, 0] = token_mask[duplicate, 0]
    keys = text_keys(names).reshape(case.batch, slots, 2)
    keys[(duplicate + 1) % case.batch, 0] = keys[duplicate, 0]
    return {"token_ids": np.where(token_mask, token_ids, 0), "token_mask": token_mask,
            "text_valid": text_valid, "text_keys": keys}


def packed(batch: dict[str, np.ndarray], groups: int) -> dict[str, np.ndarray]:
    """The padded batch as `TrainBatches` packs it: `groups` equal groups of examples, each
    group's texts packed into the same number of rows (segment ids within the group)."""
    examples, slots, _ = batch["token_ids"].shape
    texts = [list(ids[mask]) for ids, mask in zip(batch["token_ids"].reshape(-1, LENGTH),
                                                  batch["token_mask"].reshape(-1, LENGTH))]
    per_group = examples // groups * slots
    parts = [pack(texts[g * per_group:(g + 1) * per_group], LENGTH, 0,
                  keep=batch["text_valid"].reshape(-1)[g * per_group:(g + 1) * per_group])
             for g in range(groups)]
    rows = max(len(part["token_ids"]) for part in parts)
    stacked = {name: np.stack([np.pad(part[name], [(0, rows - len(part[name])), (0, 0)])
                               for part in parts]) for name in parts[0]}
    return {**stacked, "text_valid": batch["text_valid"], "text_keys": batch["text_keys"]}


def one_step(case: Case, chunk_size: int | None, mesh, pack_groups: int = 0) -> tuple:
    """(loss, grads, updated params) of one train_step from a fixed init on the synthetic batch,
    packed into `pack_groups` groups when > 0."""
    config = model_config(case)
    loss_config = LossConfig(symmetric=case.symmetric, same_tower=case.same_tower)
    train_config = TrainConfig(train_data="synthetic", learning_rate=1e-2, warmup_steps=0,
                               grad_clip_norm=0.5)
    optimizer = make_optimizer(train_config)
    replicated = sharding.replicated(mesh)
    state = jax.device_put(init_state(config, optimizer, seed=3), replicated)
    host_batch = synthetic_batch(case)
    if pack_groups:
        host_batch = packed(host_batch, pack_groups)
    batch = sharding.place_batch(host_batch, mesh)
    rng = jax.random.fold_in(state.rng, state.step)
    if chunk_size is None:
        value_and_grad = functools.partial(jax.value_and_grad(batch_loss, has_aux=True),
                                           model_config=config, loss_config=loss_config)
    else:
        value_and_grad = functools.partial(
            gradcache.cached_value_and_grad, model_config=config, loss_config=loss_config,
            chunk_size=chunk_size, mesh=mesh)
    step = functools.partial(train_step, model_config=config, loss_config=loss_config,
                             optimizer=optimizer, schedule=learning_rate_schedule(train_config),
                             chunk_size=chunk_size, mesh=mesh)

    @functools.partial(jax.jit, out_shardings=replicated)
    def grads_and_step(state, batch):
        grads = value_and_grad(state.params, batch, rng)[1]
        new_state, metrics = step(state, batch)
        return metrics["loss"], grads, new_state.params

    return jax.device_get(grads_and_step(state, batch))


def assert_trees_close(actual, expected, what: str) -> None:
    """Per leaf, |actual - expected| <= RTOL |expected| + 1e-6 |whole expected tree| (L2 norms).

    The floor covers leaves whose true value is 0 up to round-off (the gradient of attention key
    biases, and so the update of those biases), where a relative error means nothing.
    """
    floor = 1e-6 * np.sqrt(sum(np.sum(x.astype(np.float64)**2) for x in jax.tree.leaves(expected)))
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(expected),
                                 jax.tree.leaves(actual)):
        error = np.linalg.norm(got - want)
        assert error <= RTOL * np.linalg.norm(want) + floor, (
            f"{what} {jax.tree_util.keystr(path)}: |cached - plain| = {error:.3g}, "
            f"|plain| = {np.linalg.norm(want):.3g}")


def assert_same_step(case: Case, mesh, packed_too: bool = True) -> None:
    """The cached step on padded batches, and (packed_too) the plain and cached steps on packed
    batches (one group per device, or per chunk), give the plain padded step's numbers."""
    devices = mesh.shape[sharding.DATA_AXIS]
    plain_loss, plain_grads, plain_params = one_step(case, None, mesh)
    variants = {"cached": one_step(case, case.chunk, mesh)}
    if packed_too:
        variants["packed"] = one_step(case, None, mesh, pack_groups=devices)
        variants["packed cached"] = one_step(case, case.chunk, mesh,
                                             pack_groups=case.batch // case.chunk)
    for name, (loss, grads, params) in variants.items():
        np.testing.assert_allclose(loss, plain_loss, rtol=RTOL, err_msg=name)
        assert_trees_close(grads, plain_grads, f"{name} grad")
        assert_trees_close(params, plain_params, f"{name} updated param")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cached_and_packed_steps_equal_plain_step(case):
    assert_same_step(case, sharding.make_mesh(), packed_too=case is CASES[0])


def test_cached_step_equals_plain_step_on_8_devices_in_process():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices; test_cached_step_equals_plain_step_on_8_devices runs it")
    case = CASES[0]   # chunks of 2 of the 16 rows per device, hard negatives, Matryoshka
    assert_same_step(dataclasses.replace(case, batch=case.batch * 8), sharding.make_mesh())


@pytest.mark.slow
def test_cached_step_equals_plain_step_on_8_devices():
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         f"{__file__}::test_cached_step_equals_plain_step_on_8_devices_in_process"],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout + result.stderr


def test_dropout_gradient_is_exact_for_the_chunk_keys():
    """With dropout the cached gradient equals differentiating straight through the same chunks."""
    case = Case(batch=8, chunk=2, hard_negatives=1)
    config, loss_config = model_config(case, dropout_rate=0.3), LossConfig()
    mesh = sharding.make_mesh()
    params = init_state(config, make_optimizer(TrainConfig(train_data="x")), seed=0).params
    batch = jax.device_put(synthetic_batch(case), NamedSharding(mesh, PartitionSpec("data")))
    tokens = {"token_ids": batch["token_ids"], "token_mask": batch["token_mask"]}
    rng = jax.random.PRNGKey(5)

    def direct_loss(p, dropout_rate):
        embed_chunk = functools.partial(
            gradcache._embed_padded_chunk, chunk_size=case.chunk, slots=2 + case.hard_negatives,
            model_config=dataclasses.replace(config, dropout_rate=dropout_rate),
            model_params=functools.partial(lora.combine, config=None))
        embed = jax.shard_map(
            functools.partial(gradcache._embed_chunks, embed_chunk=embed_chunk,
                              chunk_size=case.chunk, packed=False),
            mesh=mesh, out_specs=PartitionSpec("data"),
            in_specs=(PartitionSpec(), PartitionSpec(), PartitionSpec("data"), PartitionSpec()))
        return embeddings_loss(p, embed(p, None, tokens, rng), batch, config, loss_config)[0]

    @jax.jit
    def cached_and_direct(params):
        cached = gradcache.cached_value_and_grad(
            params, batch, rng, model_config=config, loss_config=loss_config,
            chunk_size=case.chunk, mesh=mesh)
        return (cached[0][0], cached[1]), jax.value_and_grad(direct_loss)(params, 0.3), \
            direct_loss(params, 0.0)

    cached, direct, no_dropout_loss = cached_and_direct(params)
    assert abs(float(no_dropout_loss) - float(direct[0])) > 1e-3  # dropout really is on
    assert_trees_close(cached, direct, "loss and grads")


@pytest.mark.parametrize("row_tile", [1, 4, 8])
def test_row_tiled_loss_equals_untiled(row_tile):
    rng = np.random.default_rng(0)
    batch, negatives, dim = 16, 2, 12
    query, positive = rng.normal(size=(2, batch, dim)).astype(np.float32)
    hard = rng.normal(size=(batch, negatives, dim)).astype(np.float32)
    texts = [f"q{i}" for i in rng.integers(0, batch, size=batch)]
    kwargs = dict(negatives_valid=rng.random((batch, negatives)) < 0.7,
                  query_keys=text_keys(texts), positive_keys=text_keys([t + "!" for t in texts]),
                  same_tower=True, output_sizes=(4, 12))

    def loss_and_grads(tile):
        fn = functools.partial(contrastive_loss, **kwargs, row_tile=tile)
        return jax.jit(jax.value_and_grad(
            lambda q, p, n, s: fn(q, p, s, negatives=n)[0], argnums=(0, 1, 2, 3)))(
                query, positive, hard, jnp.float32(2.0))

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-7),
                 loss_and_grads(row_tile), loss_and_grads(None))


def test_row_tile_must_divide_the_batch():
    query = np.ones((6, 4), np.float32)
    with pytest.raises(ValueError, match="row_tile=4 must divide the batch size 6"):
        contrastive_loss(query, query, 0.0, row_tile=4)


def test_chunk_size_must_divide_rows_per_device():
    gradcache.check_chunk_size(batch_size=64, chunk_size=8, num_shards=8)
    with pytest.raises(GembedUserError, match="CHUNK_SIZE=3 does not divide the 8 examples"):
        gradcache.check_chunk_size(batch_size=64, chunk_size=3, num_shards=8)
