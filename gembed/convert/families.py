"""The architecture families gembed imports and exports, and choosing one.

Import picks the family by config.json's `model_type`. Export picks the first family whose
config.json, read back by the importer, gives the model's own architecture, so an export can
only name a transformers class that computes what gembed computes.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import numpy as np
from flax import traverse_util

from gembed.convert import bert, decoder
from gembed.convert.weight_table import Family, export_encoder
from gembed.errors import GembedUserError
from gembed.model import ModelConfig

FAMILIES = (bert.BERT, bert.MEGATRON_BERT, *decoder.FAMILIES)
# Not architecture: the head (pooling, projection, Matryoshka sizes) and training-only choices.
NOT_ARCHITECTURE = ("pooling", "projection_dim", "projection_bias", "output_sizes",
                    "initial_temperature", "dtype", "dropout_rate")


def family_of(model_type: str | None, where: pathlib.Path) -> Family:
    """The family of a config.json `model_type`."""
    for family in FAMILIES:
        if family.model_type == model_type:
            return family
    raise GembedUserError(
        f"{where}: model_type {model_type!r} is not supported; supported: "
        f"{', '.join(family.model_type for family in FAMILIES)}.")


def architecture(model: ModelConfig) -> dict[str, Any]:
    """The fields of `model` that decide the encoder's function, unset defaults made explicit."""
    fields = dataclasses.asdict(model)
    fields |= {"num_kv_heads": model.effective_num_kv_heads, "head_dim": model.effective_head_dim,
               "qkv_bias": model.effective_qkv_bias}
    return {name: value for name, value in fields.items() if name not in NOT_ARCHITECTURE}


def to_transformers(model: ModelConfig, encoder_params: Any, where: pathlib.Path
                    ) -> tuple[Family, dict[str, Any], dict[str, np.ndarray]]:
    """(family, config.json fields, {tensor name: float32 array}) of a gembed encoder.

    Raises a GembedUserError naming the nearest family's differing fields when no transformers
    class computes this architecture (nearest: fewest differences among the families that have a
    tensor for every param, else among all).
    """
    wanted = architecture(model)
    params = list(traverse_util.flatten_dict(encoder_params, sep="/"))
    differences, unmapped_families = {}, set()
    for family in FAMILIES:
        unmapped = [param for param in params if not family.has_row(param)]
        if unmapped:
            differences[family.architecture] = [f"no tensor for {', '.join(unmapped[:2])}"]
            unmapped_families.add(family.architecture)
            continue
        config = family.hf_config(model)
        tensors = export_encoder(family, encoder_params, model)
        try:
            read_back = architecture(family.model_config(
                config, tensors, attention=None, pooling=model.pooling, where=where))
        except GembedUserError as e:
            differences[family.architecture] = [str(e)]
            continue
        differing = [f"{name}={wanted[name]!r} (the family has {read_back[name]!r})"
                     for name in wanted if wanted[name] != read_back[name]]
        if not differing:
            return family, config, tensors
        differences[family.architecture] = differing
    nearest = min(differences, key=lambda name: (name in unmapped_families, len(differences[name])))
    raise GembedUserError(
        f"{where}: no transformers architecture computes this model; the nearest, {nearest}, "
        f"differs in {'; '.join(differences[nearest])}. Export with --format=gembed instead.")
