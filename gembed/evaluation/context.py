"""What every task's run function receives."""
from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from gembed.evaluation import encoding


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """The encoder under evaluation and where the data sets are."""

    encoder: object                          # anything with the encoder protocol
    data_dir: pathlib.Path | None = None     # folder holding the public evaluation sets
    batch_size: int = 64
    dim: int | None = None                   # Matryoshka prefix to evaluate; None = full size
    seed: int = 42                           # MTEB's seed for subsampling / classifiers / k-means

    def encode(self, texts, task: str | None = None) -> np.ndarray:
        return encoding.encode(self.encoder, texts, task=task, batch_size=self.batch_size,
                               dim=self.dim)
