"""`gembed run`: the whole recipe as one job, configured by a gin-configurable `Recipe`.

Stages, each in DIR/<stage>/ and each marked complete by DIR/stages/<stage>.json (its spec and
wall time; kept apart so the stage folders hold only what the stage writes), so a re-run skips
what is done and resumes the rest (training resumes from its own checkpoints; an incomplete
soup/export/eval folder is redone from scratch):

    teacher_vectors   with `teacher`: the teacher's vectors of the finetune data, cached in
                      DIR/teacher_vectors (`gembed.teacher_cache`) and read by every finetune run
    prefinetune       `gembed train` with the prefinetune gin files (trains the tokenizer when
                      none is given or inherited); left out when prefinetune_gin_files is empty
    <run name> ...    one `gembed train` per `finetune_runs` entry, from DIR/prefinetune (or
                      `init_from` without a prefinetune stage)
    soup_uniform      `gembed soup` of every finetune run
    soup_greedy       `gembed soup --method=greedy --eval_task=<soup_task>` of the same runs
    model             `gembed export` of soup_<soup_method>
    eval              every finetune run, both soups, the exported model, the teacher and the
                      `baselines` on `eval_tasks`, plus a "sentences/s" column (`speed_texts`);
                      DIR/eval/results.json {row: {task: scores}}; the table is printed
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import sys
import time
from typing import Any, Callable, Sequence

import gin

from gembed import config, encode_speed, teacher_cache, train
from gembed.data.builtin import load_builtin
from gembed.evaluation.bm25 import BM25
from gembed.errors import GembedUserError
from gembed.evaluation import tasks
from gembed.export import export
from gembed.soup import make_soup

STAGES_DIR = "stages"   # DIR/stages/<stage>.json marks a complete stage
RESULTS_FILE = "results.json"
TEACHER_VECTORS = "teacher_vectors"
SPEED_COLUMN = "sentences/s"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Recipe:
    """What `gembed run` does. Gin files are paths or names under experiments/configs; params
    are `NAME=VALUE` bindings as `gembed train --gin_param` takes them."""

    model_gin_files: tuple[str, ...] = ("model/tiny.gin",)   # () when init_from is a model folder
    prefinetune_gin_files: tuple[str, ...] = ("prefinetune.gin",)   # () = no prefinetune stage
    prefinetune_params: tuple[str, ...] = ()
    finetune_gin_files: tuple[str, ...] = ("finetune.gin",)
    finetune_params: tuple[str, ...] = ()          # shared by every finetune run
    finetune_runs: dict[str, tuple[str, ...]] = dataclasses.field(
        default_factory=lambda: {"finetune_seed0": ("SEED=0",)})   # stage name -> its own params
    init_from: str | None = None       # the first training stage's INIT_FROM; None = from scratch
    soup_method: str = "greedy"        # which soup is exported: "uniform" or "greedy"
    soup_task: str = "stdlib_code"     # the held-out task deciding the greedy soup
    eval_tasks: tuple[str, ...] = ("stdlib_code",)
    data_dir: str | None = None        # folder of the public evaluation sets (absent tasks skip)
    eval_batch_size: int = 64
    teacher: str | None = None         # distillation teacher (model folder or hf: name): cached
                                       # vectors for the finetune runs, and a row of the table
    baselines: tuple[str, ...] = ()    # extra rows: 'bm25'
    speed_texts: int = 0               # > 0: a sentences/s column, encoding this many stdlib_code
                                       # test texts (queries, then functions) per embedding row
    speed_max_length: int = 128        # every row's speed texts cut to this many tokens

    def __post_init__(self):
        for field in ("model_gin_files", "prefinetune_gin_files", "prefinetune_params",
                      "finetune_gin_files", "finetune_params", "eval_tasks", "baselines"):
            object.__setattr__(self, field, tuple(getattr(self, field)))
        runs = {name: tuple(params) for name, params in dict(self.finetune_runs).items()}
        object.__setattr__(self, "finetune_runs", runs)
        reserved = {"prefinetune", "soup_uniform", "soup_greedy", "model", "eval", STAGES_DIR,
                    TEACHER_VECTORS}
        checks = [
            (bool(runs), "Recipe.finetune_runs is empty; give at least one {name: [params]}"),
            (not reserved & runs.keys(),
             f"Recipe.finetune_runs uses a reserved stage name ({sorted(reserved & runs.keys())})"),
            (all(name.replace("_", "").replace("-", "").isalnum() for name in runs),
             f"Recipe.finetune_runs names {sorted(runs)} must be letters, digits, _ or -"),
            (self.soup_method in ("uniform", "greedy"),
             f"Recipe.soup_method={self.soup_method!r} must be 'uniform' or 'greedy'"),
            (bool(self.prefinetune_gin_files) or self.init_from is not None,
             "Recipe.prefinetune_gin_files is empty and Recipe.init_from is None; the finetune "
             "runs need one of them to start from"),
            (set(self.baselines) <= {"bm25"},
             f"Recipe.baselines={list(self.baselines)} may only hold 'bm25'"),
            (self.speed_texts >= 0 and self.speed_max_length > 0,
             "Recipe.speed_texts must be >= 0 and Recipe.speed_max_length positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise GembedUserError(f"{message}; fix the recipe gin file or --gin_param.")
        tasks.parse_task_list([self.soup_task, *self.eval_tasks])   # typos fail before any training


def train_stage(workdir: str | os.PathLike, gin_files: Sequence[str], gin_params: Sequence[str] = (),
                show_progress: bool | None = None) -> dict:
    """`gembed train` from Python: trains (or resumes) one stage in `workdir` configured by gin
    files and `NAME=VALUE` params, then clears the gin config; returns the last logged metrics."""
    try:
        config.parse_gin(gin_files, gin_params)
        return train.train(workdir, config.build_stage_config(), show_progress=show_progress)
    finally:
        gin.clear_config()


def _quoted(value: str) -> str:
    return json.dumps(str(value))


class Runner:
    """Runs the stages of a Recipe in a workdir, skipping those already complete."""

    def __init__(self, recipe: Recipe, workdir: str | os.PathLike,
                 log: Callable[[str], None] | None = None):
        self.recipe = recipe
        self.workdir = pathlib.Path(workdir).resolve()
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))

    def stage(self, name: str, spec: dict[str, Any], run: Callable[[pathlib.Path], None],
              resumable: bool = False) -> pathlib.Path:
        """Runs `run(DIR/name)` unless DIR/stages/name.json says it completed with this `spec`."""
        path = self.workdir / name
        marker = self.workdir / STAGES_DIR / f"{name}.json"
        if marker.is_file() and path.is_dir():   # deleting DIR/<stage> redoes the stage
            done = json.loads(marker.read_text())
            if done["spec"] != spec:
                raise GembedUserError(
                    f"{marker}: stage {name} completed with another configuration than this "
                    f"recipe's; use a new --workdir, or delete {path} (and the stages after it) to "
                    f"redo it.")
            self.log(f"gembed run: {name}: complete, skipped ({done['seconds']:.0f} s before)")
            return path
        marker.unlink(missing_ok=True)
        if path.exists() and not resumable:
            shutil.rmtree(path)
        self.log(f"gembed run: {name}: running")
        start = time.perf_counter()
        run(path)
        seconds = time.perf_counter() - start
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"stage": name, "spec": spec, "seconds": seconds}, indent=1))
        os.replace(tmp, marker)
        self.log(f"gembed run: {name}: done in {seconds:.0f} s")
        return path

    def train(self, name: str, gin_files: tuple[str, ...], params: tuple[str, ...]) -> pathlib.Path:
        spec = {"gin_files": list(gin_files), "gin_params": list(params)}
        return self.stage(name, spec, lambda path: train_stage(path, gin_files, params),
                          resumable=True)

    def run(self) -> dict[str, dict[str, dict[str, float]]]:
        """All stages; returns {row: {task: scores}} of the eval stage."""
        recipe = self.recipe
        init_from = recipe.init_from
        if recipe.prefinetune_gin_files:
            extra = (f"INIT_FROM={_quoted(init_from)}",) if init_from else ()
            init_from = str(self.train(
                "prefinetune", recipe.model_gin_files + recipe.prefinetune_gin_files,
                recipe.prefinetune_params + extra))
        finetune_gin_files = recipe.model_gin_files + recipe.finetune_gin_files
        finetune_params = recipe.finetune_params + (f"INIT_FROM={_quoted(init_from)}",)
        if recipe.teacher:
            vectors = self.stage(
                TEACHER_VECTORS, {"teacher": recipe.teacher, "gin_files": list(finetune_gin_files),
                                  "gin_params": list(finetune_params)},
                lambda path: self._teacher_vectors(finetune_gin_files, finetune_params, path),
                resumable=True)
            finetune_params += (f"TrainConfig.teacher={_quoted(recipe.teacher)}",
                                f"TrainConfig.teacher_cache={_quoted(vectors)}")
        runs = [str(self.train(name, finetune_gin_files, finetune_params + params))
                for name, params in recipe.finetune_runs.items()]
        soups = {}
        for method in ("uniform", "greedy"):
            task = recipe.soup_task if method == "greedy" else None
            soups[method] = self.stage(
                f"soup_{method}", {"ingredients": runs, "method": method, "eval_task": task,
                                   "data_dir": recipe.data_dir},
                lambda path, method=method, task=task: make_soup(
                    runs, path, method=method, eval_task=task, data_dir=recipe.data_dir,
                    batch_size=recipe.eval_batch_size))
        chosen = soups[recipe.soup_method]
        model = self.stage("model", {"checkpoint": str(chosen)},
                           lambda path: export(chosen, path))
        rows = {**{pathlib.Path(run).name: run for run in runs},
                **{path.name: str(path) for path in soups.values()},
                f"model (export of {chosen.name})": str(model)}
        if recipe.teacher:
            rows[f"teacher ({recipe.teacher})"] = recipe.teacher
        rows.update({name: name for name in recipe.baselines})
        spec = {"rows": rows, "tasks": list(recipe.eval_tasks), "data_dir": recipe.data_dir,
                "speed": [recipe.speed_texts, recipe.speed_max_length]}
        eval_dir = self.stage("eval", spec, lambda path: self._evaluate(rows, path))
        return json.loads((eval_dir / RESULTS_FILE).read_text())

    def _teacher_vectors(self, gin_files: tuple[str, ...], params: tuple[str, ...],
                         path: pathlib.Path) -> None:
        """Fills `path` with the teacher's vectors of the finetune runs' training texts."""
        config.parse_gin(gin_files, params)
        try:
            stage = config.build_stage_config()
        finally:
            gin.clear_config()
        datasets, _ = train.load_training_data(stage.train)
        texts = [text for dataset in datasets
                 for text in teacher_cache.example_texts(dataset.examples)]
        teacher_cache.teacher_vectors(path, self.recipe.teacher, texts,
                                      max_length=stage.train.max_length, log=self.log)

    def _evaluate(self, rows: dict[str, str], path: pathlib.Path) -> None:
        recipe = self.recipe
        speed_texts = _speed_texts(recipe.speed_texts)
        results = {}
        for row, location in rows.items():
            encoder = BM25() if location == "bm25" else teacher_cache.load_model(location)
            results[row] = tasks.evaluate(encoder, recipe.eval_tasks, data_dir=recipe.data_dir,
                                          batch_size=recipe.eval_batch_size, log=self.log)
            if speed_texts and location != "bm25":
                results[row][SPEED_COLUMN] = {"main_score": encode_speed.sentences_per_second(
                    encoder, speed_texts, recipe.speed_max_length, recipe.eval_batch_size)}
        path.mkdir(parents=True, exist_ok=True)
        tasks.write_json(results, path / RESULTS_FILE)


def _speed_texts(count: int) -> list[str]:
    """The first `count` texts of the stdlib_code test split: its queries, then its functions."""
    examples = load_builtin("stdlib_code", "test")
    return ([example.query for example in examples]
            + [example.positive for example in examples])[:count]


def format_results(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """A plain-text table: one row per model, one main-score column per task (0-100)."""
    task_names = list(dict.fromkeys(task for scores in results.values() for task in scores))
    table = [["model", *task_names]]
    for row, scores in results.items():
        table.append([row, *(f"{scores[t]['main_score']:.2f}" if t in scores else "-"
                             for t in task_names)])
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                               for i, cell in enumerate(line)) for line in table)


def run_recipe(gin_file: str, gin_params: list[str], workdir: str | os.PathLike) -> str:
    """Parses the recipe, runs it in `workdir` (DIR/recipe.gin records it), returns the table."""
    config.parse_gin([gin_file], gin_params)
    try:
        recipe = Recipe()
        workdir = pathlib.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        config.write_operative_config(workdir / "recipe.gin")
    finally:
        gin.clear_config()
    return format_results(Runner(recipe, workdir).run())
