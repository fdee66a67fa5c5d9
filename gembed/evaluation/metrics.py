"""Metric functions, each on a 0-100 scale, defined as MTEB / BEIR / SentEval define them.

Library implementations are used wherever one matches the published definition (scipy's Spearman,
scikit-learn's accuracy, F1, average precision and V-measure). Ranking metrics over top-k lists
(nDCG@k, Recall@k, MRR@k) are written here because scikit-learn's `ndcg_score` needs a dense
[queries, corpus] relevance matrix and breaks score ties differently from trec_eval; their tests
check them against `sklearn.metrics.ndcg_score` (untied scores) and hand-computed cases.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from scipy import stats
from sklearn import metrics as skm


def spearman(predicted: Sequence[float], gold: Sequence[float]) -> float:
    """Spearman rank correlation x100 (scipy; ties get average ranks)."""
    return 100.0 * float(stats.spearmanr(predicted, gold).statistic)


def pearson(predicted: Sequence[float], gold: Sequence[float]) -> float:
    return 100.0 * float(stats.pearsonr(predicted, gold).statistic)


def ndcg_at_k(ranked: Sequence, relevance: Mapping, k: int = 10) -> float:
    """nDCG@k of one ranked list, as pytrec_eval's `ndcg_cut_k` (BEIR, MTEB): gain = the graded
    relevance itself (not 2^rel - 1), discount 1/log2(rank + 1), and the ideal DCG taken over all
    judged documents with relevance > 0 (not only the retrieved ones). x100."""
    gains = [relevance.get(doc, 0) for doc in ranked[:k]]
    dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains) if g > 0)
    ideal = sorted((r for r in relevance.values() if r > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return 100.0 * dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranked: Sequence, relevance: Mapping, k: int) -> float:
    """Fraction (x100) of the relevant documents (relevance > 0) found in the top k (BEIR)."""
    relevant = {doc for doc, r in relevance.items() if r > 0}
    if not relevant:
        return 0.0
    return 100.0 * len(relevant.intersection(ranked[:k])) / len(relevant)


def mrr_at_k(ranked: Sequence, relevance: Mapping, k: int = 10) -> float:
    """Reciprocal rank (x100) of the first relevant document within the top k, else 0."""
    for i, doc in enumerate(ranked[:k]):
        if relevance.get(doc, 0) > 0:
            return 100.0 / (i + 1)
    return 0.0


def retrieval_scores(rankings: Mapping[str, Sequence], qrels: Mapping[str, Mapping[str, int]],
                     ks: Sequence[int] = (1, 3, 5, 10, 100)) -> dict[str, float]:
    """Means over the queries of `qrels` of nDCG@k, Recall@k (each k) and MRR@10; main = nDCG@10."""
    queries = [q for q in qrels if any(r > 0 for r in qrels[q].values())]
    scores: dict[str, float] = {}
    for k in ks:
        scores[f"ndcg@{k}"] = float(np.mean([ndcg_at_k(rankings[q], qrels[q], k) for q in queries]))
    for k in ks:
        scores[f"recall@{k}"] = float(np.mean([recall_at_k(rankings[q], qrels[q], k) for q in queries]))
    scores["mrr@10"] = float(np.mean([mrr_at_k(rankings[q], qrels[q], 10) for q in queries]))
    return {"main_score": scores["ndcg@10"], **scores}


def gold_rank_scores(ranks: np.ndarray) -> dict[str, float]:
    """Code-search metrics from the 1-based rank of each query's single gold document.

    `mrr` is the mean reciprocal rank over the full ranking, as CodeSearchNet / CodeXGLUE / CoSQA
    report it (main score); `mrr@10` truncates it at 10 as MS MARCO does.
    """
    ranks = np.asarray(ranks, np.float64)
    return {"main_score": 100.0 * float(np.mean(1.0 / ranks)),
            "mrr": 100.0 * float(np.mean(1.0 / ranks)),
            "mrr@10": 100.0 * float(np.mean(np.where(ranks <= 10, 1.0 / ranks, 0.0))),
            "recall@1": 100.0 * float(np.mean(ranks <= 1)),
            "recall@10": 100.0 * float(np.mean(ranks <= 10))}


def classification_scores(gold: Sequence, predicted: Sequence) -> dict[str, float]:
    """Accuracy, macro F1 (and binary AP) x100, as MTEB's classification tasks report them."""
    scores = {"accuracy": 100.0 * skm.accuracy_score(gold, predicted),
              "f1": 100.0 * skm.f1_score(gold, predicted, average="macro"),
              "f1_weighted": 100.0 * skm.f1_score(gold, predicted, average="weighted")}
    classes = np.unique(gold)
    if len(classes) == 2:   # MTEB: AP of the hard predictions, the larger label positive
        scores["ap"] = 100.0 * skm.average_precision_score(np.asarray(gold) == classes[1],
                                                           np.asarray(predicted) == classes[1])
    return scores


def bitext_scores(predicted: Sequence[int]) -> dict[str, float]:
    """Bitext mining: sentence i's gold translation is i; `predicted[i]` its nearest neighbour.

    Accuracy and the support-weighted precision / recall / F1 of MTEB's BitextMiningEvaluator.
    """
    gold = np.arange(len(predicted))
    return {"accuracy": 100.0 * skm.accuracy_score(gold, predicted),
            "precision": 100.0 * skm.precision_score(gold, predicted, average="weighted", zero_division=0),
            "recall": 100.0 * skm.recall_score(gold, predicted, average="weighted", zero_division=0),
            "f1": 100.0 * skm.f1_score(gold, predicted, average="weighted", zero_division=0)}


def best_threshold_scores(similarities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Pair classification on one similarity: average precision, and the best accuracy and F1 over
    all thresholds (as MTEB's PairClassificationEvaluator). x100."""
    similarities = np.asarray(similarities, np.float64)
    labels = np.asarray(labels).astype(int)
    order = np.argsort(-similarities, kind="stable")
    sorted_labels, sorted_sims = labels[order], similarities[order]
    positives = labels.sum()
    # Predict positive for the top n pairs, n = 0..N; only cut between distinct similarities.
    true_pos = np.concatenate([[0], np.cumsum(sorted_labels)])
    n = np.arange(len(labels) + 1)
    cut_ok = np.concatenate([[True], sorted_sims[:-1] != sorted_sims[1:], [True]])
    true_neg = (len(labels) - positives) - (n - true_pos)
    accuracy = np.where(cut_ok, (true_pos + true_neg) / len(labels), 0.0)
    precision = np.divide(true_pos, n, out=np.zeros(len(n)), where=n > 0)
    recall = true_pos / max(positives, 1)
    f1 = np.divide(2 * precision * recall, precision + recall,
                   out=np.zeros(len(n)), where=(precision + recall) > 0)
    f1 = np.where(cut_ok, f1, 0.0)
    return {"ap": 100.0 * skm.average_precision_score(labels, similarities),
            "accuracy": 100.0 * float(accuracy.max()),
            "f1": 100.0 * float(f1.max())}


def v_measure(gold: Sequence, predicted: Sequence) -> float:
    return 100.0 * float(skm.v_measure_score(gold, predicted))
