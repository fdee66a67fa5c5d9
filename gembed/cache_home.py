"""Where gembed keeps what it caches between runs (imported Hub models, the CPU matmul probe, the
compilation cache): $GEMBED_CACHE, else $XDG_CACHE_HOME/gembed, else ~/.cache/gembed."""
from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping


def cache_home(environ: Mapping[str, str] = os.environ) -> pathlib.Path:
    if environ.get("GEMBED_CACHE"):
        return pathlib.Path(environ["GEMBED_CACHE"])
    return pathlib.Path(environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "gembed"
