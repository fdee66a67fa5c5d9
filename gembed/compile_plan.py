"""`gembed train --compile_only`: compile a stage's train step without data and report its plan.

The stage is built as `gembed.train.train` builds it (mesh, state shardings, jitted step), for the
local devices or for a named TPU topology (`jax.experimental.topologies`, which needs libtpu: the
`aot` extra), and the step is compiled ahead of time for an abstract state and batch. The batch is
the largest the data pipeline can give: packed rows assume every text fills its own MAX_LENGTH row
(R = texts per group, rounded up to `packing.ROW_MULTIPLE`); padded batches are MAX_LENGTH long.

Memory is XLA's plan per device (`compiled.memory_analysis()`, bytes): arguments, outputs,
temporaries, and total = arguments + outputs + temporaries - aliased (the donated state's buffers
are reused for the new state). HBM per chip comes from `device.memory_stats()` where the device
reports it (a real GPU/TPU), else from HBM_BYTES by device kind; CPU plans are not checked.
"""
from __future__ import annotations

import functools
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies

from gembed import flops, gradcache, sharding
from gembed.config import StageConfig
from gembed.data.batching import FIRST_NEGATIVE_SLOT
from gembed.data.packing import ROW_MULTIPLE
from gembed.errors import GembedUserError
from gembed.model import attention
from gembed.train import (init_state, jit_train_step, make_optimizer, pack_groups,
                          state_shardings)

GIB = 2**30
# HBM per chip in bytes; the first key that is a substring of `device_kind` wins (JAX calls v5e
# "TPU v5 lite", v5p "TPU v5", v6e "TPU v6 lite").
HBM_BYTES = {
    "TPU v4": 32 * GIB, "TPU v5 lite": 16 * GIB, "TPU v5e": 16 * GIB, "TPU v5p": 95 * GIB,
    "TPU v5": 95 * GIB, "TPU v6 lite": 32 * GIB, "TPU v6e": 32 * GIB, "TPU7x": 192 * GIB,
    "H100": 80 * GIB, "H200": 141 * GIB, "A100": 80 * GIB, "B200": 180 * GIB,
}


