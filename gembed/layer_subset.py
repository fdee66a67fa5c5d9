"""A smaller student initialised from a subset of a teacher's transformer layers.

`TrainConfig.init_layers = (1, 3, 5)` with a model-folder INIT_FROM keeps the folder's embeddings,
final norm, pooling and projection and only the named layers, renumbered layer_0, layer_1, ...
(DistilBERT's "every other layer" initialisation).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from gembed.errors import GembedUserError
from gembed.model import ModelConfig


def subset_config(model_config: ModelConfig, layers: Sequence[int], where: str) -> ModelConfig:
    """The student's ModelConfig: the teacher's with num_layers = len(layers)."""
    if (not layers or len(set(layers)) != len(layers)
            or not all(0 <= layer < model_config.num_layers for layer in layers)):
        raise GembedUserError(
            f"{where}: TrainConfig.init_layers={tuple(layers)} must be distinct layer indices in "
            f"0..{model_config.num_layers - 1} (the model has {model_config.num_layers}); fix it.")
    return dataclasses.replace(model_config, num_layers=len(layers))


def subset_params(params: dict[str, Any], layers: Sequence[int]) -> dict[str, Any]:
    """The teacher's params with encoder/layer_{layers[i]} renamed layer_i, other layers dropped."""
    encoder = {name: value for name, value in params["encoder"].items()
               if not name.startswith("layer_")}
    encoder.update({f"layer_{index}": params["encoder"][f"layer_{layer}"]
                    for index, layer in enumerate(layers)})
    return {**params, "encoder": encoder}
