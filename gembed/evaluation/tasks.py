"""The task registry and the runner behind `gembed eval` and evaluation during training.

A task name resolves to a `Task`: its family and a function of an `EvalContext` returning
`{"main_score": x, metric: value, ...}` on a 0-100 scale. Parametrised names take an argument
after a colon (`stsb_multi:de`, `tatoeba:deu`, `pairs:FILE.jsonl`). A task whose data set is
absent is skipped with a one-line message and left out of the results (the JSON holds only tasks
that ran); so is a task that needs embeddings when the model is a ranker only (BM25). A task whose
score is not finite is a failure, not a result.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from typing import Callable, Sequence

from gembed.data.builtin import load_builtin
from gembed.data.jsonl import read_jsonl
from gembed.errors import GembedUserError
from gembed.evaluation import (bitext, classification, clustering, code_search, pair_classification,
                               ranking, retrieval, sts)
from gembed.evaluation.context import EvalContext
from gembed.evaluation.data_files import DataMissing


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    family: str
    run: Callable[[EvalContext], dict]
    needs_data: bool = True


def _sts(load):
    return lambda ctx: sts.evaluate(ctx, load(ctx.data_dir))


def _senteval(load):
    return lambda ctx: classification.evaluate_senteval(ctx, load(ctx.data_dir))


def _banking77_clustering(ctx: EvalContext) -> dict:
    test = classification.load_banking77(ctx.data_dir).test
    return clustering.evaluate(ctx, clustering.ClusteringSet([(test.texts, test.labels)]))


def _stdlib_docs(ctx: EvalContext, split: str) -> dict:
    """Dotted name / pydoc topic -> docstring / topic text over the split's passages (MRR@10)."""
    return retrieval.evaluate_pairs(ctx, load_builtin("stdlib_docs", split), f"builtin:stdlib_docs:{split}")


def _pairs_task(name: str, path: str) -> Task:
    """Retrieval over the (query, positive) pairs of a training-format JSONL file."""
    if not path:
        raise GembedUserError(f"task {name!r}: after 'pairs:' give a JSONL file of (query, positive) pairs.")
    if os.path.isdir(path):
        raise GembedUserError(f"task {name!r}: {path} is a folder; give a JSONL file of pairs.")
    if not os.path.isfile(path):
        raise GembedUserError(f"task {name!r}: {path}: file not found; check the path.")

    def run(ctx: EvalContext) -> dict:
        return retrieval.evaluate_pairs(ctx, read_jsonl(path), path)
    return Task(name, "retrieval", run, needs_data=False)


TASKS: dict[str, Task] = {task.name: task for task in [
    Task("stsb", "sts", _sts(sts.load_stsb)),
    Task("sickr", "sts", _sts(sts.load_sick)),
    *(Task(name, "sts", _sts(lambda d, name=name: sts.load_sts_year(d, name))) for name in sts.STS_YEARS),
    Task("scifact", "retrieval",
         lambda ctx: retrieval.evaluate(ctx, retrieval.load_beir(ctx.data_dir, "beir_scifact"))),
    Task("cosqa", "code_search", lambda ctx: code_search.evaluate(ctx, code_search.load_cosqa(ctx.data_dir))),
    Task("csn_ruby", "code_search",
         lambda ctx: code_search.evaluate(ctx, code_search.load_csn(ctx.data_dir, "ruby"))),
    Task("stdlib_code", "code_search",
         lambda ctx: code_search.evaluate(ctx, code_search.load_stdlib_code("test")), needs_data=False),
    Task("stdlib_code:validation", "code_search",
         lambda ctx: code_search.evaluate(ctx, code_search.load_stdlib_code("validation")),
         needs_data=False),
    Task("stdlib_docs", "retrieval", lambda ctx: _stdlib_docs(ctx, "test"), needs_data=False),
    Task("stdlib_docs:validation", "retrieval", lambda ctx: _stdlib_docs(ctx, "validation"),
         needs_data=False),
    *(Task(name, "classification", _senteval(lambda d, name=name: classification.load_senteval_binary(d, name)))
      for name in classification.SENTEVAL_BINARY),
    Task("trec", "classification", _senteval(classification.load_trec)),
    Task("sst2", "classification", _senteval(lambda d: classification.load_sst(d, 2))),
    Task("sst5", "classification", _senteval(lambda d: classification.load_sst(d, 5))),
    Task("banking77", "classification",
         lambda ctx: classification.evaluate_mteb(ctx, classification.load_banking77(ctx.data_dir))),
    Task("banking77_clustering", "clustering", _banking77_clustering),
    Task("cosqa_pairs", "pair_classification",
         lambda ctx: pair_classification.evaluate(ctx, pair_classification.load_cosqa_pairs(ctx.data_dir))),
]}

