"""Training metrics: `metrics.jsonl` (one JSON object per logged step), TensorBoard events, and
the throughput of the steps between two log lines.

Only process 0 writes. On resume, lines logged after the restored checkpoint (by a run that was
killed later) are dropped first, and so is a torn last line, so the file reads as if the run had
never been interrupted.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import sys
import time

import jax
from tensorboardX import SummaryWriter

from gembed import workdir as workdir_files
from gembed.errors import GembedUserError


class ThroughputMeter:
    """Examples/s, model FLOP/s and MFU of the steps since the last `flush`.

    `peak_flops` is the whole system's (`gembed.flops.system_peak`); each process counts the model
    FLOPs of its own rows and scales them by the process count (hosts' rows differ little).
    """

    def __init__(self, batch_size: int, peak_flops: float):
        self._batch_size, self._peak_flops = batch_size, peak_flops
        self._reset()

    def _reset(self) -> None:
        self._start, self._steps, self._flops = time.perf_counter(), 0, 0.0

    def add_step(self, model_flops: float) -> None:
        """Counts one step whose rows (this process's) cost `model_flops`."""
        self._steps += 1
        self._flops += model_flops

    def exclude(self, seconds: float) -> None:
        """Leaves `seconds` of non-training work (evaluation) out of the window."""
        self._start += seconds

    def flush(self) -> dict[str, float]:
        """{"examples_per_second", "model_flops_per_second", "mfu"} of the window; resets it."""
        elapsed = time.perf_counter() - self._start
        model_flops_per_second = self._flops * jax.process_count() / elapsed
        values = {"examples_per_second": self._steps * self._batch_size / elapsed,
                  "model_flops_per_second": model_flops_per_second,
                  "mfu": model_flops_per_second / self._peak_flops}
        self._reset()
        return values


class MetricsWriter:
    """Appends `{"step": ..., name: value, ...}` lines to DIR/metrics.jsonl and scalars to DIR/tb/."""

    def __init__(self, workdir: os.PathLike, resume_step: int):
        self._enabled = jax.process_index() == 0
        self.path = pathlib.Path(workdir) / workdir_files.METRICS_FILE
        if not self._enabled:
            return
        self._drop_lines_after(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)   # a NaN stops the run
        self._tensorboard = SummaryWriter(str(pathlib.Path(workdir) / workdir_files.TENSORBOARD_DIR))

    def _drop_lines_after(self, step: int) -> None:
        if not self.path.exists():
            return
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        kept = []
        for number, line in enumerate(lines, start=1):
            try:
                logged = json.loads(line)["step"]
            except (json.JSONDecodeError, KeyError, TypeError):
                if number == len(lines):   # torn by a kill mid-write: dropped
                    print(f"gembed: dropped the torn last line of {self.path}", file=sys.stderr)
                    continue
                raise GembedUserError(f"{self.path}:{number}: not a metrics line; delete that "
                                      f"line (or the file) and rerun.") from None
            if line.endswith("\n") and logged <= step:
                kept.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, step: int, values: dict[str, float | str]) -> None:
        if not self._enabled:
            return
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        self._file.flush()
        for name, value in values.items():
            if isinstance(value, (int, float)):
                self._tensorboard.add_scalar(name, value, step)

    def close(self) -> None:
        if self._enabled:
            self._file.close()
            self._tensorboard.close()
