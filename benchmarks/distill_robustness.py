"""stdlib_code test MRR@10 of embedding models at full size, int8-quantised and Matryoshka-cut.

int8: per dimension, the range [min, max] of 1000 stdlib_code train texts' vectors (queries and
functions) is mapped to 256 levels (sentence-transformers' `quantize_embeddings` calibration);
queries and functions are scored on the dequantised vectors. Cut: the first `dim` coordinates,
renormalised (`encode(dim=...)`). Prints one JSON line per model:
  python benchmarks/distill_robustness.py MODEL [MODEL ...]
"""
from __future__ import annotations

import json
import sys
import warnings

import numpy as np

from gembed.data.builtin import load_builtin
from gembed.evaluation import tasks
from gembed.teacher_cache import load_model

CUTS = (128, 64, 32)


class Int8Encoder:
    """Dequantised int8 vectors of an Embedder, calibrated per dimension."""

    def __init__(self, embedder, calibration: list[str]):
        self.embedder = embedder
        vectors = embedder.encode(calibration)
        self.low, self.high = vectors.min(axis=0), vectors.max(axis=0)

    def encode(self, texts, task=None, dim=None, batch_size=64, show_progress=False):
        vectors = self.embedder.encode(texts, task=task, batch_size=batch_size)
        step = np.maximum(self.high - self.low, 1e-12) / 255.0
        levels = np.clip(np.round((vectors - self.low) / step), 0, 255)   # 0..255 = int8 + 128
        restored = levels * step + self.low
        return restored / np.maximum(np.linalg.norm(restored, axis=1, keepdims=True), 1e-12)


def mrr10(encoder, dim=None) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return round(tasks.evaluate(encoder, ["stdlib_code"], dim=dim, log=lambda _: None)
                     ["stdlib_code"]["mrr@10"], 2)


def main(models: list[str]) -> None:
    train = load_builtin("stdlib_code", "train")[:500]
    calibration = [e.query for e in train] + [e.positive for e in train]
    for name in models:
        model = load_model(name)
        row = {"model": name, "full": mrr10(model), "int8": mrr10(Int8Encoder(model, calibration))}
        row.update({f"dim{cut}": mrr10(model, cut) for cut in CUTS if cut < model.embedding_size})
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
