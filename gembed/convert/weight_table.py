"""`Family`: one declarative table per transformers architecture that maps gembed encoder params
to Hugging Face tensor names, and drives both `gembed import` and the transformers export.

A table row maps a gembed module path (`layer_{i}` standing for every block) to the transformers
module name. Leaf names follow from the kind of layer: Dense `kernel` [in, out] <-> Linear
`weight` [out, in] (transposed), Norm `scale` <-> `weight`, Embed `embedding` <-> `weight`,
`bias` <-> `bias`. Which leaves exist and their shapes come from the gembed model itself, so a new
layer needs one row, and a new family a table plus its config.json mapping.
"""
from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from gembed.convert.weight_map import WeightMap
from gembed.model import ModelConfig, init_params

LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
BLOCK = re.compile(r"layer_(\d+)/")
ENCODER = "encoder/"


@dataclasses.dataclass(frozen=True)
class Family:
    """An architecture family of transformers (one `model_type`) as gembed reads and writes it.

    `model_config(config, tensors, attention, pooling, where)`: the gembed architecture of a
    config.json (`tensors`: the source's, prefix stripped; `attention`: None, 'causal' or
    'bidirectional', None meaning what config.json says); `hf_config(model_config)`: the
    config.json fields of a gembed architecture (the inverse); `constant_tensors`: tensors the
    transformers class expects that gembed has no use for (written on export, ignored on import).
    """

    model_type: str
    architecture: str                 # the transformers base-model class (AutoModel loads it)
    modules: Mapping[str, str]        # gembed module path -> transformers module name
    prefix: str                       # the task-model prefix a source may carry ("bert.", "model.")
    ignored: str                      # regex of source tensors that play no part in embedding
    default_pooling: str
    model_config: Callable[..., ModelConfig]
    hf_config: Callable[[ModelConfig], dict[str, Any]]
    constant_tensors: Callable[[ModelConfig], dict[str, np.ndarray]] = lambda model_config: {}

    def row(self, param: str) -> tuple[str, str]:
        """(table row, block index or "") of an encoder param ("layer_3/mlp/up/kernel")."""
        module = param.rsplit("/", 1)[0]
        block = BLOCK.match(module + "/")
        if block is None:
            return module, ""
        return BLOCK.sub("layer_{i}/", module + "/", count=1)[:-1], block.group(1)

    def has_row(self, param: str) -> bool:
        """Whether the table maps this encoder param."""
        return self.row(param)[0] in self.modules

    def tensor_name(self, param: str) -> str:
        """The transformers tensor of an encoder param ("layer_3/mlp/up/kernel" -> "...weight")."""
        row, block = self.row(param)
        return f"{self.modules[row].format(i=block)}.{LEAVES[param.rsplit('/', 1)[1]]}"

    def source_tensors(self, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The source's tensors with the task-model prefix (if it has one) removed."""
        if any(name.startswith(self.prefix) for name in weights):
            return {name.removeprefix(self.prefix): value for name, value in weights.items()}
        return dict(weights)


def encoder_shapes(model_config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{encoder param name (without "encoder/"): shape} of the gembed model."""
    abstract = jax.eval_shape(lambda: init_params(model_config, jax.random.PRNGKey(0)))
    return {name.removeprefix(ENCODER): tuple(leaf.shape)
            for name, leaf in traverse_util.flatten_dict(abstract, sep="/").items()
            if name.startswith(ENCODER)}


def import_encoder(family: Family, tensors: dict[str, np.ndarray], model_config: ModelConfig,
                   where: pathlib.Path) -> dict[str, Any]:
    """The gembed `encoder` params (nested) from the source's tensors (prefix stripped).

    Raises a GembedUserError naming `where` when a tensor is missing, misshapen, or left over.
    """
    source = WeightMap(tensors, where)
    flat = {}
    for param, shape in encoder_shapes(model_config).items():
        name = family.tensor_name(param)
        if param.endswith("/kernel"):
            flat[param] = np.ascontiguousarray(source.tensor(name, shape[::-1]).T)
        else:
            flat[param] = source.tensor(name, shape)
    source.check_all_used(family.ignored)
    return traverse_util.unflatten_dict(flat, sep="/")


def export_encoder(family: Family, encoder_params: Any, model_config: ModelConfig
                   ) -> dict[str, np.ndarray]:
    """{transformers tensor name: float32 array} of gembed `encoder` params, kernels as [out, in]."""
    tensors = {}
    for param, value in traverse_util.flatten_dict(encoder_params, sep="/").items():
        value = np.asarray(value, np.float32)
        tensors[family.tensor_name(param)] = np.ascontiguousarray(
            value.T if param.endswith("/kernel") else value)
    return {**tensors, **family.constant_tensors(model_config)}
