"""Evaluation inside the training loop (configured by `gembed.config.EvalConfig`).

One `Embedder` is built over the model config, tokenizer and max length of the run; at each due
step it takes the current params and runs the configured tasks. A task whose data is absent is
reported once and then left out.
"""
from __future__ import annotations

import sys
import time

import tqdm

from gembed.embedder import Embedder
from gembed.evaluation import tasks as task_registry


class TrainingEvaluator:
    def __init__(self, config, model_config, tokenizer, max_length: int, train_steps: int):
        self.config = config
        self.train_steps = train_steps
        # Resolve names now, so a typo fails before the first step, not at the first evaluation.
        self.tasks = [t.name for t in task_registry.parse_task_list(config.tasks)] if config.tasks else []
        self._model_config, self._tokenizer, self._max_length = model_config, tokenizer, max_length
        self._embedder = None
        self.last_seconds = 0.0   # wall time of the latest maybe_run, 0 when nothing ran

    def due(self, step: int) -> bool:
        if not self.tasks:
            return False
        every = self.config.every_steps
        return step == self.train_steps or (every > 0 and step % every == 0)

    def maybe_run(self, step: int, params) -> dict[str, float]:
        """{"eval/TASK/METRIC": value} if evaluation is due at `step`, else {}."""
        self.last_seconds = 0.0
        if not self.due(step) or not self.tasks:
            return {}
        start = time.perf_counter()
        if self._embedder is None:
            self._embedder = Embedder(self._model_config, params, self._tokenizer, self._max_length)
        self._embedder.params = params

        skipped: dict[str, str] = {}
        results = task_registry.evaluate(
            self._embedder, self.tasks, data_dir=self.config.data_dir,
            batch_size=self.config.batch_size, skipped=skipped,
            log=lambda message: tqdm.tqdm.write(message, file=sys.stderr))
        self.tasks = [t for t in self.tasks if t not in skipped]   # say it once, not every time
        self.last_seconds = time.perf_counter() - start
        return task_registry.flatten(results)
