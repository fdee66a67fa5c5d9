"""Tests for gembed.losses against an independent float64 NumPy reference written with loops."""
import hashlib
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gembed.losses import contrastive as losses
from gembed.losses.contrastive import text_keys

RTOL = 1e-5
ATOL = 1e-6
LOG_SCALE = math.log(10.0)

# One compilation per configuration is much faster than op-by-op dispatch.
contrastive_loss = jax.jit(
    losses.contrastive_loss,
    static_argnames=("symmetric", "same_tower", "output_sizes", "max_scale", "false_negative_margin"),
)


def reference_loss(
    query,
    positive,
    log_scale,
    negatives=None,
    negatives_valid=None,
    query_keys=None,
    positive_keys=None,
    negative_keys=None,
    symmetric=True,
    same_tower=False,
    output_sizes=None,
    max_scale=100.0,
    false_negative_margin=None,
):
    """(loss, full-size query->doc accuracy), computed row by row and candidate by candidate."""
    query = np.asarray(query, np.float64)
    positive = np.asarray(positive, np.float64)
    batch, dim = query.shape
    num_negatives = 0 if negatives is None else negatives.shape[1]
    if negatives is not None and negatives_valid is None:
        negatives_valid = np.ones((batch, num_negatives), bool)
    scale = min(math.exp(log_scale), max_scale)

    def same_text(keys_a, index_a, keys_b, index_b):
        if keys_a is None or keys_b is None:
            return False
        return tuple(keys_a[index_a]) == tuple(keys_b[index_b])

    def cross_entropy(label_logit, other_logits):
        if false_negative_margin is not None:   # probable false negatives leave the row
            other_logits = [x for x in other_logits if x <= label_logit + scale * false_negative_margin]
        logits = [label_logit] + other_logits
        top = max(logits)
        return top + math.log(sum(math.exp(x - top) for x in logits)) - label_logit

    def unit(vector, size):
        prefix = np.asarray(vector[:size], np.float64)
        return prefix / math.sqrt(sum(x * x for x in prefix))

    def logit(u, v):
        return scale * sum(a * b for a, b in zip(u, v))

    total, accuracy = 0.0, None
    for size in (dim,) if output_sizes is None else output_sizes:
        q = [unit(query[i], size) for i in range(batch)]
        p = [unit(positive[i], size) for i in range(batch)]
        n = {
            (b, k): unit(negatives[b, k], size)
            for b in range(batch)
            for k in range(num_negatives)
            if negatives_valid[b, k]
        }

        to_doc, correct = [], []
        for i in range(batch):
            others = []
            for j in range(batch):
                if j != i and not (
                    same_text(positive_keys, j, positive_keys, i)
                    or same_text(query_keys, j, query_keys, i)
                ):
                    others.append(logit(q[i], p[j]))
            for (b, k), negative in n.items():
                if not same_text(negative_keys, (b, k), positive_keys, i):
                    others.append(logit(q[i], negative))
            if same_tower:
                for j in range(batch):
                    if j != i and not same_text(query_keys, j, query_keys, i):
                        others.append(logit(q[i], q[j]))
            label = logit(q[i], p[i])
            to_doc.append(cross_entropy(label, others))
            if false_negative_margin is not None:
                others = [x for x in others if x <= label + scale * false_negative_margin]
            correct.append(all(label >= other for other in others))
        size_loss = sum(to_doc) / batch

        if symmetric:
            to_query = []
            for j in range(batch):
                others = []
                for i in range(batch):
                    if i != j and not (
                        same_text(query_keys, i, query_keys, j)
                        or same_text(positive_keys, i, positive_keys, j)
                    ):
                        others.append(logit(p[j], q[i]))
                if same_tower:
                    for i in range(batch):
                        if i != j and not same_text(positive_keys, i, positive_keys, j):
                            others.append(logit(p[j], p[i]))
                to_query.append(cross_entropy(logit(p[j], q[j]), others))
            size_loss = 0.5 * (size_loss + sum(to_query) / batch)

        total += size_loss
        if size == dim:
            accuracy = sum(correct) / batch
    if accuracy is None:
        accuracy = reference_loss(
            query, positive, log_scale, negatives, negatives_valid, query_keys,
            positive_keys, negative_keys, symmetric=False, same_tower=same_tower,
            max_scale=max_scale, false_negative_margin=false_negative_margin,
        )[1]
    return total, accuracy


