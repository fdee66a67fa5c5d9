"""Preemption: a SIGTERM (SLURM's time limit, Kubernetes, spot and preemptible VMs) makes training
save the step it has reached and stop, so that rerunning the same command resumes there.

One process: `notice()` installs a SIGTERM handler that only records the notice; the loop asks
`reached(notice, step)` after each step. Many processes: JAX's preemption service (started by
`jax.distributed.initialize`) owns SIGTERM and `reached` is its sync point, the same step on every
host, so all of them save that step together.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import jax
from jax.experimental import multihost_utils

EXIT_CODE = 128 + signal.SIGTERM   # what a shell reports for a process ended by SIGTERM


class Preempted(Exception):
    """Training stopped on a preemption notice after saving `step` in `checkpoint_dir`."""

    def __init__(self, step: int, checkpoint_dir):
        super().__init__(f"stopped by SIGTERM after step {step}; {checkpoint_dir}/{step} is "
                         "saved and rerunning the same command resumes from it.")
        self.step = step


@contextlib.contextmanager
def notice() -> Iterator[threading.Event]:
    """An event set by SIGTERM while the block runs (one process, main thread only; elsewhere
    it stays unset and `reached` asks JAX); the previous handler is restored afterwards."""
    event = threading.Event()
    if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: event.set())
    try:
        yield event
    finally:
        signal.signal(signal.SIGTERM, previous)


def reached(event: threading.Event, step: int) -> bool:
    """Whether to save `step` and stop: the local notice, or JAX's sync point across processes."""
    if jax.process_count() > 1:
        return multihost_utils.reached_preemption_sync_point(step)
    return event.is_set()
