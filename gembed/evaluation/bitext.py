"""Bitext mining (MTEB Tatoeba): each non-English sentence's nearest English neighbour by cosine
must be its translation. Main score: F1 (MTEB's main score for Tatoeba); accuracy alongside."""
from __future__ import annotations

from typing import NamedTuple

from gembed.evaluation import metrics, search
from gembed.evaluation.context import EvalContext
from gembed.evaluation.data_files import at_least, data_path, malformed, read_lines


class Bitext(NamedTuple):
    source: list[str]      # the other language (MTEB's sentence1)
    english: list[str]     # line-aligned translations (sentence2)


def load_tatoeba(data_dir, language: str) -> Bitext:
    source_path = data_path(data_dir, "tatoeba_laser", f"tatoeba.{language}-eng.{language}")
    english_path = data_path(data_dir, "tatoeba_laser", f"tatoeba.{language}-eng.eng")
    source, english = read_lines(source_path), read_lines(english_path)
    if len(source) != len(english):
        raise malformed(english_path, None, f"{len(english)} lines but {source_path.name} has {len(source)}")
    at_least(source_path, len(source), 2, "sentences")
    return Bitext(source, english)


def evaluate(ctx: EvalContext, data: Bitext) -> dict[str, float]:
    source = ctx.encode(data.source, task="bitext")
    english = ctx.encode(data.english, task="bitext")
    _, nearest = search.top_k(source, english, 1)
    scores = metrics.bitext_scores(nearest[:, 0])
    return {"main_score": scores["f1"], **scores}
