"""Where arrays live: the device mesh and the named shardings of state and batches.

All placement decisions are made here. Training is data parallel over a 1-D mesh axis "data" that
spans every device of every host: batches are split along their leading axis, parameters and
optimizer state are replicated. Because the loss is computed under `jit` on the globally sharded
embeddings, in-batch negatives span the whole global batch.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gembed.errors import GembedUserError

DATA_AXIS = "data"


def make_mesh() -> Mesh:
    """A 1-D mesh over all devices of all processes, axis name "data" (sharding left to XLA)."""
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (example) axis split over "data"; trailing axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_global_batch(batch_size: int, mesh: Mesh) -> None:
    """The global batch must split evenly over devices (and hence over hosts)."""
    devices = mesh.devices.size
    if batch_size % devices:
        raise GembedUserError(
            f"BATCH_SIZE={batch_size} does not divide over {devices} devices; "
            f"use a multiple of {devices}.")


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
