"""Where arrays live: the device mesh and the named shardings of state and batches.

All placement decisions are made here. The mesh has two axes over every device of every host:
"data" (batches split along their leading axis; in-batch negatives span the whole global batch
because the loss is computed under `jit` on the globally sharded embeddings) and "model"
(`ShardingConfig.model_parallelism` devices, 1 by default). Parameters and optimizer state are
replicated unless `ShardingConfig.param_rules` shard them: regex rules over "/"-joined leaf names
give FSDP (a weight dimension split over "data") and tensor parallelism (over "model").
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import gin
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gembed.errors import GembedUserError

DATA_AXIS = "data"
MODEL_AXIS = "model"
AXES = (DATA_AXIS, MODEL_AXIS)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ShardingConfig:
    """How the train state is laid out over the mesh (experiments/configs/sharding/fsdp.gin).

    `param_rules`: `(regex, spec)` pairs; the first regex found (`re.search`) in a leaf's
    "/"-joined name gives its PartitionSpec entries, one per dimension: None, "data", "model" or a
    tuple of both. Leaves no rule matches are replicated. Optimizer-state leaves end with the name of
    the param they track (".../mu/encoder/layer_0/mlp/up/kernel"), so one rule covers both.
    """

    model_parallelism: int = 1      # devices along the "model" axis; "data" takes the rest
    param_rules: tuple[tuple[str, tuple], ...] = ()   # () = pure data parallel

    def __post_init__(self):
        rules = tuple((pattern, tuple(spec)) for pattern, spec in self.param_rules)
        object.__setattr__(self, "param_rules", rules)
        if self.model_parallelism < 1:
            raise GembedUserError(f"ShardingConfig.model_parallelism={self.model_parallelism} must "
                                  f"be >= 1; fix the binding.")
        for pattern, spec in rules:
            try:
                re.compile(pattern)
            except re.error as e:
                raise GembedUserError(f"ShardingConfig.param_rules: {pattern!r} is not a valid "
                                      f"regex ({e}); fix the rule.") from None
            for entry in spec:
                names = entry if isinstance(entry, tuple) else (entry,)
                if any(name is not None and name not in AXES for name in names):
                    raise GembedUserError(
                        f"ShardingConfig.param_rules: rule {pattern!r} has spec {spec!r}; entries "
                        f"must be None, {AXES[0]!r}, {AXES[1]!r} or a tuple of them.")


def make_mesh(model_parallelism: int = 1, devices=None) -> Mesh:
    """A ("data", "model") mesh over `devices` (default: all devices of all processes; sharding
    left to XLA)."""
    device_list = devices
    devices = jax.device_count() if device_list is None else len(device_list)
    if devices % model_parallelism:
        raise GembedUserError(
            f"ShardingConfig.model_parallelism={model_parallelism} does not divide the "
            f"{devices} devices; use a divisor of {devices}.")
    return jax.make_mesh((devices // model_parallelism, model_parallelism), AXES,
                         axis_types=(AxisType.Auto, AxisType.Auto), devices=device_list)


def leaf_name(path) -> str:
    """The "/"-joined name of a pytree leaf from its key path (dict keys, attributes, indices)."""
    return "/".join(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))
                    for key in path)


def leaf_spec(name: str, shape: tuple[int, ...], rules, axis_sizes: dict[str, int]) -> PartitionSpec:
    """The PartitionSpec the first matching rule gives a leaf, checked against its shape."""
    for pattern, spec in rules:
        if not re.search(pattern, name):
            continue
        if len(spec) > len(shape):
            raise GembedUserError(
                f"ShardingConfig.param_rules: rule {pattern!r} gives {len(spec)} dimensions to "
                f"{name} of shape {shape}; make the rule match only rank-{len(spec)} leaves.")
        for dim, (size, entry) in enumerate(zip(shape, spec)):
            names = entry if isinstance(entry, tuple) else (entry,)
            parts = math.prod(axis_sizes[n] for n in names if n is not None)
            if size % parts:
                raise GembedUserError(
                    f"ShardingConfig.param_rules: rule {pattern!r} splits dimension {dim} of {name} "
                    f"(shape {shape}) into {parts} parts; change the rule or the mesh.")
        return PartitionSpec(*spec)
    return PartitionSpec()


def tree_specs(tree: Any, rules, axis_sizes: dict[str, int]) -> Any:
    """PartitionSpecs for every leaf of `tree` (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf_spec(leaf_name(path), leaf.shape, rules, axis_sizes), tree)


def tree_shardings(tree: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for every leaf of `tree` on `mesh` by `rules`."""
    specs = tree_specs(tree, rules, dict(mesh.shape))
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def put(tree: Any, shardings: Any) -> Any:
    """Host arrays (identical on every process) placed as global arrays with `shardings`."""
    def place(value, sharding):
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
    return jax.tree.map(place, tree, shardings)


def constrain_rows(x: jax.Array) -> jax.Array:
    """x with its leading (row) axis split over "data" of the abstract mesh being traced under,
    so that XLA keeps activations batch-sharded (not split by the FSDP-sharded weights' width);
    unchanged without such a mesh, inside a shard_map, or when the rows do not divide."""
    mesh = jax.sharding.get_abstract_mesh()
    if (mesh.empty or DATA_AXIS not in mesh.axis_names or mesh.manual_axes
            or x.shape[0] % mesh.shape[DATA_AXIS]):
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (example) axis split over "data"; trailing axes whole (and whole on "model")."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_global_batch(batch_size: int, mesh: Mesh) -> None:
    """The global batch must split evenly over the data axis and over hosts."""
    parts = mesh.shape[DATA_AXIS]
    if batch_size % parts or batch_size % jax.process_count():
        parts = math.lcm(parts, jax.process_count())
        raise GembedUserError(
            f"BATCH_SIZE={batch_size} does not divide over {parts} data-parallel shards; "
            f"use a multiple of {parts}.")


def host_slice(batch_size: int) -> slice:
    """The rows of the global batch this process loads (contiguous, in process order)."""
    per_host = batch_size // jax.process_count()
    start = jax.process_index() * per_host
    return slice(start, start + per_host)


def place_batch(host_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's rows into global arrays sharded along the leading axis."""
    sharding = batch_sharded(mesh)
    return {name: jax.make_array_from_process_local_data(sharding, value)
            for name, value in host_batch.items()}
