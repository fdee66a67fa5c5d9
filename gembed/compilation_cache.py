"""The persistent XLA compilation cache the `gembed` command uses (importing gembed sets nothing).

A compiled train step or encoder shape is written to disk once and read back by later processes
(the next stage of a recipe, a resumed run, the next `gembed encode`), which skips most of JAX's
compile time on repeated runs. The folder is JAX_COMPILATION_CACHE_DIR when set, else jax/ in
gembed's cache folder (`gembed.cache_home`: $GEMBED_CACHE, else $XDG_CACHE_HOME/gembed, default
~/.cache/gembed); GEMBED_COMPILATION_CACHE=0 turns it off.

It stays off where XLA:CPU runs collectives: several CPU devices in one process
(--xla_force_host_platform_device_count > 1) or CPU processes joined by jax.distributed. With
jaxlib 0.10.2 an XLA:CPU executable read back from the cache can issue its collectives in a
different order on different devices (one waits in all-gather, another in all-to-all) and aborts
after XLA's 40 s rendezvous timeout; compiling afresh does not.
"""
from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Mapping

import jax

from gembed import xla_cpu_flags
from gembed.cache_home import cache_home

OPT_OUT = "GEMBED_COMPILATION_CACHE"


def cache_dir(environ: Mapping[str, str] = os.environ) -> pathlib.Path | None:
    """Where compiled executables go, or None when the cache is turned off."""
    if environ.get(OPT_OUT, "1") == "0":
        return None
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return pathlib.Path(environ["JAX_COMPILATION_CACHE_DIR"])
    return cache_home(environ) / "jax"


def forced_cpu_device_count(environ: Mapping[str, str]) -> int:
    """The CPU device count XLA_FLAGS asks for (--xla_force_host_platform_device_count), else 1."""
    match = re.search(r"--xla_force_host_platform_device_count=(\d+)", environ.get("XLA_FLAGS", ""))
    return int(match.group(1)) if match else 1


def enable(environ: Mapping[str, str] = os.environ) -> pathlib.Path | None:
    """Points JAX's persistent compilation cache at `cache_dir`; returns it (None: off, also when
    JAX runs on several CPU devices in this process: see the module docstring)."""
    if xla_cpu_flags.runs_on_cpu(dict(environ)) and forced_cpu_device_count(environ) > 1:
        return None
    path = cache_dir(environ)
    if path is not None:
        jax.config.update("jax_compilation_cache_dir", str(path))
    return path


def disable_for_cpu_collectives() -> None:
    """Turns the cache off for this process; call before the first compile of a CPU process that
    joins others through jax.distributed (see the module docstring)."""
    jax.config.update("jax_enable_compilation_cache", False)
