"""Preemption: a SIGTERM (SLURM's time limit, Kubernetes, spot and preemptible VMs) makes training
save the step it has reached and stop, so that rerunning the same command resumes there.

`notice()` yields `reached(step) -> bool`, which the loop asks after each step. One process: a
SIGTERM handler that only records the notice. Many processes: JAX's preemption service (started by
`jax.distributed.initialize`) owns SIGTERM and `reached` is its sync point, the same step on every
host, so all of them save that step together.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

import jax
from jax.experimental import multihost_utils

EXIT_CODE = 128 + signal.SIGTERM   # what a shell reports for a process ended by SIGTERM


class Preempted(Exception):
    """Training stopped on a preemption notice after saving `step` in `checkpoint_dir`."""

    def __init__(self, step: int, checkpoint_dir):
        super().__init__(f"stopped by SIGTERM after step {step}; {checkpoint_dir}/{step} is "
                         "saved and rerunning the same command resumes from it.")


@contextlib.contextmanager
def notice() -> Iterator[Callable[[int], bool]]:
    """`reached(step)`: whether to save `step` and stop. Outside the main thread of a single
    process no handler can be installed and it is always False; the previous SIGTERM handler is
    restored when the block ends."""
    if jax.process_count() > 1:
        yield multihost_utils.reached_preemption_sync_point
        return
    if threading.current_thread() is not threading.main_thread():
        yield lambda step: False
        return
    event = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: event.set())
    try:
        yield lambda step: event.is_set()
    finally:
        signal.signal(signal.SIGTERM, previous)
