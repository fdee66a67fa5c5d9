"""Pair classification (MTEB PairClassificationEvaluator): is pair i a positive? Scored by the
cosine similarity of its two embeddings: average precision (main; MTEB's cosine AP, equal to its
max AP over cosine/dot/euclidean for normalised embeddings), best accuracy and best F1 over
thresholds."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from gembed.evaluation import metrics
from gembed.evaluation.context import EvalContext
from gembed.evaluation.data_files import at_least, data_path, malformed, read_json


class PairSet(NamedTuple):
    first: list[str]
    second: list[str]
    labels: list[int]


def load_cosqa_pairs(data_dir) -> PairSet:
    """CoSQA dev: 604 human-labelled (web query, Python function, 0/1) pairs."""
    path = data_path(data_dir, "cosqa", "cosqa-dev.json")
    items = read_json(path)
    if not isinstance(items, list) or not all({"doc", "code", "label"} <= set(i) for i in items):
        raise malformed(path, None, "expected a JSON list of {doc, code, label} objects")
    labels = [int(i["label"]) for i in items]
    at_least(path, min(labels.count(0), labels.count(1)), 1, "pairs of the rarer label (0 or 1)")
    return PairSet([i["doc"] for i in items], [i["code"] for i in items], labels)


def evaluate(ctx: EvalContext, data: PairSet) -> dict[str, float]:
    first = ctx.encode(data.first, task="pair_classification")
    second = ctx.encode(data.second)
    cosine = np.einsum("nd,nd->n", first, second)
    scores = metrics.best_threshold_scores(cosine, np.asarray(data.labels))
    return {"main_score": scores["ap"], "cosine_ap": scores["ap"],
            "cosine_accuracy": scores["accuracy"], "cosine_f1": scores["f1"]}
