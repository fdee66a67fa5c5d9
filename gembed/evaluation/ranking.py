"""How retrieval and code-search tasks rank documents: one interface, two kinds of model.

A ranker has
    top_k(queries, documents, k, task)       -> int[Q, min(k, D)], document indices, best first
    gold_ranks(queries, documents, gold, task) -> int[Q], 1-based rank of document gold[i]
                                                  (documents scoring as high rank first)
where `task` names the query side's task family (its prompt, for an embedder). An encoder (the
encoder protocol of `gembed.evaluation.encoding`) ranks through `EmbeddingRanker`: exact cosine
search over its embeddings. A lexical model (`gembed.evaluation.bm25.BM25`) is a ranker itself;
it has no `encode`, so tasks that need embeddings are skipped for it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from gembed.evaluation import search

RANKING_FAMILIES = frozenset({"retrieval", "code_search"})


class EmbeddingRanker:
    """Ranks by the cosine of an encoder's embeddings: queries encoded with `task`, documents
    without."""

    def __init__(self, ctx):
        self.ctx = ctx

    def top_k(self, queries: Sequence[str], documents: Sequence[str], k: int,
              task: str | None = None) -> np.ndarray:
        _, ids = search.top_k(self.ctx.encode(queries, task=task), self.ctx.encode(documents), k)
        return ids

    def gold_ranks(self, queries: Sequence[str], documents: Sequence[str], gold: Sequence[int],
                   task: str | None = None) -> np.ndarray:
        return search.gold_ranks(self.ctx.encode(queries, task=task), self.ctx.encode(documents),
                                 np.asarray(gold))


def is_encoder(model) -> bool:
    """Whether `model` embeds texts (else it is a ranker such as BM25)."""
    return callable(getattr(model, "encode", None))


def ranker(ctx):
    """The ranker of the model under evaluation."""
    return EmbeddingRanker(ctx) if is_encoder(ctx.encoder) else ctx.encoder