def random_batch(batch=4, dim=6, num_negatives=2, seed=0):
    rng = np.random.default_rng(seed)
    query = rng.normal(size=(batch, dim)).astype(np.float32)
    positive = (query + 0.8 * rng.normal(size=(batch, dim))).astype(np.float32)
    negatives = rng.normal(size=(batch, num_negatives, dim)).astype(np.float32)
    return query, positive, negatives


def embeddings_for(texts, table):
    return np.stack([table[text] for text in np.ravel(texts)]).reshape(*np.shape(texts), -1)



def assert_matches_reference(kwargs, log_scale=LOG_SCALE):
    loss, metrics = contrastive_loss(
        kwargs["query"], kwargs["positive"], jnp.float32(log_scale),
        **{name: value for name, value in kwargs.items() if name not in ("query", "positive")},
    )
    expected_loss, expected_accuracy = reference_loss(log_scale=log_scale, **kwargs)
    np.testing.assert_allclose(loss, expected_loss, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(metrics["accuracy"], expected_accuracy, rtol=RTOL)
    return loss


@pytest.mark.parametrize("symmetric", [True, False])
def test_in_batch_matches_reference(symmetric):
    query, positive, _ = random_batch()
    assert_matches_reference(dict(query=query, positive=positive, symmetric=symmetric))


@pytest.mark.parametrize("symmetric,same_tower", [(True, True), (False, False)])
def test_false_negative_mask_matches_reference(symmetric, same_tower):
    """Candidates scoring above the label by more than the margin leave the row; with this batch
    some do (the loss differs from the unmasked one) and some stay."""
    query, positive, negatives = random_batch(batch=6, num_negatives=3, seed=3)
    negatives[:, 0] = query + 0.05   # near-copies of the query: above their positive
    kwargs = dict(query=query, positive=positive, negatives=negatives, symmetric=symmetric,
                  same_tower=same_tower)
    masked = assert_matches_reference({**kwargs, "false_negative_margin": 0.05})
    unmasked = assert_matches_reference(kwargs)
    assert abs(float(masked) - float(unmasked)) > 1e-3


def test_hard_negatives_with_padding_matches_reference():
    query, positive, negatives = random_batch()
    valid = np.array([[True, False], [True, True], [False, False], [False, True]])
    assert_matches_reference(dict(
        query=query, positive=positive, negatives=negatives, negatives_valid=valid,
        symmetric=False,
    ))


@pytest.mark.parametrize("symmetric, same_tower", [(False, False), (True, True)])
def test_perfect_positive_gives_closed_form_loss(symmetric, same_tower):
    # Orthogonal texts: the label logit is the scale, every other candidate logit is 0.
    batch, dim, scale = 3, 16, 2.0
    basis = np.eye(dim, dtype=np.float32)
    query = basis[:batch] * np.array([[1.0], [2.0], [0.5]], np.float32)
    positive = basis[:batch] * 3.0
    negatives = basis[batch:batch + 6].reshape(batch, 2, dim).copy()
    valid = np.array([[True, False], [True, True], [False, False]])
    negatives[~valid] = query[np.nonzero(~valid)[0]]  # padding that would be a perfect match
    extra = batch - 1 if same_tower else 0
    to_doc = math.log(math.exp(scale) + (batch - 1) + valid.sum() + extra) - scale
    to_query = math.log(math.exp(scale) + (batch - 1) + extra) - scale

    expected = 0.5 * (to_doc + to_query) if symmetric else to_doc

    loss, metrics = contrastive_loss(
        query, positive, jnp.float32(math.log(scale)), negatives=negatives,
        negatives_valid=valid, symmetric=symmetric, same_tower=same_tower,
    )
    np.testing.assert_allclose(loss, expected, rtol=RTOL)
    assert metrics["accuracy"] == 1.0


def test_padding_slots_are_ignored_even_if_not_finite():
    query, positive, negatives = random_batch()
    valid = np.array([[True, False], [True, True], [False, False], [False, True]])
    garbage = np.where(valid[..., None], negatives, np.nan).astype(np.float32)

    def loss_of(negs):
        return contrastive_loss(
            query, positive, jnp.float32(LOG_SCALE), negatives=negs, negatives_valid=valid
        )[0]

    loss, grad = jax.value_and_grad(loss_of)(garbage)
    expected, _ = reference_loss(query, positive, LOG_SCALE, negatives, valid)
    np.testing.assert_allclose(loss, expected, rtol=RTOL)
    assert np.all(np.isfinite(grad)) and np.all(grad[~valid] == 0)


DUPLICATE_TEXTS = dict(
    # Queries 0 and 2 are the same text; positives 1 and 3 are the same text; row 0's first
    # hard negative is positive 1's text (a false negative for rows 1 and 3) and row 4's
    # second hard negative is its own positive.
    query=["a", "b", "a", "c", "d"],
    positive=["P", "Q", "R", "Q", "S"],
    negatives=[["Q", "x"], ["y", "z"], ["w", "v"], ["u", "t"], ["s", "S"]],
)


def duplicate_batch(dim=6, seed=1):
    texts = {t for values in DUPLICATE_TEXTS.values() for t in np.ravel(values)}
    rng = np.random.default_rng(seed)
    table = {text: rng.normal(size=dim).astype(np.float32) for text in sorted(texts)}
    embeddings = {name: embeddings_for(np.array(t), table) for name, t in DUPLICATE_TEXTS.items()}
    keys = {
        "query_keys": text_keys(DUPLICATE_TEXTS["query"]),
        "positive_keys": text_keys(DUPLICATE_TEXTS["positive"]),
        "negative_keys": text_keys(np.ravel(DUPLICATE_TEXTS["negatives"])).reshape(5, 2, 2),
    }
    return embeddings, keys


@pytest.mark.parametrize("symmetric, same_tower", [(False, False), (True, True)])
def test_duplicate_masking_matches_reference(symmetric, same_tower):
    embeddings, keys = duplicate_batch()
    flags = dict(symmetric=symmetric, same_tower=same_tower)
    masked = assert_matches_reference({**embeddings, **keys, **flags})
    unmasked = assert_matches_reference({**embeddings, **flags})
    assert abs(float(masked) - float(unmasked)) > 1e-3


def test_partial_keys_match_reference():
    embeddings, keys = duplicate_batch()
    assert_matches_reference({**embeddings, "positive_keys": keys["positive_keys"]})
    assert_matches_reference({**embeddings, "query_keys": keys["query_keys"], "same_tower": True})


def test_fully_duplicated_batch_has_zero_loss():
    rng = np.random.default_rng(2)
    query = np.repeat(rng.normal(size=(1, 4)), 3, axis=0).astype(np.float32)
    positive = np.repeat(rng.normal(size=(1, 4)), 3, axis=0).astype(np.float32)
    negatives = positive[:, None, :]  # each hard negative is the positive text itself
    keys = dict(
        query_keys=text_keys(["q"] * 3),
        positive_keys=text_keys(["p"] * 3),
        negative_keys=text_keys(["p"] * 3).reshape(3, 1, 2),
    )
    loss, _ = contrastive_loss(
        query, positive, jnp.float32(LOG_SCALE), negatives=negatives, same_tower=True, **keys
    )
    np.testing.assert_allclose(loss, 0.0, atol=1e-6)


def test_same_tower_matches_reference():
    # Symmetric same-tower, with and without keys, is covered by the duplicate-masking test.
    query, positive, negatives = random_batch(seed=3)
    assert_matches_reference(dict(
        query=query, positive=positive, negatives=negatives, symmetric=False, same_tower=True,
    ))


def test_matryoshka_sums_prefix_losses():
    query, positive, negatives = random_batch(dim=8, seed=4)
    for sizes in ((2, 4, 8), (3, 5)):  # the second leaves out the full size used by accuracy
        assert_matches_reference(dict(
            query=query, positive=positive, negatives=negatives, output_sizes=sizes,
        ))
    with pytest.raises(ValueError):
        contrastive_loss(query, positive, jnp.float32(0.0), output_sizes=(4, 9))


def test_scale_is_clamped_with_zero_gradient():
    query, positive, negatives = random_batch(seed=5)

    def loss_of(log_scale):
        return contrastive_loss(
            query, positive, log_scale, negatives=negatives, max_scale=50.0
        )[0]

    above = jnp.float32(math.log(80.0))
    _, metrics = contrastive_loss(query, positive, above, negatives=negatives, max_scale=50.0)
    expected, _ = reference_loss(query, positive, math.log(50.0), negatives)
    np.testing.assert_allclose(loss_of(above), expected, rtol=RTOL)
    np.testing.assert_allclose(metrics["temperature"], 1 / 50.0, rtol=RTOL)
    assert jax.grad(loss_of)(above) == 0.0

    below, step = math.log(20.0), 1e-5
    numeric = (
        reference_loss(query, positive, below + step, negatives, max_scale=50.0)[0]
        - reference_loss(query, positive, below - step, negatives, max_scale=50.0)[0]
    ) / (2 * step)
    np.testing.assert_allclose(jax.grad(loss_of)(jnp.float32(below)), numeric, rtol=1e-4)


def test_embedding_gradients_match_finite_differences():
    embeddings, keys = duplicate_batch(dim=4, seed=6)
    embeddings = {name: value[:3] for name, value in embeddings.items()}
    keys = {name: value[:3] for name, value in keys.items()}
    flags = dict(same_tower=True, output_sizes=(2, 4), negatives_valid=np.array(
        [[True, True], [False, True], [True, False]]
    ))
    static = {**keys, **flags}

    def jax_loss(query, positive, negatives):
        return contrastive_loss(
            query, positive, jnp.float32(LOG_SCALE), negatives=negatives, **static
        )[0]

    grads = jax.grad(jax_loss, argnums=(0, 1, 2))(
        embeddings["query"], embeddings["positive"], embeddings["negatives"]
    )
    step = 1e-6
    for argument, grad in zip(("query", "positive", "negatives"), grads):
        numeric = np.zeros(embeddings[argument].shape)
        for index in np.ndindex(numeric.shape):
            shifted = []
            for sign in (1, -1):
                values = {k: v.astype(np.float64) for k, v in embeddings.items()}
                values[argument][index] += sign * step
                shifted.append(reference_loss(log_scale=LOG_SCALE, **values, **static)[0])
            numeric[index] = (shifted[0] - shifted[1]) / (2 * step)
        np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-5)


