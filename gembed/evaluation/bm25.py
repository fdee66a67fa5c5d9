"""The lexical BM25 baseline (`gembed eval --model=bm25`): a ranker, not an encoder.

Scores are Lucene's BM25 (as Elasticsearch, which gave BEIR's published BM25 numbers): for query
terms t, sum of idf(t) * tf / (tf + k1 * (1 - b + b * |d| / avgdl)) with
idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5)), k1 = 1.2, b = 0.75 (Lucene's defaults); a term
repeated in the query counts once per repeat. The index and scoring are `bm25s`'s.

Tokens, the same for queries and documents and for text and code: each word (a `\\w+` run) is
split at underscores, where a lower-case letter or digit meets an upper-case one, and before the
last capital of a capital run; the pieces, and the whole word when it has several, are
lower-cased (`parse_HTTPResponse2` -> parse, http, response2, parse_httpresponse2); one-character
pieces and English stopwords are dropped and the rest stemmed (Snowball English, PyStemmer). So a
natural-language query meets `get_file_name` and `getFileName` as "get file name", and a query
naming the identifier matches it whole. Chosen on `stdlib_code:validation` over plain words and
over pieces without the whole word.

Ranking as the embedding ranker does it: ties keep the lower document index first (top k), and
a gold document's rank counts every document scoring at least as high (pessimistic ties).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import re
from typing import Sequence

import bm25s
import numpy as np
import Stemmer
from bm25s.stopwords import STOPWORDS_EN

K1 = 1.2
B = 0.75
WORD = re.compile(r"\w+")
ALPHANUMERIC_RUN = re.compile(r"[^\W_]+")
CASE_CHANGE = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


STOPWORDS = frozenset(STOPWORDS_EN)


@functools.lru_cache(maxsize=1)
def _stemmer() -> Stemmer.Stemmer:
    return Stemmer.Stemmer("english")


def identifier_pieces(word: str) -> list[str]:
    """The lower-cased pieces of a word: "getHTTPResponse_v2" -> get, http, response, v2 (case
    changes are ASCII ones; other letters stay inside their piece)."""
    return [piece.lower() for run in ALPHANUMERIC_RUN.findall(word)
            for piece in CASE_CHANGE.split(run)]


def tokenize(text: str) -> list[str]:
    """The BM25 terms of `text`: each word's pieces (and the whole word, if split), without
    stopwords and one-character pieces, stemmed."""
    return [term for word in WORD.findall(text) for term in _word_terms(word)]


@functools.lru_cache(maxsize=1 << 18)
def _word_terms(word: str) -> tuple[str, ...]:
    """The terms of one word (cached: a corpus repeats few distinct words many times)."""
    pieces = identifier_pieces(word)
    if len(pieces) > 1:
        pieces.append(word.lower())
    stopwords = STOPWORDS
    return tuple(_stemmer().stemWords([piece for piece in pieces
                                       if len(piece) > 1 and piece not in stopwords]))


class BM25:
    """Ranks documents for queries by BM25; the `--model=bm25` of `gembed eval`.

    Implements the ranker interface of `gembed.evaluation.ranking` (top_k, gold_ranks); `task`
    is accepted for that interface and ignored: one tokenizer serves text and code.
    """

    name = "bm25"

    def __init__(self, k1: float = K1, b: float = B):
        self.k1, self.b = k1, b

    def scores(self, queries: Sequence[str], documents: Sequence[str]):
        """Yields float32[len(documents)]: the BM25 scores of each query against `documents`."""
        index = bm25s.BM25(k1=self.k1, b=self.b, method="lucene")
        with _quiet_bm25s():   # its index build logs at DEBUG, which a root handler may print
            index.index([tokenize(text) for text in documents], show_progress=False)
        for query in queries:
            ids = index.get_tokens_ids(tokenize(query))
            yield (index.get_scores_from_ids(ids) if ids
                   else np.zeros(len(documents), np.float32))

    def top_k(self, queries: Sequence[str], documents: Sequence[str], k: int,
              task: str | None = None) -> np.ndarray:
        """int[len(queries), min(k, len(documents))]: document indices, best first."""
        k = min(k, len(documents))
        return np.array([_top_k_row(row, k) for row in self.scores(queries, documents)],
                        np.int64).reshape(len(queries), k)

    def gold_ranks(self, queries: Sequence[str], documents: Sequence[str], gold: Sequence[int],
                   task: str | None = None) -> np.ndarray:
        """int[len(queries)]: 1-based rank of document gold[i] for query i, ties ranked first."""
        return np.array([int(np.sum(row >= row[g])) for row, g in
                         zip(self.scores(queries, documents), gold)], np.int64)


def _top_k_row(scores: np.ndarray, k: int) -> np.ndarray:
    """The indices of the k highest scores, best first, ties by lower index (O(n) selection)."""
    if k < len(scores):
        threshold = np.partition(scores, len(scores) - k)[len(scores) - k]
        candidates = np.flatnonzero(scores >= threshold)
    else:
        candidates = np.arange(len(scores))
    return candidates[np.argsort(-scores[candidates], kind="stable")][:k]


@contextlib.contextmanager
def _quiet_bm25s():
    logger = logging.getLogger("bm25s")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
