"""Clustering (MTEB ClusteringEvaluator): MiniBatchKMeans(k = number of gold labels,
batch_size=500, n_init="auto", random_state=42) on the embeddings of each fixed set of texts;
V-measure against the gold labels, averaged over the sets. Main score: V-measure."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
from sklearn.cluster import MiniBatchKMeans

from gembed.evaluation import metrics
from gembed.evaluation.context import EvalContext

CLUSTERING_BATCH_SIZE = 500


class ClusteringSet(NamedTuple):
    sets: list[tuple[list[str], list]]       # (texts, gold labels) per fixed subset


def cluster_v_measure(embeddings: np.ndarray, labels: Sequence, seed: int) -> float:
    kmeans = MiniBatchKMeans(n_clusters=len(set(labels)), batch_size=CLUSTERING_BATCH_SIZE,
                             n_init="auto", random_state=seed)
    return metrics.v_measure(labels, kmeans.fit_predict(embeddings))


def evaluate(ctx: EvalContext, data: ClusteringSet) -> dict[str, float]:
    scores = [cluster_v_measure(ctx.encode(texts, task="clustering"), labels, ctx.seed)
              for texts, labels in data.sets]
    mean = float(np.mean(scores))
    return {"main_score": mean, "v_measure": mean, "v_measure_std": float(np.std(scores))}
