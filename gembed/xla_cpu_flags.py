"""XLA:CPU settings gembed runs with, added to XLA_FLAGS when gembed is imported.

`--xla_cpu_experimental_ynn_fusion_type=-individual_dot` hands plain and batched matmuls to
XLA's Eigen kernels instead of YNNPACK: MiniLM's training step is 5-10% faster with it on a
2-core AMD EPYC (paired runs of the train step), and the other
YNNPACK fusions stay on. The flag is known to jaxlib 0.10.2, the version setup.py pins.

A flag already present in XLA_FLAGS is left as the user set it. XLA reads XLA_FLAGS when its
first backend starts, so this has no effect in a process that ran JAX computations before
importing gembed.
"""
from __future__ import annotations

import os
from collections.abc import MutableMapping

TUNED_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "-individual_dot"}


def add_tuned_flags(environ: MutableMapping[str, str] = os.environ) -> None:
    """Appends each `TUNED_FLAGS` entry to environ["XLA_FLAGS"] unless that flag is set there."""
    flags = environ.get("XLA_FLAGS", "")
    for name, value in TUNED_FLAGS.items():
        if f"--{name}=" not in flags:
            flags = f"{flags} --{name}={value}".strip()
    environ["XLA_FLAGS"] = flags
