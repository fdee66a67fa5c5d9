"""Hard-negative mining (Gemini Embedding's finetuning data; NV-Retriever's positive-aware filter).

A first-round model embeds every query and a document pool (by default the positives of all
examples). For each query the nearest documents by cosine are candidates; a candidate is dropped
when it is the query's positive (same text) or too close to be a trustworthy negative: its score
is at least `relative_margin` times the positive's score (NV-Retriever's TopK-PercPos; a likely
false negative). The first `num_negatives` survivors, most similar first, become the example's
`negatives`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from gembed.data.examples import Example
from gembed.evaluation.search import top_k


@dataclasses.dataclass(frozen=True)
class MiningStats:
    """Counts over all queries: candidates dropped by each rule, and negatives written."""

    dropped_positive: int
    dropped_by_margin: int
    negatives: int
    queries_short_of_negatives: int


def mine_hard_negatives(embedder, examples: Sequence[Example], *, num_negatives: int = 4,
                        candidates: int = 30, relative_margin: float = 0.95,
                        documents: Sequence[str] | None = None, task: str | None = None,
                        batch_size: int = 64, show_progress: bool = False
                        ) -> tuple[list[Example], MiningStats]:
    """Examples with mined `negatives` (replacing any they had), and what was filtered.

    Args:
      embedder: anything with `encode(texts, task=None, batch_size=..., show_progress=...)`
        returning L2-normalised float32 rows (e.g. `gembed.Embedder`).
      examples: the (query, positive) pairs to mine for.
      num_negatives: negatives kept per example, at most.
      candidates: nearest documents examined per query.
      relative_margin: a candidate scoring >= relative_margin * score(query, positive) is
        dropped as a probable false negative (1.0: only candidates scoring below the positive).
      documents: the pool to mine from; default: the distinct positives of `examples`.
      task: the task whose prompt the queries get.
    """
    pool = list(dict.fromkeys(documents if documents is not None
                              else (example.positive for example in examples)))
    encode = dict(batch_size=batch_size, show_progress=show_progress)
    query_embeddings = embedder.encode([e.query for e in examples], task=task, **encode)
    pool_embeddings = embedder.encode(pool, **encode)
    positive_embeddings = embedder.encode([e.positive for e in examples], **encode)
    positive_scores = np.sum(query_embeddings * positive_embeddings, axis=1)
    scores, ids = top_k(query_embeddings, pool_embeddings, min(candidates, len(pool)))

    mined, dropped_positive, dropped_by_margin, short = [], 0, 0, 0
    for example, positive_score, row_scores, row_ids in zip(examples, positive_scores, scores, ids):
        negatives = []
        for score, doc_id in zip(row_scores, row_ids):
            if len(negatives) == num_negatives:
                break
            if pool[doc_id] == example.positive:
                dropped_positive += 1
            elif score >= relative_margin * positive_score:
                dropped_by_margin += 1
            else:
                negatives.append(pool[doc_id])
        short += len(negatives) < num_negatives
        mined.append(dataclasses.replace(example, negatives=tuple(negatives)))
    stats = MiningStats(dropped_positive, dropped_by_margin,
                        sum(len(e.negatives) for e in mined), short)
    return mined, stats
