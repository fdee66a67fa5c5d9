"""Distillation losses and hardness weighting against independent float64 NumPy formulas (values,
and gradients by central finite differences of the NumPy formula), and under gradient caching equal
to the plain step."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gembed import checkpoint, gradcache, sharding, workdir
from gembed.config import LossConfig, TrainConfig
from gembed.layer_subset import subset_params
from gembed.losses import distillation
from gembed.losses.contrastive import contrastive_loss, text_keys
from gembed.model import ModelConfig
from gembed.objective import DISTILL_PROJECTION, batch_loss
from gembed.teacher_cache import TeacherVectors, fill_cache
from gembed.train import init_state, make_optimizer

RTOL, ATOL = 1e-5, 1e-6


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def numeric_grad(f, x, eps=1e-6):
    """Central finite differences of a float64 NumPy function."""
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = eps
        grad[index] = (f(x + step) - f(x - step)) / (2 * eps)
    return grad


def ref_matching(student, teacher, valid, kind, projection=None):
    s = student if projection is None else student @ projection
    rows = []
    for index in np.ndindex(valid.shape):
        if not valid[index]:
            continue
        a, b = s[index], teacher[index]
        if kind == "cosine":
            rows.append(1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        else:
            rows.append(np.mean((a - b) ** 2))
    return np.mean(rows)


@pytest.mark.parametrize("kind", ["cosine", "mse"])
@pytest.mark.parametrize("with_projection", [False, True])
def test_embedding_matching(kind, with_projection):
    rng = np.random.default_rng(0)
    student = rng.normal(size=(4, 3, 6))
    teacher_size = 5 if with_projection else 6
    teacher = rng.normal(size=(4, 3, teacher_size))
    valid = rng.random((4, 3)) < 0.7
    valid[0, 0] = True
    projection = rng.normal(size=(6, 5)) if with_projection else None

    def jax_loss(s, w):
        return distillation.embedding_matching_loss(s, jnp.asarray(teacher, jnp.float32), valid,
                                                    kind=kind, projection=w)

    w32 = None if projection is None else jnp.asarray(projection, jnp.float32)
    value, grads = jax.value_and_grad(jax_loss, argnums=(0, 1) if with_projection else 0)(
        jnp.asarray(student, jnp.float32), w32)
    np.testing.assert_allclose(value, ref_matching(student, teacher, valid, kind, projection),
                               rtol=RTOL, atol=ATOL)
    grad_s = grads[0] if with_projection else grads
    np.testing.assert_allclose(grad_s, numeric_grad(
        lambda s: ref_matching(s, teacher, valid, kind, projection), student), rtol=1e-4, atol=1e-6)
    if with_projection:
        np.testing.assert_allclose(grads[1], numeric_grad(
            lambda w: ref_matching(student, teacher, valid, kind, w), projection),
            rtol=1e-4, atol=1e-6)


def ref_score_kl(sq, sd, tq, td, valid, ts, tt):
    total = 0.0
    for i in range(len(sq)):
        cand = [c for c in range(len(sd)) if valid[c]]
        s_logits = np.array([unit(sq[i]) @ unit(sd[c]) / ts for c in cand])
        t_logits = np.array([unit(tq[i]) @ unit(td[c]) / tt for c in cand])
        log_ps = s_logits - np.log(np.sum(np.exp(s_logits)))
        log_pt = t_logits - np.log(np.sum(np.exp(t_logits)))
        total += np.sum(np.exp(log_pt) * (log_pt - log_ps))
    return total / len(sq)


def test_score_distillation():
    rng = np.random.default_rng(1)
    sq, sd = rng.normal(size=(4, 6)), rng.normal(size=(12, 6))
    tq, td = rng.normal(size=(4, 5)), rng.normal(size=(12, 5))
    valid = np.ones(12, bool)
    valid[[5, 9]] = False
    loss = functools.partial(distillation.score_distillation_loss, teacher_query=tq.astype(np.float32),
                             teacher_documents=td.astype(np.float32), documents_valid=valid,
                             student_temperature=0.2, teacher_temperature=0.1)
    value, (gq, gd) = jax.value_and_grad(lambda q, d: loss(q, d), argnums=(0, 1))(
        sq.astype(np.float32), sd.astype(np.float32))
    np.testing.assert_allclose(value, ref_score_kl(sq, sd, tq, td, valid, 0.2, 0.1), rtol=RTOL,
                               atol=ATOL)
    np.testing.assert_allclose(gq, numeric_grad(
        lambda q: ref_score_kl(q, sd, tq, td, valid, 0.2, 0.1), sq), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gd, numeric_grad(
        lambda d: ref_score_kl(sq, d, tq, td, valid, 0.2, 0.1), sd), rtol=1e-4, atol=1e-6)
    same = distillation.score_distillation_loss(tq, td, tq, td, valid, student_temperature=0.1,
                                                teacher_temperature=0.1)
    assert abs(float(same)) < 1e-6   # the teacher against itself: KL = 0


def ref_spread(x, valid):
    x = unit(x)
    sims = [x[i] @ x[j] for i in range(len(x)) for j in range(len(x))
            if i != j and valid[i] and valid[j]]
    m1, m2 = np.mean(sims), np.mean(np.square(sims))
    return m1 ** 2 + max(0.0, m2 - 1 / x.shape[1])


def test_spread_out():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 4)) + 0.8   # clustered: both moments active
    valid = np.array([1, 1, 0, 1, 1, 1], bool)
    value, grad = jax.value_and_grad(distillation.spread_out_loss)(x.astype(np.float32), valid)
    np.testing.assert_allclose(value, ref_spread(x, valid), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(grad, numeric_grad(lambda y: ref_spread(y, valid), x), rtol=1e-4,
                               atol=1e-6)


def ref_hardness(q, p, n, scale, alpha, at):
    """Query->doc InfoNCE; every non-label candidate's exp(logit) weighted by
    exp(alpha * cosine at `at` (the embeddings the weights are frozen at))."""
    aq, ap, an = at
    total = 0.0
    for i in range(len(q)):
        cands = [(p[j], ap[j]) for j in range(len(p))] + [(m, am) for m, am in zip(n, an)]
        label = scale * unit(q[i]) @ unit(p[i])
        denom = math.exp(label)
        for j, (c, frozen) in enumerate(cands):
            if j == i:
                continue
            weight = math.exp(alpha * unit(aq[i]) @ unit(frozen))
            denom += weight * math.exp(scale * unit(q[i]) @ unit(c))
        total += math.log(denom) - label
    return total / len(q)


def test_hardness_weighting():
    rng = np.random.default_rng(3)
    q, p, n = rng.normal(size=(4, 5)), rng.normal(size=(4, 5)), rng.normal(size=(4, 2, 5))
    scale, alpha = 10.0, 3.0
    loss = jax.jit(lambda q, p, n: contrastive_loss(q, p, math.log(scale), negatives=n,
                                                    symmetric=False, hardness_alpha=alpha)[0])
    value, (gq, gp) = jax.value_and_grad(loss, argnums=(0, 1))(*(x.astype(np.float32) for x in (q, p, n)))
    flat_n = n.reshape(-1, 5)
    at = (q, p, flat_n)
    np.testing.assert_allclose(value, ref_hardness(q, p, flat_n, scale, alpha, at), rtol=RTOL)
    np.testing.assert_allclose(gq, numeric_grad(
        lambda y: ref_hardness(y, p, flat_n, scale, alpha, at), q), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gp, numeric_grad(
        lambda y: ref_hardness(q, y, flat_n, scale, alpha, at), p), rtol=1e-4, atol=1e-6)


LENGTH, VOCAB, TEACHER_SIZE = 8, 64, 24


def distill_batch(batch, slots, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, LENGTH + 1, size=(batch, slots))
    mask = np.arange(LENGTH) < lengths[..., None]
    valid = np.ones((batch, slots), bool)
    valid[:, 2:] = rng.random((batch, slots - 2)) < 0.7
    mask &= valid[..., None]
    ids = np.where(mask, rng.integers(4, VOCAB, size=(batch, slots, LENGTH)), 0).astype(np.int32)
    names = [f"t{i}" for i in range(batch * slots)]
    teacher = unit(rng.normal(size=(batch, slots, TEACHER_SIZE))) * valid[..., None]
    return {"token_ids": ids, "token_mask": mask, "text_valid": valid,
            "text_keys": text_keys(names).reshape(batch, slots, 2),
            "teacher_vectors": teacher.astype(np.float32)}


@pytest.mark.slow
def test_gradient_caching_equals_plain_step_with_distillation():
    config = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=4, mlp_dim=64,
                         max_position_embeddings=LENGTH, projection_dim=16)
    loss_config = LossConfig(contrastive_weight=0.5, embedding_matching_weight=1.0,
                             embedding_matching="mse", score_distillation_weight=0.7,
                             student_temperature=0.2, teacher_temperature=0.1,
                             spread_out_weight=0.3, hardness_alpha=2.0)
    optimizer = make_optimizer(TrainConfig(train_data="x"))
    mesh = sharding.make_mesh()
    state = jax.device_put(init_state(config, optimizer, seed=1, projection_size=TEACHER_SIZE),
                           sharding.replicated(mesh))
    assert state.params[DISTILL_PROJECTION].shape == (16, TEACHER_SIZE)
    batch = sharding.place_batch(distill_batch(8, 3), mesh)
    rng = jax.random.fold_in(state.rng, state.step)
    plain_fn = functools.partial(jax.value_and_grad(batch_loss, has_aux=True),
                                 model_config=config, loss_config=loss_config)
    cached_fn = functools.partial(gradcache.cached_value_and_grad, model_config=config,
                                  loss_config=loss_config, chunk_size=2, mesh=mesh)
    (_, plain), plain_grads = jax.jit(plain_fn)(state.params, batch, rng)
    (_, cached), cached_grads = jax.jit(cached_fn)(state.params, batch, rng)
    for name in ("loss", "embedding_matching", "score_distillation", "spread_out"):
        np.testing.assert_allclose(cached[name], plain[name], rtol=1e-5, err_msg=name)
    assert np.linalg.norm(plain_grads[DISTILL_PROJECTION]) > 0
    for path, want in jax.tree_util.tree_leaves_with_path(plain_grads):
        got = functools.reduce(lambda tree, key: tree[key.key], path, cached_grads)
        assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want) + 1e-7, path
    # each term is in the total with its weight
    terms = (plain["embedding_matching"] + 0.7 * plain["score_distillation"]
             + 0.3 * plain["spread_out"])
    contrastive_only = batch_loss(state.params, batch, rng, config,
                                  LossConfig(hardness_alpha=2.0))[0]
    np.testing.assert_allclose(plain["loss"], 0.5 * contrastive_only + terms, rtol=1e-5)


def test_teacher_cache_is_resumable_and_keyed_by_text(tmp_path):
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return np.stack([np.full(3, len(t), np.float32) for t in texts])

    fill_cache(tmp_path, "teacherA", encode, ["a", "bb", "a", ""], shard_texts=1)
    cache = fill_cache(tmp_path, "teacherA", encode, ["ccc", "bb"], shard_texts=1)
    assert calls == [["a"], ["bb"], ["ccc"]]   # each text computed once, across runs
    assert len(cache) == 3 and len(list(tmp_path.glob("vectors-*.safetensors"))) == 3
    np.testing.assert_array_equal(TeacherVectors(tmp_path).lookup(["ccc", "", "a"]),
                                  [[3, 3, 3], [0, 0, 0], [1, 1, 1]])


def test_layer_subset_renumbers_layers():
    params = {"log_scale": 1.0, "encoder": {f"layer_{i}": {"w": i} for i in range(6)} | {"e": -1}}
    subset = subset_params(params, (1, 3, 5))
    assert subset["encoder"] == {"e": -1, "layer_0": {"w": 1}, "layer_1": {"w": 3},
                                 "layer_2": {"w": 5}}


def test_projection_is_dropped_when_reading_the_checkpoint(tmp_path):
    config = ModelConfig(vocab_size=VOCAB, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32,
                         max_position_embeddings=LENGTH)
    params = init_state(config, make_optimizer(TrainConfig(train_data="x")), seed=0,
                        projection_size=TEACHER_SIZE).params
    ref = checkpoint.save_params(tmp_path, 1, params)
    restored = workdir.restore_params(ref, config)
    assert DISTILL_PROJECTION not in restored
    for want, got in zip(jax.tree.leaves({k: v for k, v in params.items()
                                          if k != DISTILL_PROJECTION}), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(got, want)
