"""Hard-negative mining (Gemini Embedding's finetuning data; NV-Retriever's positive-aware filter).

A first-round model embeds every query and a document pool (by default the distinct positives
of all examples). For each query the pool is ranked by cosine with the query's own positives
(every positive any example pairs with the same query text) left out, so rank 0 is the nearest
other document. Then:
  1. window: only ranks range_min .. range_max - 1 are candidates (skipping the top `range_min`,
     the likeliest false negatives, as sentence-transformers' `mine_hard_negatives` range_min /
     range_max, tevatron and FlagEmbedding's sampling range do; unlike sentence-transformers,
     ranks are counted before the margins below drop anything);
  2. margins against the positive's score s+ (NV-Retriever's positive-aware filters): a candidate
     scoring >= relative_margin * s+ (TopK-PercPos) or >= s+ - absolute_margin (TopK-MarginPos)
     is a probable false negative and dropped; None turns a margin off;
  3. sampling: "top" keeps the first `num_negatives` survivors, most similar first; "random" draws
     `num_negatives` of them uniformly without replacement (a NumPy generator seeded with `seed`,
     so the same inputs and seed give the same negatives), kept in rank order.

Defaults (range 0..30, relative_margin 0.95, top) are NV-Retriever's best setting, TopK-PercPos
95%, and gembed's behaviour before windows and sampling existed. Texts are embedded in chunks of
ENCODE_CHUNK, so tokenised text is never held for the whole pool at once; each distinct text is
embedded once (a positive in the pool is not embedded again).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from gembed.data.examples import Example
from gembed.errors import GembedUserError
from gembed.evaluation.search import top_k

SAMPLING = ("top", "random")
ENCODE_CHUNK = 8192   # texts per encode call


@dataclasses.dataclass(frozen=True)
class MiningStats:
    """Counts over all queries: neighbours left out by each rule, and negatives written."""

    dropped_positive: int            # the query's own positives among its nearest documents
    skipped_above_window: int        # candidates ranked above range_min
    dropped_by_margin: int           # window candidates within a margin of the positive
    negatives: int
    queries_short_of_negatives: int  # fewer than num_negatives survivors in the window


def mine_hard_negatives(embedder, examples: Sequence[Example], *, num_negatives: int = 4,
                        range_min: int = 0, range_max: int = 30, sampling: str = "top",
                        relative_margin: float | None = 0.95, absolute_margin: float | None = None,
                        seed: int = 0, documents: Sequence[str] | None = None,
                        task: str | None = None, batch_size: int = 64, show_progress: bool = False
                        ) -> tuple[list[Example], MiningStats]:
    """Examples with mined `negatives` (replacing any they had), and what was filtered.

    Args:
      embedder: anything with `encode(texts, task=None, batch_size=..., show_progress=...)`
        returning L2-normalised float32 rows (e.g. `gembed.Embedder`).
      examples: the (query, positive) pairs to mine for.
      num_negatives: negatives kept per example, at most.
      range_min, range_max: the rank window negatives come from (0 = the nearest document that
        is not one of the query's positives; range_max exclusive).
      sampling: "top" (the nearest survivors) or "random" (a seeded uniform draw of survivors).
      relative_margin: drop a candidate scoring >= relative_margin * the positive's score (1.0:
        only candidates scoring below the positive survive); None: off.
      absolute_margin: drop a candidate scoring >= the positive's score - absolute_margin; None: off.
      seed: the random draw's seed (sampling="random").
      documents: the pool to mine from; default: the distinct positives of `examples`.
      task: the task whose prompt the queries get.
    """
    _check_arguments(num_negatives, range_min, range_max, sampling)
    if not examples:
        return [], MiningStats(0, 0, 0, 0, 0)
    pool = list(dict.fromkeys(documents if documents is not None
                              else (example.positive for example in examples)))
    pool_index = {text: i for i, text in enumerate(pool)}
    positives_of: dict[str, set[int]] = {}
    for example in examples:
        if example.positive in pool_index:
            positives_of.setdefault(example.query, set()).add(pool_index[example.positive])

    encode = dict(batch_size=batch_size, show_progress=show_progress)
    pool_embeddings = _encode_in_chunks(embedder, pool, **encode)
    queries = list(dict.fromkeys(example.query for example in examples))
    query_embeddings = _encode_in_chunks(embedder, queries, task=task, **encode)
    outside_pool = list(dict.fromkeys(e.positive for e in examples if e.positive not in pool_index))
    outside_embeddings = _encode_in_chunks(embedder, outside_pool, **encode)
    outside_index = {text: i for i, text in enumerate(outside_pool)}

    most_excluded = max((len(ids) for ids in positives_of.values()), default=0)
    scores, ids = top_k(query_embeddings, pool_embeddings, min(range_max + most_excluded, len(pool)))
    query_row = {query: row for row, query in enumerate(queries)}
    rng = np.random.default_rng(seed)

    mined, dropped_positive, skipped, dropped_by_margin, short = [], 0, 0, 0, 0
    for example in examples:
        row = query_row[example.query]
        positive = (pool_embeddings[pool_index[example.positive]] if example.positive in pool_index
                    else outside_embeddings[outside_index[example.positive]])
        positive_score = float(np.dot(query_embeddings[row], positive))
        own = positives_of.get(example.query, set())
        keep = np.array([doc_id not in own for doc_id in ids[row]], bool)
        dropped_positive += int(np.sum(~keep))
        ranked_ids, ranked_scores = ids[row][keep][:range_max], scores[row][keep][:range_max]
        skipped += min(range_min, len(ranked_ids))
        window_ids, window_scores = ranked_ids[range_min:], ranked_scores[range_min:]
        survives = np.ones(len(window_ids), bool)
        if relative_margin is not None:
            survives &= window_scores < relative_margin * positive_score
        if absolute_margin is not None:
            survives &= window_scores < positive_score - absolute_margin
        dropped_by_margin += int(np.sum(~survives))
        survivors = window_ids[survives]
        if sampling == "random" and len(survivors) > num_negatives:
            chosen = np.sort(rng.choice(len(survivors), num_negatives, replace=False))
            survivors = survivors[chosen]
        negatives = tuple(pool[i] for i in survivors[:num_negatives])
        short += len(negatives) < num_negatives
        mined.append(dataclasses.replace(example, negatives=negatives))
    stats = MiningStats(dropped_positive, skipped, dropped_by_margin,
                        sum(len(e.negatives) for e in mined), short)
    return mined, stats


def _check_arguments(num_negatives: int, range_min: int, range_max: int, sampling: str) -> None:
    if num_negatives < 1:
        raise GembedUserError(f"num_negatives={num_negatives}: mine at least 1 negative per example.")
    if not 0 <= range_min < range_max:
        raise GembedUserError(f"range_min={range_min}, range_max={range_max}: the rank window needs "
                              f"0 <= range_min < range_max.")
    if sampling not in SAMPLING:
        raise GembedUserError(f"sampling={sampling!r}: use one of {', '.join(SAMPLING)}.")


def _encode_in_chunks(embedder, texts: Sequence[str], **encode_kwargs) -> np.ndarray:
    """float32[len(texts), D]: `texts` embedded ENCODE_CHUNK at a time into one array."""
    output = None
    for start in range(0, len(texts), ENCODE_CHUNK):
        chunk = np.asarray(embedder.encode(list(texts[start:start + ENCODE_CHUNK]), **encode_kwargs),
                           np.float32)
        if output is None:
            output = np.empty((len(texts), chunk.shape[1]), np.float32)
        output[start:start + len(chunk)] = chunk
    return output if output is not None else np.zeros((0, 0), np.float32)
