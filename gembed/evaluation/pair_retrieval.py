"""Retrieval over (query, positive) pairs: each query's only relevant document is its own positive.

Exact search in JAX (`gembed.evaluation.search.gold_ranks`): the rank of document i among all
documents for query i, ties ranked last.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from gembed.data.examples import Example
from gembed.evaluation import metrics, search


def pair_retrieval_metrics(query_embeddings: np.ndarray, document_embeddings: np.ndarray) -> dict:
    """MRR (full ranking), MRR@10 and Recall@1/@10 (x100) of normalised float32[N, D] query/document
    embeddings. Row i of each is a matching pair; every other document is a distractor."""
    ranks = search.gold_ranks(query_embeddings, document_embeddings, np.arange(len(query_embeddings)))
    return metrics.gold_rank_scores(ranks)


def evaluate_pairs(embedder, examples: Sequence[Example], batch_size: int = 64) -> dict:
    """Embeds queries and positives of `examples` with `embedder` and scores pair retrieval."""
    queries = embedder.encode([e.query for e in examples], batch_size=batch_size)
    documents = embedder.encode([e.positive for e in examples], batch_size=batch_size)
    return pair_retrieval_metrics(queries, documents)