def topology_devices(name: str) -> list:
    """The devices of TPU topology `name` (e.g. v5e:2x2, v5p:2x2x1, v6e:2x2) to compile for."""
    # compile-only use of libtpu; another process (a real TPU job) may hold its lock file
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(name, platform="tpu").devices)
    except (RuntimeError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GembedUserError(
            f"--topology={name}: no TPU topology ({reason}); install the aot extra "
            f"(pip install 'gembed[aot]') and name a topology such as v5e:2x2 or v5p:2x2x1.") from None


def hbm_bytes(device) -> int | None:
    """HBM of one device: what it reports, else HBM_BYTES by kind; None for CPUs/unknown kinds."""
    try:
        stats = device.memory_stats() or {}
    except (NotImplementedError, RuntimeError, jax.errors.JaxRuntimeError):
        stats = {}
    if "bytes_limit" in stats and device.platform != "cpu":
        return int(stats["bytes_limit"])
    return next((size for kind, size in HBM_BYTES.items()
                 if kind.lower() in device.device_kind.lower()), None)


def abstract_batch(stage: StageConfig, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The largest global batch of the stage as ShapeDtypeStructs sharded like `place_batch`."""
    config = stage.train
    slots = FIRST_NEGATIVE_SLOT + config.num_hard_negatives
    batch_sharding = sharding.batch_sharded(mesh)
    spec = functools.partial(jax.ShapeDtypeStruct, sharding=batch_sharding)
    shapes = {"text_valid": spec((config.batch_size, slots), jnp.bool_),
              "text_keys": spec((config.batch_size, slots, 2), jnp.int32)}
    if config.packing:
        groups = pack_groups(config, mesh) * jax.process_count()
        rows = math.ceil(config.batch_size * slots // groups / ROW_MULTIPLE) * ROW_MULTIPLE
        token_shape = (groups, rows, config.max_length)
        names = ("token_ids", "segment_ids", "positions")
    else:
        token_shape = (config.batch_size, slots, config.max_length)
        names = ("token_ids",)
    shapes.update({name: spec(token_shape, jnp.int32) for name in names})
    shapes["token_mask"] = spec(token_shape, jnp.bool_)
    return shapes


def compile_plan(stage: StageConfig, topology: str | None = None) -> tuple[dict, object]:
    """Compiles the stage's train step: (the plan, a JSON-ready dict; the compiled step, whose
    `as_text()` is the optimised HLO). `check_fits` judges the plan."""
    config = stage.train
    devices = topology_devices(topology) if topology else jax.devices()
    mesh = sharding.make_mesh(stage.sharding.model_parallelism, devices)
    sharding.check_global_batch(config.batch_size, mesh)
    if config.chunk_size is not None:
        gradcache.check_chunk_size(config.batch_size, config.chunk_size,
                                   mesh.shape[sharding.DATA_AXIS])
    optimizer = make_optimizer(config)
    shardings = state_shardings(stage, optimizer, mesh)
    make_state = functools.partial(init_state, stage.model, optimizer, config.seed)
    state = jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                         jax.eval_shape(make_state), shardings)   # shapes only, never values
    batch = abstract_batch(stage, mesh)
    start = time.perf_counter()
    lowered = jit_train_step(stage, optimizer, mesh, shardings).lower(state, batch)
    device = devices[0]
    compiled, planned, hbm, fits = memory_plan(lowered, device)
    seconds = time.perf_counter() - start
    model = stage.model
    texts = config.batch_size * (FIRST_NEGATIVE_SLOT + config.num_hard_negatives)
    step_flops = flops.train_flops(model, np.full(texts, config.max_length))
    plan = {
        "devices": len(devices), "device_kind": device.device_kind, "topology": topology,
        "mesh": dict(mesh.shape),
        "batch": {name: list(value.shape) for name, value in batch.items()
                  if name in ("token_ids", "text_valid")},
        "attention": attention.resolve(model.attention, device.platform, model.compute_dtype,
                                       model.effective_head_dim, config.max_length),
        "remat": model.remat, "dtype": model.dtype,
        "memory_per_device_bytes": planned, "device_memory_bytes": hbm,
        "fits": fits,
        "flops_per_step": step_flops,
        "flops_per_token": step_flops / (texts * config.max_length),
        "compile_seconds": round(seconds, 2),
    }
    return plan, compiled


def memory_plan(lowered, device) -> tuple[object | None, dict, int | None, bool | None]:
    """Compiles `lowered` for `device`: (the compiled executable, None when the compiler refused
    it; memory per device in bytes: arguments, outputs, temporaries, aliased, total = arguments +
    outputs + temporaries - aliased; the device's HBM; whether total fits it, None if unknown)."""
    hbm = hbm_bytes(device)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:   # the TPU compiler refuses plans over HBM itself
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        planned = refused_plan(str(e))
        stated_hbm = planned.pop("hbm")
        return None, planned, hbm or stated_hbm, False
    memory = compiled.memory_analysis()
    planned = {"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
               "temporaries": memory.temp_size_in_bytes, "aliased": memory.alias_size_in_bytes}
    planned["total"] = (planned["arguments"] + planned["outputs"] + planned["temporaries"]
                        - planned["aliased"])
    return compiled, planned, hbm, None if hbm is None else bool(planned["total"] <= hbm)


def refused_plan(message: str) -> dict:
    """The memory a compiler's RESOURCE_EXHAUSTED message states ("... temporaries (45.23G) exceeds
    available HBM (15.75G)"): temporaries and total (arguments unknown), bytes."""
    sizes = [float(value) * {"K": 2**10, "M": 2**20, "G": GIB}[unit]
             for value, unit in re.findall(r"\(([\d.]+)([KMG])\)", message)]
    temporaries = int(sizes[0]) if sizes else None
    return {"arguments": None, "outputs": None, "temporaries": temporaries, "aliased": None,
            "total": temporaries, "hbm": int(sizes[1]) if len(sizes) > 1 else None}


def check_fits(plan: dict, gin_files) -> None:
    """Raises the user error of a plan over its device's HBM."""
    if plan["fits"] is not False:
        return
    total, hbm = ((plan["memory_per_device_bytes"]["total"] or 0) / GIB,
                  (plan["device_memory_bytes"] or 0) / GIB)
    raise GembedUserError(
        f"{', '.join(gin_files)}: the train step plans {total:.1f} GiB per device but a "
        f"{plan['device_kind']} has {hbm:.1f} GiB; lower BATCH_SIZE or MAX_LENGTH, set "
        f"ModelConfig.remat='full', CHUNK_SIZE (gradient caching), or use more devices.")
