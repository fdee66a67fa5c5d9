"""XLA:CPU settings the `gembed` command runs with (importing gembed sets nothing), and the host
CPU features they and `gembed.model.matmul_precision` depend on.

On CPUs without bfloat16 dot instructions, where matmuls run in float32,
`--xla_cpu_experimental_ynn_fusion_type=-individual_dot` hands plain and batched matmuls to XLA's
Eigen kernels instead of YNNPACK, which made MiniLM's training step and encode faster on a 2-core
AVX2 machine (README, "Speed"). On CPUs with them (AVX512-BF16, AMX-BF16) the matmuls take
bfloat16 inputs (`ModelConfig.matmul_precision="auto"`), which YNNPACK runs fast and Eigen does not,
so nothing is added there. It is an experimental flag, and XLA aborts on flags it does not know, so
it is added only for the jaxlib versions it was tested with, only when JAX will run on the CPU,
never over a flag the user set, and not at all with GEMBED_XLA_CPU_TUNING=0. XLA reads XLA_FLAGS
when its first backend starts: the CLI calls `apply` before any JAX computation. From Python, call
`gembed.xla_cpu_flags.apply()` before the first JAX computation to get the same setting.
"""
from __future__ import annotations

import functools
import glob
import importlib.metadata
import importlib.util
import os
import pathlib
import sys
from collections.abc import MutableMapping

TUNED_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "-individual_dot"}
TESTED_JAXLIB_VERSIONS = ("0.10.2",)
OPT_OUT = "GEMBED_XLA_CPU_TUNING"


NATIVE_BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = pathlib.Path("/proc/cpuinfo")


@functools.lru_cache(maxsize=1)
def cpu_multiplies_bfloat16() -> bool:
    """Whether this host's CPU has bfloat16 dot-product instructions (Linux /proc/cpuinfo flags;
    False where that file is missing)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    return any(flag in flags for flag in NATIVE_BFLOAT16_CPU_FLAGS)


def tpu_chips_attached() -> bool:
    """libtpu installed and TPU chips attached (/dev/accel*, or /dev/vfio/N on v5e and newer)."""
    return (importlib.util.find_spec("libtpu") is not None
            and bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")))


def runs_on_cpu(environ: MutableMapping[str, str]) -> bool:
    """Whether JAX's default backend will be the CPU: JAX_PLATFORMS says so, or no GPU plugin is
    installed and no TPU is attached (libtpu alone, for compile-only plans, does not count)."""
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    gpu_plugins = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")
    return not (any(importlib.util.find_spec(name) is not None for name in gpu_plugins)
                or tpu_chips_attached())


def jaxlib_version() -> str | None:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None


def apply(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Appends each `TUNED_FLAGS` entry to environ["XLA_FLAGS"] when the conditions in the module
    docstring hold; returns whether anything may have been added."""
    if (environ.get(OPT_OUT, "1") == "0" or jaxlib_version() not in TESTED_JAXLIB_VERSIONS
            or not runs_on_cpu(environ) or cpu_multiplies_bfloat16()):
        return False
    flags = environ.get("XLA_FLAGS", "")
    for name, value in TUNED_FLAGS.items():
        if f"--{name}=" not in flags:
            flags = f"{flags} --{name}={value}".strip()
    environ["XLA_FLAGS"] = flags
    return True


def pin_cpu_platform(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Sets JAX_PLATFORMS=cpu when JAX will run on the CPU anyway (`runs_on_cpu`) and the user set
    no JAX_PLATFORMS, so an installed libtpu without chips (the `[aot]` extra) is not probed at
    startup: that probe prints libtpu warnings. Compile-only TPU plans still load libtpu through
    `jax.experimental.topologies`. JAX reads the variable when it is imported, so for os.environ
    its setting is updated too (it has effect until the first backend starts). Returns whether it
    set it."""
    if environ.get("JAX_PLATFORMS") or not runs_on_cpu(environ):
        return False
    environ["JAX_PLATFORMS"] = "cpu"
    if environ is os.environ and "jax" in sys.modules:
        sys.modules["jax"].config.update("jax_platforms", "cpu")
    return True
