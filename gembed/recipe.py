"""`gembed run`: the whole recipe as one job, configured by a gin-configurable `Recipe`.

Stages, each in DIR/<stage>/ and each marked complete by DIR/stages/<stage>.json (its spec and
wall time; kept apart so the stage folders hold only what the stage writes), so a re-run skips
what is done and resumes the rest (training resumes from its own checkpoints; an incomplete
mining/soup/export/eval folder is redone from scratch):

    prefinetune       `gembed train` with the prefinetune gin files (from `init_from`, or trains
                      the tokenizer when there is none); left out when prefinetune_gin_files is empty
    mining            `gembed mine` with the strongest model so far (the prefinetuned one, else
                      `init_from`): DIR/mining/mined.jsonl, which finetune runs read as the macro
                      MINED_DATA; left out when `mining` is None. With `Mining.judge` (an LLM
                      folder) the negatives are LLM-judged (`gembed curate negatives`), and a
                      killed stage resumes where the LLM stopped
    teacher_vectors   with `teacher`: the teacher's vectors of the finetune data, cached in
                      DIR/teacher_vectors (`gembed.teacher_cache`) and read by every finetune run
    <run name> ...    one `gembed train` per `finetune_runs` entry, from DIR/prefinetune (or
                      `init_from` without a prefinetune stage)
    soup_uniform      `gembed soup` of every finetune run
    soup_greedy       `gembed soup --method=greedy --eval_task=<soup_task>` of the same runs
                      (soup_task is a validation split: the choice never sees the test split)
    model             `gembed export` of soup_<soup_method>, at `eval_max_length`
    eval              BM25 and `init_from` zero-shot (`baselines`), the teacher, every trained
                      stage, both soups (the chosen one through its export) on `eval_tasks`, all
                      encoding at `eval_max_length`, plus a "sentences/s" column (`speed_texts`);
                      a finetune run's scores on `soup_task` are the greedy soup's, which encoded
                      it the same way (not scored twice); DIR/eval/results.json {row: {task:
                      scores}}; the table is printed with each row's stage wall time
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

from gembed import checkpoint, config, encode_speed, teacher_cache, train
from gembed import workdir as workdir_files
from gembed.curate.negatives import llm_negatives
from gembed.data import load_builtin, load_examples, write_jsonl
from gembed.errors import GembedUserError
from gembed.evaluation import tasks
from gembed.evaluation.bm25 import BM25
from gembed.export import export
from gembed.llm import load_language_model
from gembed.mining import mine_hard_negatives
from gembed.soup import SOUP_FILE, make_soup

STAGES_DIR = "stages"   # DIR/stages/<stage>.json marks a complete stage
RESULTS_FILE = "results.json"
MINED_FILE = "mined.jsonl"


MINED_DATA = "MINED_DATA"   # the macro finetune gin files read the mined pairs from
TEACHER_VECTORS = "teacher_vectors"
SPEED_COLUMN = "sentences/s"
RESERVED_STAGES = frozenset({"prefinetune", "mining", TEACHER_VECTORS, "soup_uniform", "soup_greedy",
                             "model", "eval", STAGES_DIR})


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Mining:
    """The mining stage: hard negatives for `data`'s train split (`gembed mine`'s arguments)."""

    data: str = "builtin:stdlib_code"
    num_negatives: int = 2
    range_min: int = 2          # skip the nearest documents (likely unlabelled positives)
    range_max: int = 30         # exclusive
    sampling: str = "random"    # "top" | "random" (a seeded draw from the window's survivors)
    relative_margin: float | None = 0.95
    absolute_margin: float | None = None
    max_length: int = 128       # tokens per text while mining
    seed: int = 0
    # With an LLM decoder folder as `judge`, the negatives are `gembed curate negatives`'s instead:
    # the model's top `judge_candidates` neighbours, scored by the LLM under the two prompts, fused
    # by RRF, the lowest kept (the window, sampling and margins above are then unused).
    judge: str | None = None
    judge_candidates: int = 10
    judge_batch_size: int = 8   # rows per LLM call
    judge_dtype: str = "float32"
    judge_max_text_tokens: int = 256


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Recipe:
    """What `gembed run` does. Gin files are paths or names under experiments/configs; params
    are `NAME=VALUE` bindings as `gembed train --gin_param` takes them."""

    model_gin_files: tuple[str, ...] = ("model/tiny.gin",)   # () when init_from fixes the model
    prefinetune_gin_files: tuple[str, ...] = ("prefinetune.gin",)   # () = no prefinetune stage
    prefinetune_params: tuple[str, ...] = ()
    mining: Mining | None = None
    finetune_gin_files: tuple[str, ...] = ("finetune.gin",)
    finetune_params: tuple[str, ...] = ()          # shared by every finetune run
    finetune_runs: dict[str, tuple[str, ...]] = dataclasses.field(
        default_factory=lambda: {"finetune_seed0": ("SEED=0",)})   # stage name -> its own params
    init_from: str | None = None       # model folder, CKPT or hf:ORG/NAME; None = from scratch
    soup_method: str = "greedy"        # which soup is exported: "uniform" or "greedy"
    soup_task: str = "stdlib_code:validation"   # the task deciding the greedy soup
    eval_tasks: tuple[str, ...] = ("stdlib_code:validation", "stdlib_code")
    eval_max_length: int | None = 256  # tokens per text in eval and export; None: each model's own
    baselines: bool = True             # BM25 and zero-shot `init_from` rows
    data_dir: str | None = None        # folder of the public evaluation sets (absent tasks skip)
    eval_batch_size: int = 64
    teacher: str | None = None         # distillation teacher (model folder or hf: name): cached
                                       # vectors for the finetune runs, and a row of the table
    speed_texts: int = 0               # > 0: a sentences/s column, encoding this many stdlib_code
                                       # test texts (queries, then functions) per embedding row
    speed_max_length: int = 128        # every row's speed texts cut to this many tokens

    def __post_init__(self):
        for field in ("model_gin_files", "prefinetune_gin_files", "prefinetune_params",
                      "finetune_gin_files", "finetune_params", "eval_tasks"):
            object.__setattr__(self, field, tuple(getattr(self, field)))
        runs = {name: tuple(params) for name, params in dict(self.finetune_runs).items()}
        object.__setattr__(self, "finetune_runs", runs)
        checks = [
            (bool(runs), "Recipe.finetune_runs is empty; give at least one {name: [params]}"),
            (not RESERVED_STAGES & runs.keys(),
             f"Recipe.finetune_runs uses a reserved stage name ({sorted(RESERVED_STAGES & runs.keys())})"),
            (all(name.replace("_", "").replace("-", "").isalnum() for name in runs),
             f"Recipe.finetune_runs names {sorted(runs)} must be letters, digits, _ or -"),
            (self.soup_method in ("uniform", "greedy"),
             f"Recipe.soup_method={self.soup_method!r} must be 'uniform' or 'greedy'"),
            (bool(self.prefinetune_gin_files) or self.init_from is not None,
             "Recipe.prefinetune_gin_files is empty and Recipe.init_from is None; the finetune "
             "runs need one of them to start from"),
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

    def run(self) -> dict[str, Any]:
        """All stages; returns the eval stage's results: {"scores": {row: {task: scores}},
        "seconds": {row: wall time of the stage that made it}}."""
        recipe = self.recipe
        init_from = recipe.init_from
        trained: dict[str, str] = {}
        if recipe.prefinetune_gin_files:
            extra = (f"INIT_FROM={_quoted(init_from)}",) if init_from else ()
            init_from = trained["prefinetune"] = str(self.train(
                "prefinetune", recipe.model_gin_files + recipe.prefinetune_gin_files,
                recipe.prefinetune_params + extra))
        finetune_gin_files = recipe.model_gin_files + recipe.finetune_gin_files
        shared = recipe.finetune_params + (f"INIT_FROM={_quoted(init_from)}",)
        if recipe.mining is not None:
            mined = self.mine(init_from) / MINED_FILE
            shared += (f"{MINED_DATA}={_quoted(mined)}",)
        if recipe.teacher:
            vectors = self.stage(
                TEACHER_VECTORS, {"teacher": recipe.teacher, "gin_files": list(finetune_gin_files),
                                  "gin_params": list(shared)},
                lambda path: self._teacher_vectors(finetune_gin_files, shared, path),
                resumable=True)
            shared += (f"TrainConfig.teacher={_quoted(recipe.teacher)}",
                       f"TrainConfig.teacher_cache={_quoted(vectors)}")
        for name, params in recipe.finetune_runs.items():
            trained[name] = str(self.train(name, finetune_gin_files, shared + params))
        runs = [trained[name] for name in recipe.finetune_runs]
        soups = {}
        for method in ("uniform", "greedy"):
            task = recipe.soup_task if method == "greedy" else None
            soups[method] = self.stage(
                f"soup_{method}", {"ingredients": runs, "method": method, "eval_task": task,
                                   "data_dir": recipe.data_dir, "max_length": recipe.eval_max_length},
                lambda path, method=method, task=task: make_soup(
                    runs, path, method=method, eval_task=task, data_dir=recipe.data_dir,
                    batch_size=recipe.eval_batch_size, max_length=recipe.eval_max_length))
        chosen = soups[recipe.soup_method]
        model = self.stage("model", {"checkpoint": str(chosen), "max_length": recipe.eval_max_length},
                           lambda path: export(chosen, path, max_length=recipe.eval_max_length))
        rows, stage_of = {}, {}   # row -> what it evaluates, row -> the stage that made it
        if recipe.baselines:
            rows["bm25"] = BM25.name
            if recipe.init_from is not None and recipe.init_from != recipe.teacher:
                rows["zero-shot (init_from)"] = recipe.init_from
        if recipe.teacher:
            rows[f"teacher ({recipe.teacher})"] = recipe.teacher
        for name, path in trained.items():
            rows[name], stage_of[name] = path, name
        for method, soup in soups.items():
            row = f"soup_{method}" + (" -> model" if soup == chosen else "")
            rows[row], stage_of[row] = str(model if soup == chosen else soup), soup.name
        spec = {"rows": rows, "tasks": list(recipe.eval_tasks), "data_dir": recipe.data_dir,
                "max_length": recipe.eval_max_length,
                "speed": [recipe.speed_texts, recipe.speed_max_length]}
        runs_by_name = {name: trained[name] for name in recipe.finetune_runs}
        eval_dir = self.stage("eval", spec, lambda path: self._evaluate(
            rows, path, self._soup_scores(soups["greedy"], runs_by_name)))
        results = json.loads((eval_dir / RESULTS_FILE).read_text())
        seconds = {row: self.seconds(stage) for row, stage in stage_of.items()}
        return {"scores": results, "seconds": seconds, "total_seconds": self.total_seconds()}

    def mine(self, model: str) -> pathlib.Path:
        """The mining stage: DIR/mining/mined.jsonl, negatives mined with `model`."""
        mining = self.recipe.mining
        spec = {"model": model, **dataclasses.asdict(mining)}

        def run(path: pathlib.Path) -> None:
            embedder = teacher_cache.load_model(model)
            embedder.max_length = mining.max_length
            examples = load_examples(mining.data, split="train")
            path.mkdir(parents=True, exist_ok=True)
            if mining.judge is not None:
                llm = load_language_model(mining.judge, dtype=mining.judge_dtype,
                                          batch_size=mining.judge_batch_size)
                counts = llm_negatives(llm, embedder, examples, path / MINED_FILE,
                                       num_candidates=mining.judge_candidates,
                                       num_negatives=mining.num_negatives,
                                       max_text_tokens=mining.judge_max_text_tokens)
                self.log(f"gembed run: mining: {counts['negatives']} LLM-judged negatives for "
                         f"{counts['examples']} examples ({counts['short']} got fewer than "
                         f"{mining.num_negatives})")
                return
            mined, stats = mine_hard_negatives(
                embedder, examples, num_negatives=mining.num_negatives, range_min=mining.range_min,
                range_max=mining.range_max, sampling=mining.sampling,
                relative_margin=mining.relative_margin, absolute_margin=mining.absolute_margin,
                seed=mining.seed)
            write_jsonl(path / MINED_FILE, mined)
            self.log(f"gembed run: mining: {stats.negatives} negatives for {len(mined)} examples "
                     f"({stats.queries_short_of_negatives} got fewer than {mining.num_negatives})")

        return self.stage("mining", spec, run, resumable=mining.judge is not None)

    def seconds(self, stage: str) -> float | None:
        marker = self.workdir / STAGES_DIR / f"{stage}.json"
        return json.loads(marker.read_text())["seconds"] if marker.is_file() else None

    def total_seconds(self) -> float:
        return sum(json.loads(marker.read_text())["seconds"]
                   for marker in (self.workdir / STAGES_DIR).glob("*.json"))

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

    def _soup_scores(self, soup: pathlib.Path,
                     runs: dict[str, str]) -> dict[str, dict[str, dict[str, float]]]:
        """{run name: {task: scores}} the greedy soup stage computed for the finetune `runs` the
        way the eval stage would: a run's last checkpoint, encoded at `eval_max_length` with the
        run's own inference files (the soup's scorer uses the first ingredient's)."""
        record = json.loads((soup / SOUP_FILE).read_text())
        if (self.recipe.eval_max_length is None
                or record.get("max_length") != self.recipe.eval_max_length):
            return {}
        task = tasks.parse_task_list([record["eval_task"]])[0].name
        entries = {entry["checkpoint"]: entry for entry in record["ingredients"]}
        scorer_files = checkpoint.resolve(record["ingredients"][0]["checkpoint"]).workdir
        known = {}
        for name, run in runs.items():
            entry = entries.get(str(checkpoint.resolve(run).step_dir))
            if entry is not None and "scores" in entry and all(
                    _file_bytes(scorer_files / file) == _file_bytes(pathlib.Path(run) / file)
                    for file in workdir_files.INFERENCE_FILES):
                known[name] = {task: entry["scores"]}
        return known

    def _evaluate(self, rows: dict[str, str], path: pathlib.Path,
                  known: dict[str, dict[str, dict[str, float]]]) -> None:
        """Scores every row on `eval_tasks`; `known` {row: {task: scores}} are taken as given."""
        recipe = self.recipe
        speed_texts = _speed_texts(recipe.speed_texts)
        task_names = [task.name for task in tasks.parse_task_list(recipe.eval_tasks)]
        results = {}
        for row, location in rows.items():
            given = {task: scores for task, scores in known.get(row, {}).items()
                     if task in task_names}
            self.log(f"gembed run: eval: {row}" + "".join(
                f" ({task}: scored by soup_greedy)" for task in given))
            encoder = BM25() if location == BM25.name else teacher_cache.load_model(location)
            if location != BM25.name and recipe.eval_max_length is not None:
                encoder.max_length = recipe.eval_max_length
            remaining = [task for task in task_names if task not in given]
            scored = tasks.evaluate(encoder, remaining, data_dir=recipe.data_dir,
                                    batch_size=recipe.eval_batch_size,
                                    log=self.log) if remaining else {}
            merged = {**given, **scored}
            results[row] = {task: merged[task] for task in task_names if task in merged}
            if speed_texts and location != BM25.name:
                results[row][SPEED_COLUMN] = {"main_score": encode_speed.sentences_per_second(
                    encoder, speed_texts, recipe.speed_max_length, recipe.eval_batch_size)}
        path.mkdir(parents=True, exist_ok=True)
        tasks.write_json(results, path / RESULTS_FILE)


def _file_bytes(path: pathlib.Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _speed_texts(count: int) -> list[str]:
    """The first `count` texts of the stdlib_code test split: its queries, then its functions."""
    examples = load_builtin("stdlib_code", "test")
    return ([example.query for example in examples]
            + [example.positive for example in examples])[:count]


def format_results(results: dict[str, Any]) -> str:
    """A plain-text table: one row per model, one main-score column per task (0-100), and the
    wall time of the stage that made the row; the recipe's total time below."""
    scores, seconds = results["scores"], results["seconds"]
    task_names = list(dict.fromkeys(task for row in scores.values() for task in row))
    table = [["model", *task_names, "stage s"]]
    for row, row_scores in scores.items():
        stage_seconds = seconds.get(row)
        table.append([row, *(f"{row_scores[t]['main_score']:.2f}" if t in row_scores else "-"
                             for t in task_names),
                      "-" if stage_seconds is None else f"{stage_seconds:.0f}"])
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                       for i, cell in enumerate(line)) for line in table]
    return "\n".join(lines + [f"all stages: {results['total_seconds']:.0f} s"])


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
