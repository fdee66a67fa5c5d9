"""Where gembed keeps what it caches between runs (imported Hub models, the CPU matmul probe):
$GEMBED_CACHE, else $XDG_CACHE_HOME/gembed, else ~/.cache/gembed."""
from __future__ import annotations

import os
import pathlib


def cache_home() -> pathlib.Path:
    if os.environ.get("GEMBED_CACHE"):
        return pathlib.Path(os.environ["GEMBED_CACHE"])
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "gembed"
