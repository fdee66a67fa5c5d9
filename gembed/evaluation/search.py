"""Exact nearest-neighbour search in JAX: the top k of q·dᵀ, computed block by block.

Queries and documents are L2-normalised, so q·d is the cosine similarity. Both sides are cut into
fixed-size blocks (the last one padded), so one compiled function serves every corpus size, and
memory stays at one [query_block, doc_block] score tile plus the running top k. Ties keep the lower
document index first.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

QUERY_BLOCK = 256
DOC_BLOCK = 8192


def _padded(array: np.ndarray, rows: int) -> np.ndarray:
    if len(array) == rows:
        return array
    return np.concatenate([array, np.zeros((rows - len(array), array.shape[1]), array.dtype)])


def _block_sizes(num_queries: int, num_docs: int) -> tuple[int, int]:
    """Blocks no larger than needed (a power of two), so small problems compile small shapes."""
    def fit(n, cap):
        size = 16
        while size < min(n, cap):
            size *= 2
        return size
    return fit(num_queries, QUERY_BLOCK), fit(num_docs, DOC_BLOCK)


@functools.partial(jax.jit, static_argnames="k")
def _merge_block(best_scores, best_ids, queries, docs, offset, num_docs, *, k):
    """Merges the top k of one document block into the running (scores, ids) of a query block."""
    scores = jnp.matmul(queries, docs.T, precision=jax.lax.Precision.HIGHEST)
    ids = offset + jnp.arange(docs.shape[0], dtype=jnp.int32)
    scores = jnp.where(ids[None, :] < num_docs, scores, -jnp.inf)
    block_scores, block_pos = jax.lax.top_k(scores, min(k, docs.shape[0]))
    all_scores = jnp.concatenate([best_scores, block_scores], axis=1)
    all_ids = jnp.concatenate([best_ids, ids[block_pos]], axis=1)
    top_scores, pos = jax.lax.top_k(all_scores, k)
    return top_scores, jnp.take_along_axis(all_ids, pos, axis=1)


def top_k(queries: np.ndarray, documents: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores float32[Q, k'], ids int32[Q, k']), best first, k' = min(k, number of documents)."""
    queries = np.asarray(queries, np.float32)
    documents = np.asarray(documents, np.float32)
    k = min(k, len(documents))
    q_block, d_block = _block_sizes(len(queries), len(documents))
    out_scores = np.zeros((len(queries), k), np.float32)
    out_ids = np.zeros((len(queries), k), np.int32)
    doc_blocks = [jnp.asarray(_padded(documents[s:s + d_block], d_block))
                  for s in range(0, len(documents), d_block)]
    for q_start in range(0, len(queries), q_block):
        q = jnp.asarray(_padded(queries[q_start:q_start + q_block], q_block))
        best_scores = jnp.full((q_block, k), -jnp.inf, jnp.float32)
        best_ids = jnp.full((q_block, k), len(documents), jnp.int32)
        for b, docs in enumerate(doc_blocks):
            best_scores, best_ids = _merge_block(best_scores, best_ids, q, docs,
                                                 jnp.int32(b * d_block), jnp.int32(len(documents)), k=k)
        rows = min(q_block, len(queries) - q_start)
        out_scores[q_start:q_start + rows] = np.asarray(best_scores)[:rows]
        out_ids[q_start:q_start + rows] = np.asarray(best_ids)[:rows]
    return out_scores, out_ids


def _block_scores(queries, docs):
    return jnp.matmul(queries, docs.T, precision=jax.lax.Precision.HIGHEST)


@jax.jit
def _gold_in_block(queries, docs, gold, offset):
    """The score of each query's gold document if it lies in this block, else -inf."""
    scores = _block_scores(queries, docs)
    local = gold - offset
    inside = (local >= 0) & (local < docs.shape[0])
    picked = jnp.take_along_axis(scores, jnp.clip(local, 0, docs.shape[0] - 1)[:, None], axis=1)[:, 0]
    return jnp.where(inside, picked, -jnp.inf)


@jax.jit
def _count_at_least(queries, docs, target, offset, num_docs):
    scores = _block_scores(queries, docs)
    valid = (offset + jnp.arange(docs.shape[0]))[None, :] < num_docs
    return jnp.sum((scores >= target[:, None]) & valid, axis=1)


def gold_ranks(queries: np.ndarray, documents: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """int[Q]: 1-based rank of document gold[i] for query i over the whole corpus; documents that
    score exactly as high rank before it (pessimistic ties). The gold score comes from the same
    block computation as every other score, so it is compared bit for bit."""
    queries = np.asarray(queries, np.float32)
    documents = np.asarray(documents, np.float32)
    gold = np.asarray(gold, np.int32)
    q_block, d_block = _block_sizes(len(queries), len(documents))
    ranks = np.zeros(len(queries), np.int64)
    doc_blocks = [jnp.asarray(_padded(documents[s:s + d_block], d_block))
                  for s in range(0, len(documents), d_block)]
    num_docs = jnp.int32(len(documents))
    for q_start in range(0, len(queries), q_block):
        rows = min(q_block, len(queries) - q_start)
        q = jnp.asarray(_padded(queries[q_start:q_start + q_block], q_block))
        g = jnp.asarray(np.pad(gold[q_start:q_start + rows], (0, q_block - rows)))
        offsets = [jnp.int32(b * d_block) for b in range(len(doc_blocks))]
        target = functools.reduce(jnp.maximum, [_gold_in_block(q, docs, g, off)
                                                for docs, off in zip(doc_blocks, offsets)])
        count = sum(_count_at_least(q, docs, target, off, num_docs)
                    for docs, off in zip(doc_blocks, offsets))
        ranks[q_start:q_start + rows] = np.asarray(count)[:rows]
    return ranks
