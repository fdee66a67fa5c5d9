"""Contrastive (InfoNCE) loss over embeddings, as in cpt-text (2022) and Gemini Embedding (2025).

Everything here is a pure function of embeddings: no model, jittable, float32 math, and safe
under `jax.jit` with the batch sharded across devices, with automatic or explicit mesh axes.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

Array = jax.Array

# Logit given to an excluded candidate: far below any cosine logit (|logit| <= max_scale) yet
# finite, so a row's logsumexp and its gradient never see inf - inf.
_MASKED_LOGIT = -1e9
_NORM_EPS = 1e-12

# Internal keys are int32[..., 3] = (namespace, a, b). Namespace _TEXT holds caller text keys
# (a, b); the item namespaces hold (index, 0) stand-ins that make every item of a kind distinct
# when the caller gives no keys; _NO_KEY fills a key channel a candidate does not take part in.
# Keys from different namespaces never compare equal.
_TEXT = 0
_QUERY_ITEM = 1
_POSITIVE_ITEM = 2
_NEGATIVE_ITEM = 3
_NO_KEY = -1


def text_keys(texts: Sequence[str]) -> np.ndarray:
    """Stable identity keys for texts (host-side NumPy, not jittable).

    Returns int32[N, 2]: the 64-bit blake2b digest of each UTF-8 text, split into two int32.
    Identical texts get identical keys; distinct texts collide with probability ~2**-64.
    """
    digest = b"".join(
        hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest() for text in texts
    )
    return np.frombuffer(digest, dtype="<i4").reshape(-1, 2).astype(np.int32)


def contrastive_loss(
    query: Array,
    positive: Array,
    log_scale: Array,
    *,
    negatives: Array | None = None,
    negatives_valid: Array | None = None,
    query_keys: Array | None = None,
    positive_keys: Array | None = None,
    negative_keys: Array | None = None,
    symmetric: bool = True,
    same_tower: bool = False,
    output_sizes: Sequence[int] | None = None,
    max_scale: float = 100.0,
    row_tile: int | None = None,
    false_negative_margin: float | None = None,
    hardness_alpha: float = 0.0,
) -> tuple[Array, dict[str, Array]]:
    """In-batch softmax contrastive loss with hard negatives, duplicate masking and Matryoshka.

    Args:
      query: f32[B, D] unnormalised query embeddings of the global batch.
      positive: f32[B, D] unnormalised embeddings of each query's positive document.
      log_scale: f32[] learnable log inverse temperature.
      negatives: f32[B, K, D] hard negatives per query.
      negatives_valid: bool[B, K]; False marks a padding slot, never a candidate (its
        embedding is ignored). Default: all valid.
      query_keys, positive_keys: int32[B, 2] text identity keys (see `text_keys`); equal
        keys mean identical text. negative_keys: int32[B, K, 2]. Missing keys mean every
        text of that kind is distinct.
      symmetric: mean of the query->doc and doc->query losses (cpt-text); False gives
        query->doc only (Gemini Embedding).
      same_tower: also use the other queries (query->doc) and the other positives
        (doc->query) as in-batch negatives.
      output_sizes: Matryoshka prefix sizes, each in [1, D]; the loss is summed over them.
        None means the full size D only.
      max_scale: upper bound on scale = exp(log_scale); above it the gradient w.r.t.
        log_scale is zero.
      row_tile: when set (a divisor of B), logits are computed for `row_tile` anchor rows at a
        time and recomputed in the backward pass, so they take O(row_tile * B * (1 + K)) memory
        instead of O(B^2 * (1 + K)); the values and gradients are those of the untiled loss. Each
        row sees all its candidates in one tile, so no running logsumexp is needed. Tile t holds
        rows t, t + B/row_tile, ...: with B sharded over n devices and n dividing row_tile, every
        device works on its own rows in every tile.
      false_negative_margin: when set, a candidate whose cosine exceeds the row's label cosine
        by more than this margin is excluded as a probable false negative (Qwen3-Embedding's
        fake-negative mask); None keeps every candidate.
      hardness_alpha: hardness weighting of negatives (EmbeddingGemma): each non-label
        candidate's exp(logit) in a row's softmax denominator is weighted by
        exp(alpha * stop_gradient(cosine)), i.e. its logit gets + alpha * sg(cosine); 0 is off.

    For each size m, embeddings are cut to [..., :m] and L2-normalised; logits are cosine
    similarities times scale, and each direction is a cross-entropy averaged over rows:
      query->doc: row i's candidates are all B positives (label: positive i), all B*K hard
        negatives of the batch and, if same_tower, queries j != i.
      doc->query (symmetric only): row j's candidates are all B queries (label: query j) and,
        if same_tower, positives i != j. Hard negatives are never anchors.
    A candidate is excluded (logit -1e9) when it is the same text as something that row
    treats as its positive; a row's label is never excluded:
      query->doc row i: positive j if positive_keys[j] == positive_keys[i] or
        query_keys[j] == query_keys[i]; a hard negative whose key equals positive_keys[i];
        a same-tower query j if query_keys[j] == query_keys[i].
      doc->query row j: query i if query_keys[i] == query_keys[j] or
        positive_keys[i] == positive_keys[j]; a same-tower positive i if
        positive_keys[i] == positive_keys[j].
    Invalid negative slots are always excluded.

    Returns:
      (loss f32[], metrics) with metrics "loss", "temperature" (1 / scale) and "accuracy":
      the fraction of query->doc rows at the full size whose label logit is the row maximum
      (ties count as correct).
    """
    batch, dim = query.shape
    sizes = (dim,) if output_sizes is None else tuple(output_sizes)
    if not sizes or any(not 1 <= size <= dim for size in sizes):
        raise ValueError(f"output_sizes must be non-empty and within [1, {dim}], got {sizes}")
    if negatives is None and (negatives_valid is not None or negative_keys is not None):
        raise ValueError("negatives_valid and negative_keys need negatives")
    if row_tile is not None and (row_tile <= 0 or batch % row_tile):
        raise ValueError(f"row_tile={row_tile} must divide the batch size {batch}")

    batch_items = _gather_candidates(query, positive, negatives, negatives_valid)
    keys = _identity_keys(batch, batch_items.negatives_valid.size, query_keys, positive_keys,
                          negative_keys)
    scale = jnp.exp(jnp.minimum(jnp.asarray(log_scale, jnp.float32), math.log(max_scale)))
    options = dict(same_tower=same_tower, row_tile=row_tile,
                   false_negative_margin=false_negative_margin, hardness_alpha=hardness_alpha)
    to_doc_stats = {size: _query_to_doc(size, batch_items, keys, scale, **options)
                    for size in {*sizes, dim}}
    loss = jnp.zeros((), jnp.float32)
    for size in sizes:
        logsumexp, label_logit, _ = to_doc_stats[size]
        size_loss = jnp.mean(logsumexp - label_logit)
        if symmetric:
            logsumexp, label_logit, _ = _doc_to_query(size, batch_items, keys, scale, **options)
            size_loss = 0.5 * (size_loss + jnp.mean(logsumexp - label_logit))
        loss = loss + size_loss

    _, label_logit, max_logit = to_doc_stats[dim]
    accuracy = jnp.mean((label_logit >= max_logit).astype(jnp.float32))
    return loss, {"loss": loss, "temperature": 1.0 / scale, "accuracy": accuracy}


class _BatchItems(NamedTuple):
    """The texts of a global batch as anchors and candidates (all float32).

    queries, positives: f32[B, D] with the caller's row sharding (anchors); all_queries,
    all_positives: the same, whole on every device (candidates); negatives: f32[B*K, D], whole,
    zero where invalid; negatives_valid: bool[B*K].
    """

    queries: Array
    positives: Array
    all_queries: Array
    all_positives: Array
    negatives: Array
    negatives_valid: Array


def _gather_candidates(query, positive, negatives, negatives_valid) -> _BatchItems:
    """Anchors keep the caller's (row) sharding; every row needs every candidate, so candidate
    embeddings and masks are gathered whole."""
    batch, dim = query.shape
    query, positive = query.astype(jnp.float32), positive.astype(jnp.float32)
    if negatives is None:
        negatives = jnp.zeros((batch, 0, dim), jnp.float32)
    num_negatives = negatives.shape[1]
    if negatives_valid is None:
        negatives_valid = jnp.ones((batch, num_negatives), bool)
    negatives_valid = _replicated(negatives_valid)
    negatives = _replicated(negatives).astype(jnp.float32)
    negatives = jnp.where(negatives_valid[..., None], negatives, 0.0)
    return _BatchItems(query, positive, _replicated(query), _replicated(positive),
                       negatives.reshape(batch * num_negatives, dim),
                       negatives_valid.reshape(batch * num_negatives))


class _IdentityKeys(NamedTuple):
    """Internal keys (see `_internal_keys`) of every item: int32[B, 3] queries and positives,
    int32[B*K, 3] negatives."""

    queries: Array
    positives: Array
    negatives: Array


def _identity_keys(batch: int, num_negative_slots: int, query_keys, positive_keys,
                   negative_keys) -> _IdentityKeys:
    num_negatives = num_negative_slots // batch
    negatives = _internal_keys(negative_keys, _NEGATIVE_ITEM, (batch, num_negatives))
    return _IdentityKeys(_internal_keys(query_keys, _QUERY_ITEM, (batch,)),
                         _internal_keys(positive_keys, _POSITIVE_ITEM, (batch,)),
                         negatives.reshape(num_negative_slots, 3))


def _no_keys(rows: int) -> Array:
    """int32[rows, 3] keys that never equal any other key (a channel an item does not join)."""
    return jnp.full((rows, 3), _NO_KEY, jnp.int32)


def _query_to_doc(size: int, batch_items: _BatchItems, keys: _IdentityKeys, scale, *,
                  same_tower: bool, row_tile, false_negative_margin, hardness_alpha):
    """(logsumexp, label logit, max logit), each f32[B], of the query->doc direction at
    Matryoshka size `size`: candidates are the positives (label: the row's own), the hard
    negatives and, with same_tower, the other queries. Key channels (a candidate is excluded when
    its key equals the anchor's in some channel): (positive text, query text)."""
    batch = keys.queries.shape[0]
    candidates = [batch_items.all_positives, batch_items.negatives]
    candidate_keys = [jnp.stack([keys.positives, keys.queries], axis=1),
                      jnp.stack([keys.negatives, _no_keys(keys.negatives.shape[0])], axis=1)]
    valid = [jnp.ones((batch,), bool), batch_items.negatives_valid]
    if same_tower:
        candidates.append(batch_items.all_queries)
        candidate_keys.append(jnp.stack([_no_keys(batch), keys.queries], axis=1))
        valid.append(jnp.ones((batch,), bool))
    return _row_logsumexp_and_label(
        _l2_normalise(batch_items.queries[:, :size]),
        jnp.concatenate([_l2_normalise(c[:, :size]) for c in candidates]), scale,
        jnp.arange(batch), jnp.stack([keys.positives, keys.queries], axis=1),
        jnp.concatenate(candidate_keys), jnp.concatenate(valid), row_tile, false_negative_margin,
        hardness_alpha)


def _doc_to_query(size: int, batch_items: _BatchItems, keys: _IdentityKeys, scale, *,
                  same_tower: bool, row_tile, false_negative_margin, hardness_alpha):
    """The doc->query direction, like `_query_to_doc`: anchors are the positives; candidates the
    queries (label: the row's own) and, with same_tower, the other positives. Key channels:
    (query text, positive text). Hard negatives are never anchors."""
    batch = keys.queries.shape[0]
    candidates = [batch_items.all_queries]
    candidate_keys = [jnp.stack([keys.queries, keys.positives], axis=1)]
    if same_tower:
        candidates.append(batch_items.all_positives)
        candidate_keys.append(jnp.stack([_no_keys(batch), keys.positives], axis=1))
    return _row_logsumexp_and_label(
        _l2_normalise(batch_items.positives[:, :size]),
        jnp.concatenate([_l2_normalise(c[:, :size]) for c in candidates]), scale,
        jnp.arange(batch), jnp.stack([keys.queries, keys.positives], axis=1),
        jnp.concatenate(candidate_keys), jnp.ones((len(candidates) * batch,), bool), row_tile,
        false_negative_margin, hardness_alpha)


def _row_logsumexp_and_label(
    anchors: Array,
    candidates: Array,
    scale: Array,
    labels: Array,
    anchor_keys: Array,
    candidate_keys: Array,
    candidate_valid: Array,
    row_tile: int | None = None,
    false_negative_margin: float | None = None,
    hardness_alpha: float = 0.0,
) -> tuple[Array, Array, Array]:
    """Per-row statistics of the masked logits scale * anchors @ candidates.T.

    Args:
      anchors: f32[R, m] and candidates: f32[C, m], both L2-normalised.
      scale: f32[] logit scale.
      labels: int32[R] column of each row's label; never excluded.
      anchor_keys: int32[R, H, 3] and candidate_keys: int32[C, H, 3]: candidate c is excluded
        from row r when its key equals the row's key in any of the H channels.
      candidate_valid: bool[C]; invalid candidates are excluded from every row.
      row_tile: None computes all R rows at once; else `row_tile` rows at a time (a divisor of
        R; tile t holds rows t, t + R/row_tile, ...), each tile's logits rematerialised in the
        backward pass, so at most f32[row_tile, C] logits are alive.
      false_negative_margin: exclude candidates whose logit exceeds the label logit by more than
        scale * margin (None: no such exclusion).
      hardness_alpha: non-label logits get + alpha * stop_gradient(logit / scale) inside the
        logsumexp (the max logit is of the unweighted logits).

    Returns:
      (logsumexp, label logit, max logit), each f32[R].
      Rows may be sharded; the candidate arrays must be whole on every device.
    """
    anchor_keys, labels = (_rows_sharded_like(x, anchors) for x in (anchor_keys, labels))

    def row_stats(tile):
        tile_anchors, tile_labels, tile_keys = tile
        # Full float32 products: at scale ~100, TF32/bf16 rounding of cosines moves logits visibly.
        logits = scale * jnp.matmul(tile_anchors, candidates.T,
                                    precision=jax.lax.Precision.HIGHEST)
        same_text = jnp.all(tile_keys[:, None] == candidate_keys[None], axis=-1).any(axis=-1)
        is_label = jnp.arange(candidates.shape[0])[None, :] == tile_labels[:, None]
        excluded = same_text | ~candidate_valid[None, :]
        label_logit = jnp.sum(jnp.where(is_label, logits, 0.0), axis=1)
        if false_negative_margin is not None:
            threshold = jax.lax.stop_gradient(label_logit + scale * false_negative_margin)
            excluded |= logits > threshold[:, None]
        logits = jnp.where(excluded & ~is_label, _MASKED_LOGIT, logits)
        weighted = logits
        if hardness_alpha:
            weighted = logits + jnp.where(
                is_label, 0.0, hardness_alpha * jax.lax.stop_gradient(logits / scale))
        return jax.nn.logsumexp(weighted, axis=1), label_logit, jnp.max(logits, axis=1)

    rows = anchors.shape[0]
    if row_tile is None or row_tile >= rows:
        return row_stats((anchors, labels, anchor_keys))
    num_tiles = rows // row_tile

    def to_tiles(x):  # [R, ...] -> [num_tiles, row_tile, ...]; row i * num_tiles + t -> [t, i]
        return jnp.swapaxes(x.reshape(row_tile, num_tiles, *x.shape[1:]), 0, 1)

    tiled = jax.lax.map(jax.checkpoint(row_stats),
                        (to_tiles(anchors), to_tiles(labels), to_tiles(anchor_keys)))
    return tuple(jnp.swapaxes(stat, 0, 1).reshape(rows) for stat in tiled)


def _internal_keys(keys: Array | None, item_namespace: int, shape: tuple[int, ...]) -> Array:
    """int32[*shape, 3]: (_TEXT, *keys) when given, else distinct (item_namespace, index, 0)."""
    if keys is None:
        index = jnp.arange(math.prod(shape), dtype=jnp.int32).reshape(shape)
        namespace = jnp.full(shape, item_namespace, jnp.int32)
        return jnp.stack([namespace, index, jnp.zeros_like(index)], axis=-1)
    namespace = jnp.full((*shape, 1), _TEXT, jnp.int32)
    return jnp.concatenate([namespace, _replicated(jnp.asarray(keys, jnp.int32))], axis=-1)


def _replicated(x: Array) -> Array:
    """x whole on every device (an all-gather) if it is sharded over explicit mesh axes.

    With automatic axes (or none) XLA places the data itself, and x is returned unchanged.
    """
    sharding = jax.typeof(x).sharding
    if not sharding.mesh.explicit_axes:
        return x
    return jax.sharding.reshard(x, NamedSharding(sharding.mesh, PartitionSpec()))


def _rows_sharded_like(x: Array, rows: Array) -> Array:
    """x with its leading axis sharded like the leading axis of `rows` over explicit mesh axes."""
    sharding = jax.typeof(rows).sharding
    if not sharding.mesh.explicit_axes:
        return x
    return jax.sharding.reshard(x, NamedSharding(sharding.mesh, PartitionSpec(sharding.spec[0])))


def _l2_normalise(x: Array) -> Array:
    """Rows of x scaled to unit L2 norm; zero rows stay zero (finite gradient)."""
    squared_norm = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared_norm, _NORM_EPS**2))
