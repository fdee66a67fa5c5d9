"""`WeightMap`: takes Hugging Face tensors by name into gembed param leaves, and checks that every
tensor of the source was used (or is known to be irrelevant to embedding), so nothing is dropped
silently.
"""
from __future__ import annotations

import pathlib
import re

import numpy as np

from gembed.errors import GembedUserError

# Old (TensorFlow-converted) BERT checkpoints name LayerNorm params gamma/beta.
LEGACY_NORM_NAMES = {".weight": ".gamma", ".bias": ".beta"}


class WeightMap:
    """Float32 source tensors by name; `where` names the source in errors."""

    def __init__(self, weights: dict[str, np.ndarray], where: pathlib.Path):
        self.where = where
        self._weights = weights
        self._used: set[str] = set()

    def tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor `name` (or its legacy gamma/beta name), checked to have `shape`."""
        if name not in self._weights:
            suffix = next((s for s in LEGACY_NORM_NAMES if name.endswith(s)), None)
            legacy = suffix and name.removesuffix(suffix) + LEGACY_NORM_NAMES[suffix]
            if legacy not in self._weights:
                raise GembedUserError(
                    f"{self.where}: tensor {name} missing; the weights do not match config.json.")
            name = legacy
        value = self._weights[name]
        if value.shape != shape:
            raise GembedUserError(
                f"{self.where}: tensor {name} has shape {value.shape}, config.json implies "
                f"{shape}; the weights do not match config.json.")
        self._used.add(name)
        return value

    def check_all_used(self, ignored: str) -> None:
        """Raises if a tensor was neither used nor matched by the `ignored` regex."""
        pattern = re.compile(ignored)
        unused = sorted(name for name in self._weights
                        if name not in self._used and not pattern.fullmatch(name))
        if unused:
            raise GembedUserError(
                f"{self.where}: tensors {', '.join(unused[:3])}{' ...' if len(unused) > 3 else ''} "
                f"are not part of a supported architecture; the importer cannot map them.")
