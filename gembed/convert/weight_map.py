"""`WeightMap`: takes Hugging Face tensors by name into gembed param leaves, and checks that every
tensor of the source was used (or is known to be irrelevant to embedding), so nothing is dropped
silently.
"""
from __future__ import annotations

import pathlib
import re

import numpy as np

from gembed.errors import GembedUserError


class WeightMap:
    """Float32 source tensors by name, with an optional model prefix ("bert.", "model.") stripped."""

    def __init__(self, weights: dict[str, np.ndarray], prefix: str, where: pathlib.Path):
        self.where = where
        self._weights = {name.removeprefix(prefix): value for name, value in weights.items()}
        self._used: set[str] = set()

    def tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor `name`, checked to have `shape`."""
        if name not in self._weights:
            raise GembedUserError(
                f"{self.where}: tensor {name} missing; the weights do not match config.json.")
        value = self._weights[name]
        if value.shape != shape:
            raise GembedUserError(
                f"{self.where}: tensor {name} has shape {value.shape}, config.json implies "
                f"{shape}; the weights do not match config.json.")
        self._used.add(name)
        return value

    def linear(self, name: str, in_features: int, out_features: int, bias: bool) -> dict:
        """A torch Linear `name` (weight [out, in]) as a Dense {"kernel": [in, out], "bias"}."""
        params = {"kernel": self.tensor(f"{name}.weight", (out_features, in_features)).T.copy()}
        if bias:
            params["bias"] = self.tensor(f"{name}.bias", (out_features,))
        return params

    def norm(self, name: str, features: int, bias: bool) -> dict:
        """A LayerNorm/RMSNorm `name` as {"scale", "bias"}; old BERT names are gamma/beta."""
        old_style = f"{name}.gamma" in self._weights
        params = {"scale": self.tensor(f"{name}.{'gamma' if old_style else 'weight'}", (features,))}
        if bias:
            params["bias"] = self.tensor(f"{name}.{'beta' if old_style else 'bias'}", (features,))
        return params

    def check_all_used(self, ignored: str) -> None:
        """Raises if a tensor was neither used nor matched by the `ignored` regex."""
        pattern = re.compile(ignored)
        unused = sorted(name for name in self._weights
                        if name not in self._used and not pattern.fullmatch(name))
        if unused:
            raise GembedUserError(
                f"{self.where}: tensors {', '.join(unused[:3])}{' ...' if len(unused) > 3 else ''} "
                f"are not part of a supported architecture; the importer cannot map them.")
