"""Model soups (Wortsman et al. 2022): uniform or greedy averages of the params of checkpoints.

Ingredients stream through one at a time: each is restored, checked against the first (param
names, shapes and dtypes; architecture; tokenizer file bytes), added to a float64 NumPy running
sum, and dropped, so memory holds the sum plus one ingredient. Every param is averaged, the
learnable temperature `log_scale` included. The output is a folder every CKPT reader accepts:

    DIR/checkpoints/0/params   orbax, params only: the average, cast back to the params' dtype
    the first ingredient's workdir files that inference reads (`workdir.INFERENCE_FILES`)
    DIR/soup.json              method, eval task, each ingredient's checkpoint, main score and
                               task scores, which ones were kept, the soup's score, and the
                               scoring's max_length; written last

Greedy: ingredients sorted by their own score on the held-out task (best first); the best starts
the soup and each next one is kept when the soup with it scores at least as well as without.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import shutil
import sys
from typing import Sequence

import jax
import numpy as np
from flax import traverse_util

from gembed import checkpoint, output_folder, workdir
from gembed.data.tokenizer_files import TOKENIZER_FILES
from gembed.embedder import Embedder
from gembed.errors import GembedUserError
from gembed.evaluation import tasks
from gembed.model_folder import TRAINING_FIELDS

SOUP_FILE = "soup.json"
METHODS = ("uniform", "greedy")
SOUP_STEP = 0
MAIN_SCORE = "main_score"


def flat_params(params) -> dict[str, np.ndarray]:
    """{"/"-joined name: NumPy array in its own dtype} of a params pytree."""
    return {name: np.asarray(leaf)
            for name, leaf in traverse_util.flatten_dict(params, sep="/").items()}


def _signature(array: np.ndarray | None) -> str:
    """"float32[64, 256]", or "absent"."""
    return "absent" if array is None else f"{array.dtype}{list(array.shape)}"


class Ingredients:
    """The checkpoints of a soup, loaded one at a time and checked against the first."""

    def __init__(self, checkpoints: Sequence[str | os.PathLike]):
        if not checkpoints:
            raise GembedUserError("no CKPT given; name at least one checkpoint to soup.")
        self.refs = [checkpoint.resolve(path) for path in checkpoints]
        self.model_config = workdir.read_model_config(self.refs[0].workdir)
        first_params = workdir.restore_params(self.refs[0], self.model_config)
        self._reference = {name: _signature(value)
                           for name, value in flat_params(first_params).items()}
        self._check_tokenizers()

    def _check_tokenizers(self) -> None:
        first = self.refs[0].workdir
        for ref in self.refs[1:]:
            for name in sorted({n for files in TOKENIZER_FILES.values() for n in files}):
                a, b = first / name, ref.workdir / name
                if a.is_file() != b.is_file() or (a.is_file() and a.read_bytes() != b.read_bytes()):
                    raise GembedUserError(
                        f"{a} and {b}: the ingredients' tokenizers differ; soup only runs that "
                        f"share one tokenizer (finetunes of one pre-finetuned checkpoint).")

    def load(self, index: int) -> dict[str, np.ndarray]:
        """The params of ingredient `index`, flat, after checking them against ingredient 0."""
        ref = self.refs[index]
        model_config = workdir.read_model_config(ref.workdir)
        flat = flat_params(workdir.restore_params(ref, model_config))
        for name in sorted(self._reference.keys() | flat.keys()):
            first, this = self._reference.get(name, "absent"), _signature(flat.get(name))
            if first != this:
                raise GembedUserError(
                    f"{self.refs[0].step_dir} and {ref.step_dir}: param {name} is {first} in the "
                    f"first but {this} in the second; soup only runs of one architecture (the same "
                    f"model gin file).")
        for field in dataclasses.fields(self.model_config):
            a, b = getattr(self.model_config, field.name), getattr(model_config, field.name)
            if field.name not in TRAINING_FIELDS and a != b:
                raise GembedUserError(
                    f"{self.refs[0].workdir} and {ref.workdir}: {workdir.ARCHITECTURE_FILE} differs in "
                    f"{field.name} ({a!r} vs {b!r}); soup only runs of one architecture.")
        return flat


class RunningSum:
    """Sum of flat param dicts in float64; `mean()` casts back to each param's dtype."""

    def __init__(self):
        self.total: dict[str, np.ndarray] = {}
        self.dtypes: dict[str, np.dtype] = {}
        self.count = 0

    def add(self, flat: dict[str, np.ndarray]) -> None:
        for name, value in flat.items():
            self.dtypes[name] = value.dtype
            self.total[name] = self.total.get(name, 0.0) + value.astype(np.float64)
        self.count += 1

    def mean(self, extra: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The average, of the sum plus `extra` when given (a candidate ingredient)."""
        count = self.count + (extra is not None)
        return {name: ((total + extra[name] if extra is not None else total) / count
                       ).astype(self.dtypes[name]) for name, total in self.total.items()}


class Scorer:
    """The scores {metric: value} of one evaluation task for flat params, through one compiled
    Embedder."""

    def __init__(self, first: checkpoint.CheckpointRef, task: str, data_dir=None,
                 batch_size: int = 64, max_length: int | None = None):
        self.task = tasks.parse_task_list([task])[0].name
        self.data_dir, self.batch_size = data_dir, batch_size
        # the first ingredient's tokenizer, prompts and (unless given) max length
        self.embedder = Embedder.of(workdir.read_checkpoint_model(first.step_dir, max_length))

    def __call__(self, flat: dict[str, np.ndarray]) -> dict[str, float]:
        self.embedder.params = jax.device_put(traverse_util.unflatten_dict(flat, sep="/"))
        skipped: dict[str, str] = {}
        results = tasks.evaluate(self.embedder, [self.task], data_dir=self.data_dir,
                                 batch_size=self.batch_size, skipped=skipped, log=lambda _: None)
        if self.task not in results:
            raise GembedUserError(f"--eval_task={self.task}: {skipped[self.task]}; pass "
                                  f"--data_dir or pick a built-in task such as stdlib_code.")
        return {metric: float(value) for metric, value in results[self.task].items()}


def uniform_soup(ingredients: Ingredients, scorer: Scorer | None = None):
    """(flat mean of every ingredient, per-ingredient task scores, kept, the soup's task scores);
    scores are None without a scorer."""
    total = RunningSum()
    scores = []
    for index in range(len(ingredients.refs)):
        flat = ingredients.load(index)
        scores.append(scorer(flat) if scorer is not None else None)
        total.add(flat)
    mean = total.mean()
    return (mean, scores, list(range(len(ingredients.refs))),
            scorer(mean) if scorer is not None else None)


def greedy_soup(ingredients: Ingredients, scorer: Scorer, log=None):
    """(flat mean of the kept ingredients, per-ingredient task scores, kept indices in order added,
    the soup's task scores: the last accepted candidate's, computed on the same float64 mean)."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    scores = [scorer(ingredients.load(index)) for index in range(len(ingredients.refs))]
    order = sorted(range(len(scores)), key=lambda i: -scores[i][MAIN_SCORE])
    total = RunningSum()
    total.add(ingredients.load(order[0]))
    kept, best = [order[0]], scores[order[0]]
    for index in order[1:]:
        candidate = ingredients.load(index)
        with_it = scorer(total.mean(extra=candidate))
        better = with_it[MAIN_SCORE] >= best[MAIN_SCORE]
        log(f"gembed soup: {ingredients.refs[index].step_dir}: soup with it scores "
            f"{with_it[MAIN_SCORE]:.2f} vs {best[MAIN_SCORE]:.2f} without; "
            f"{'kept' if better else 'left out'}")
        if better:
            total.add(candidate)
            kept.append(index)
            best = with_it
    return total.mean(), scores, kept, best


def make_soup(checkpoints: Sequence[str | os.PathLike], output: str | os.PathLike,
              method: str = "uniform", eval_task: str | None = None, data_dir=None,
              batch_size: int = 64, max_length: int | None = None, overwrite: bool = False) -> dict:
    """Writes the soup of `checkpoints` to `output` (layout in the module docstring), whole or not
    at all (`gembed.output_folder`; a non-empty output needs `overwrite`); returns the soup.json
    record. `eval_task` encodes at `max_length` tokens (None: the first ingredient's training
    MAX_LENGTH)."""
    if method not in METHODS:
        raise GembedUserError(f"--method={method}: pick one of {', '.join(METHODS)}.")
    if method == "greedy" and not eval_task:
        raise GembedUserError("--method=greedy needs --eval_task=NAME (e.g. stdlib_code), the "
                              "held-out task that decides which ingredients stay.")
    ingredients = Ingredients(checkpoints)
    output = output_folder.check_output(output, overwrite, [ref.workdir for ref in ingredients.refs])
    scorer = (Scorer(ingredients.refs[0], eval_task, data_dir, batch_size, max_length)
              if eval_task else None)
    if method == "greedy":
        mean, scores, kept, soup_score = greedy_soup(ingredients, scorer)
    else:
        mean, scores, kept, soup_score = uniform_soup(ingredients, scorer)
    record = {
        "method": method,
        "eval_task": eval_task,
        "max_length": scorer.embedder.max_length if scorer else None,
        "accumulation_dtype": "float64",
        "ingredients": [{"checkpoint": str(ref.step_dir), "score": _main(score), "scores": score}
                        for ref, score in zip(ingredients.refs, scores)],
        "kept": [str(ingredients.refs[i].step_dir) for i in kept],
        "score": _main(soup_score),
    }
    output_folder.write_folder(output, functools.partial(
        _write_soup, params=traverse_util.unflatten_dict(mean, sep="/"),
        source=ingredients.refs[0].workdir, record=record))
    return record


def _main(scores: dict[str, float] | None) -> float | None:
    return None if scores is None else scores[MAIN_SCORE]


def _write_soup(folder: pathlib.Path, params, source: pathlib.Path, record: dict) -> None:
    checkpoint.save_params(folder, SOUP_STEP, params)
    for name in workdir.INFERENCE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
    (folder / SOUP_FILE).write_text(json.dumps(record, indent=2) + "\n")