PARAMETRISED = {
    "stsb_multi": ("sts", "a language: " + ", ".join(sts.STSB_MULTI_LANGUAGES),
                   lambda lang: _sts(lambda d: sts.load_stsb_multi(d, lang))),
    "tatoeba": ("bitext", "an ISO 639-3 code such as deu, fra, cmn",
                lambda iso: lambda ctx: bitext.evaluate(ctx, bitext.load_tatoeba(ctx.data_dir, iso))),
}


def get_task(name: str) -> Task:
    """The Task called `name`, or a user error listing the known names."""
    if name in TASKS:
        return TASKS[name]
    prefix, colon, argument = name.partition(":")
    if colon and prefix == "pairs":
        return _pairs_task(name, argument)
    if colon and prefix in PARAMETRISED:
        family, what, make = PARAMETRISED[prefix]
        if not argument or not argument.replace("_", "").isalnum():
            raise GembedUserError(f"task {name!r}: after '{prefix}:' give {what}.")
        return Task(name, family, make(argument))
    known = ", ".join([*TASKS, *(f"{p}:<arg>" for p in PARAMETRISED), "pairs:FILE.jsonl"])
    raise GembedUserError(f"unknown task {name!r}; known tasks: {known}.")


def parse_task_list(tasks: str | Sequence[str]) -> list[Task]:
    """Tasks from "a,b,c" or a sequence of names; every name is checked before anything runs."""
    names = [n.strip() for n in (tasks.split(",") if isinstance(tasks, str) else tasks) if n.strip()]
    if not names:
        raise GembedUserError("no task given; pass --tasks=NAME[,NAME...] (e.g. --tasks=stsb,stdlib_code).")
    return [get_task(name) for name in dict.fromkeys(names)]


def evaluate(encoder, tasks: str | Sequence[str], data_dir: str | os.PathLike | None = None,
             batch_size: int = 64, dim: int | None = None,
             log: Callable[[str], None] | None = None,
             skipped: dict[str, str] | None = None,
             failed: dict[str, str] | None = None) -> dict[str, dict[str, float]]:
    """Runs `tasks` on `encoder`: {task: {"main_score": x, ...}} for those that ran.

    `encoder` has the encoder protocol, or is a ranker (`gembed.evaluation.bm25.BM25`), which
    runs the retrieval and code-search tasks only. Skipped tasks (data absent, or embeddings
    needed from a ranker) are reported through `log` (default: one line on stderr), recorded in
    `skipped` (name -> reason) when given, and left out of the results. A task with a non-finite
    score raises GembedUserError, or, when `failed` is given, is logged, recorded there and left
    out.
    """
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    selected = parse_task_list(tasks)
    ctx = EvalContext(encoder, pathlib.Path(data_dir) if data_dir is not None else None,
                      batch_size=batch_size, dim=dim)
    results: dict[str, dict[str, float]] = {}
    for task in selected:
        start = time.perf_counter()
        scores, skip_reason = None, None
        if not ranking.is_encoder(encoder) and task.family not in ranking.RANKING_FAMILIES:
            skip_reason = (f"{getattr(encoder, 'name', 'this model')} only ranks documents (retrieval "
                           f"and code-search tasks); {task.family} needs embeddings")
        else:
            try:
                scores = task.run(ctx)
            except DataMissing as missing:
                skip_reason = str(missing)
        if skip_reason is not None:
            log(f"gembed eval: skipping {task.name}: {skip_reason}")
            if skipped is not None:
                skipped[task.name] = skip_reason
            continue
        non_finite = [f"{metric}={value}" for metric, value in scores.items() if not math.isfinite(value)]
        if non_finite:
            reason = (f"non-finite score ({', '.join(non_finite)}): the model's embeddings or the "
                      f"task's data are degenerate (NaN params, constant or too few scored rows)")
            if failed is None:
                raise GembedUserError(f"task {task.name}: {reason}.")
            log(f"gembed eval: {task.name} failed: {reason}")
            failed[task.name] = reason
            continue
        results[task.name] = {"main_score": scores["main_score"],
                              **{k: v for k, v in scores.items() if k != "main_score"},
                              "seconds": round(time.perf_counter() - start, 2)}
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A plain-text table: task, family, main score, then the other metrics."""
    rows = [("task", "family", "main", "metrics")]
    for name, scores in results.items():
        family = get_task(name).family
        others = ", ".join(f"{k}={v:.2f}" for k, v in scores.items()
                           if k not in ("main_score", "seconds"))
        rows.append((name, family, f"{scores['main_score']:.2f}", others))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}"
                     for r in rows)


def write_json(results: dict, path: str | os.PathLike) -> None:
    """Writes the results atomically (a temp file renamed into place)."""
    path = pathlib.Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def flatten(results: dict[str, dict[str, float]], prefix: str = "eval") -> dict[str, float]:
    """{"eval/TASK/METRIC": value} for metrics.jsonl and TensorBoard."""
    return {f"{prefix}/{task}/{metric}": value for task, scores in results.items()
            for metric, value in scores.items() if metric != "seconds"}


