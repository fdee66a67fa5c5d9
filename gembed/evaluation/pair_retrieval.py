"""Retrieval over (query, positive) pairs: each query's only relevant document is its own positive.

Exact search in JAX: cosine scores of every query against every document, top-k by `lax.top_k`.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gembed.data.examples import Example


@jax.jit
def _rank_of_target(queries: jax.Array, documents: jax.Array) -> jax.Array:
    """int32[Q]: 1-based rank of document i among all documents for query i (ties rank last)."""
    scores = queries @ documents.T
    target = jnp.diagonal(scores)
    return jnp.sum(scores >= target[:, None], axis=1)


def pair_retrieval_metrics(query_embeddings: np.ndarray, document_embeddings: np.ndarray) -> dict:
    """MRR@10 and Recall@1/@10 (x100) of normalised float32[N, D] query/document embeddings.

    Row i of each is a matching pair; every other document is a distractor.
    """
    ranks = np.asarray(_rank_of_target(jnp.asarray(query_embeddings),
                                       jnp.asarray(document_embeddings)))
    reciprocal = np.where(ranks <= 10, 1.0 / ranks, 0.0)
    return {"mrr@10": 100 * float(reciprocal.mean()),
            "recall@1": 100 * float((ranks <= 1).mean()),
            "recall@10": 100 * float((ranks <= 10).mean())}


def evaluate_pairs(embedder, examples: Sequence[Example], batch_size: int = 64) -> dict:
    """Embeds queries and positives of `examples` with `embedder` and scores pair retrieval."""
    queries = embedder.encode([e.query for e in examples], batch_size=batch_size)
    documents = embedder.encode([e.positive for e in examples], batch_size=batch_size)
    return pair_retrieval_metrics(queries, documents)
