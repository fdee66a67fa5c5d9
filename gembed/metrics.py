"""Training metrics: `metrics.jsonl` (one JSON object per logged step) and TensorBoard events.

Only process 0 writes. On resume, lines logged after the restored checkpoint (by a run that was
killed later) are dropped first, so the file reads as if the run had never been interrupted.
"""
from __future__ import annotations

import json
import os
import pathlib

import jax
from tensorboardX import SummaryWriter


class MetricsWriter:
    """Appends `{"step": ..., name: value, ...}` lines to DIR/metrics.jsonl and scalars to DIR/tb/."""

    def __init__(self, workdir: os.PathLike, resume_step: int):
        self._enabled = jax.process_index() == 0
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        if not self._enabled:
            return
        self._drop_lines_after(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tensorboard = SummaryWriter(str(pathlib.Path(workdir) / "tb"))

    def _drop_lines_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines(keepends=True)
                if line.endswith("\n") and json.loads(line)["step"] <= step]
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