def test_sharded_jit_matches_unsharded_in_process():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices; test_sharded_jit_matches_unsharded runs it in a subprocess")
    batch, num_negatives = 16, 2
    query, positive, negatives = random_batch(batch=batch, dim=8, num_negatives=num_negatives)
    rng = np.random.default_rng(7)
    texts = [f"text {i}" for i in rng.integers(0, batch, size=batch)]  # some duplicates
    embeddings = (query, positive, negatives)
    all_keys = dict(
        negatives_valid=rng.random((batch, num_negatives)) < 0.7,
        query_keys=text_keys(texts),
        positive_keys=text_keys([text + " answer" for text in texts]),
        negative_keys=text_keys([f"negative {i}" for i in range(batch * num_negatives)]).reshape(
            batch, num_negatives, 2
        ),
    )
    query_keys_only = dict(query_keys=all_keys["query_keys"])

    def loss_fn(log_scale, query, positive, negatives, masks_and_keys):
        return contrastive_loss(
            query, positive, log_scale, negatives=negatives, **masks_and_keys, same_tower=True
        )

    loss_and_grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3), has_aux=True))
    log_scale = jnp.float32(LOG_SCALE)
    explicit, auto = jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto
    for axis_type, masks_and_keys in ((explicit, all_keys), (explicit, query_keys_only),
                                      (auto, all_keys)):
        mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
        sharded = jax.device_put(
            (embeddings, masks_and_keys),
            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")),
        )
        assert len(sharded[0][0].sharding.device_set) == 8
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL),
            loss_and_grads(log_scale, *sharded[0], sharded[1]),
            loss_and_grads(log_scale, *embeddings, masks_and_keys),
        )


def test_sharded_jit_matches_unsharded():
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         f"{__file__}::test_sharded_jit_matches_unsharded_in_process"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout + result.stderr


def test_text_keys():
    keys = text_keys(["hello", "world", "hello", "héllo ✓", ""])
    assert keys.dtype == np.int32 and keys.shape == (5, 2)
    np.testing.assert_array_equal(keys[0], keys[2])
    assert len({tuple(row) for row in keys[[0, 1, 3, 4]]}) == 4
    digest = hashlib.blake2b("héllo ✓".encode(), digest_size=8).digest()
    halves = [int.from_bytes(digest[i:i + 4], "little", signed=True) for i in (0, 4)]
    assert keys[3].tolist() == halves
    assert text_keys([]).shape == (0, 2)
