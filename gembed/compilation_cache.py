"""The persistent XLA compilation cache the `gembed` command uses (importing gembed sets nothing).

A compiled train step or encoder shape is written to disk once and read back by later processes
(the next stage of a recipe, a resumed run, the next `gembed encode`), which skips most of JAX's
compile time on repeated runs. The folder is JAX_COMPILATION_CACHE_DIR when set, else
$XDG_CACHE_HOME/gembed/jax (default ~/.cache/gembed/jax); GEMBED_COMPILATION_CACHE=0 turns it off.
"""
from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping

import jax

OPT_OUT = "GEMBED_COMPILATION_CACHE"


def cache_dir(environ: Mapping[str, str] = os.environ) -> pathlib.Path | None:
    """Where compiled executables go, or None when the cache is turned off."""
    if environ.get(OPT_OUT, "1") == "0":
        return None
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return pathlib.Path(environ["JAX_COMPILATION_CACHE_DIR"])
    base = environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "gembed" / "jax"


def enable(environ: Mapping[str, str] = os.environ) -> pathlib.Path | None:
    """Points JAX's persistent compilation cache at `cache_dir`; returns it (None: off)."""
    path = cache_dir(environ)
    if path is not None:
        jax.config.update("jax_compilation_cache_dir", str(path))
    return path
