"""Whether bfloat16 matmul inputs are the faster path on this host's CPU, measured once per machine.

bfloat16 dot-product instructions (AVX512-BF16, AMX-BF16) do not make XLA's bfloat16 matmuls faster
on every CPU that has them: on some they run at about twice the float32 rate, on others slower than
float32 (README, "Speed"). So `ModelConfig.matmul_precision="auto"` and the MFU peak
(`gembed.flops`) ask `bfloat16_is_faster()`. On a CPU with those instructions it times one
`PROBE_SHAPE` matmul with float32 and with bfloat16 inputs (float32 sums; the best of `REPEATS`
each) and answers True when bfloat16 is at least `MIN_SPEEDUP` times faster. The answer is kept in
`cache_file()` under a key made of the CPU model, its flags, the jaxlib version and XLA_FLAGS, so
every run on a machine takes the same path (a resumed run computes as the first one did); delete
the file to measure again. Without those instructions bfloat16 is emulated: False, nothing timed.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp

from gembed import xla_cpu_flags
from gembed.cache_home import cache_home

PROBE_SHAPE = (2048, 384, 1536)   # (rows, contracted, columns): a MiniLM-sized MLP matmul
REPEATS = 5
MIN_SPEEDUP = 1.1
CACHE_FILE_NAME = "cpu_matmul_speed.json"


def cache_file() -> pathlib.Path:
    """cpu_matmul_speed.json in gembed's cache folder (`gembed.cache_home`)."""
    return cache_home() / CACHE_FILE_NAME


def machine_key() -> str:
    """What the answer depends on: the CPU (model and flags), the jaxlib version and XLA_FLAGS."""
    try:
        cpuinfo = xla_cpu_flags.CPUINFO.read_text()
    except OSError:
        cpuinfo = ""
    cpu = [line for line in cpuinfo.splitlines() if line.startswith(("model name", "flags"))][:2]
    parts = [*cpu, xla_cpu_flags.jaxlib_version() or "", os.environ.get("XLA_FLAGS", "")]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def matmul_flops(dtype, shape: tuple[int, int, int], repeats: int, device=None) -> float:
    """FLOP/s of the fastest of `repeats` x[rows, contracted] . w[contracted, columns] matmuls
    (`shape`), inputs of `dtype`, float32 sums, on `device` (None: the default device); run
    eagerly even when called while a jitted function is being traced."""
    rows, contracted, columns = shape
    matmul = jax.jit(lambda x, w: jnp.matmul(x, w, preferred_element_type=jnp.float32))
    with jax.ensure_compile_time_eval():
        x = jax.device_put(jnp.ones((rows, contracted), dtype), device)
        w = jax.device_put(jnp.ones((contracted, columns), dtype), device)
        matmul(x, w).block_until_ready()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            matmul(x, w).block_until_ready()
            best = min(best, time.perf_counter() - start)
    return 2.0 * rows * contracted * columns / best


def measure() -> dict[str, float]:
    """FLOP/s of the `PROBE_SHAPE` matmul on the first CPU device, float32 and bfloat16 inputs."""
    device = jax.devices("cpu")[0]
    return {name: matmul_flops(name, PROBE_SHAPE, REPEATS, device)
            for name in ("float32", "bfloat16")}


@functools.lru_cache(maxsize=1)
def bfloat16_is_faster() -> bool:
    """Whether this CPU runs bfloat16-input matmuls at least MIN_SPEEDUP x faster than float32
    ones (measured on first use on a machine, then read from `cache_file()`)."""
    if not xla_cpu_flags.cpu_multiplies_bfloat16():
        return False
    path, key = cache_file(), machine_key()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    if not isinstance(cached.get(key), dict) or "bfloat16_faster" not in cached[key]:
        flops = measure()
        cached[key] = {**flops, "bfloat16_faster": flops["bfloat16"] >= MIN_SPEEDUP * flops["float32"]}
        _write_quietly(path, cached)
    return bool(cached[key]["bfloat16_faster"])


def _write_quietly(path: pathlib.Path, content: dict) -> None:
    """Writes the cache atomically; an unwritable cache only means measuring again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(content, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass
