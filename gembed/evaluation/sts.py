"""Semantic textual similarity: Spearman correlation of cosine similarity with gold scores.

Main score = cosine Spearman x100 (MTEB). STS12-16 pool every scored pair of the year's subsets
into one correlation (MTEB; SimCSE's "all" setting).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from gembed.evaluation import metrics
from gembed.evaluation.context import EvalContext
from gembed.evaluation.data_files import at_least, data_path, malformed, read_csv, read_lines, to_float

STS_YEARS = {"sts12": "STS12", "sts13": "STS13", "sts14": "STS14", "sts15": "STS15", "sts16": "STS16"}
STSB_MULTI_LANGUAGES = ("de", "en", "es", "fr", "it", "ja", "nl", "pl", "pt", "ru", "zh")


class Pairs(NamedTuple):
    first: list[str]
    second: list[str]
    gold: list[float]


def load_stsb(data_dir, split: str = "test") -> Pairs:
    """STS Benchmark original release: tab-separated, score in field 5, sentences in 6 and 7."""
    path = data_path(data_dir, "stsb_original", f"sts-{split}.csv")
    pairs = Pairs([], [], [])
    for number, line in enumerate(read_lines(path), start=1):
        fields = line.split("\t")
        if len(fields) < 7:
            raise malformed(path, number, f"expected at least 7 tab-separated fields, got {len(fields)}")
        pairs.first.append(fields[5])
        pairs.second.append(fields[6])
        pairs.gold.append(to_float(path, number, fields[4], "score"))
    at_least(path, len(pairs.gold), 2, "scored pairs")
    return pairs


def load_stsb_multi(data_dir, language: str, split: str = "test") -> Pairs:
    """stsb_multi_mt: CSV without header, sentence1,sentence2,score."""
    path = data_path(data_dir, "stsb_multi_mt", f"stsb-{language}-{split}.csv")
    pairs = Pairs([], [], [])
    for number, row in enumerate(read_csv(path), start=1):
        if len(row) != 3:
            raise malformed(path, number, f"expected sentence1,sentence2,score, got {len(row)} fields")
        pairs.first.append(row[0])
        pairs.second.append(row[1])
        pairs.gold.append(to_float(path, number, row[2], "score"))
    at_least(path, len(pairs.gold), 2, "scored pairs")
    return pairs


def load_sick(data_dir) -> Pairs:
    """SICK relatedness, all 9,840 pairs (TRAIN+TRIAL+TEST) as MTEB's SICK-R scores them."""
    path = data_path(data_dir, "sick", "SICK.txt")
    rows = read_csv(path, delimiter="\t")
    header = rows[0] if rows else []
    try:
        a, b, score = (header.index(name) for name in ("sentence_A", "sentence_B", "relatedness_score"))
    except ValueError:
        raise malformed(path, 1, "header lacks sentence_A, sentence_B or relatedness_score") from None
    pairs = Pairs([], [], [])
    for number, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) <= max(a, b, score):
            raise malformed(path, number, f"expected {len(header)} tab-separated fields, got {len(row)}")
        pairs.first.append(row[a])
        pairs.second.append(row[b])
        pairs.gold.append(to_float(path, number, row[score], "relatedness_score"))
    at_least(path, len(pairs.gold), 2, "scored pairs")
    return pairs


def load_sts_year(data_dir, name: str) -> Pairs:
    """SemEval STS 20xx: every `*input.SUBSET.txt` with its `*gs.SUBSET.txt`; unscored lines skipped.

    A subset whose input file is absent (STS13 SMT is not redistributable) is left out.
    """
    folder = data_path(data_dir, "sts12_16", STS_YEARS[name])
    inputs = sorted(folder.glob("*input.*.txt"))
    if not inputs:
        raise malformed(folder, None, "no STS*.input.*.txt files")
    pairs = Pairs([], [], [])
    for input_path in inputs:
        gold_path = input_path.with_name(input_path.name.replace("input.", "gs.", 1))
        if not gold_path.exists():
            raise malformed(gold_path, None, f"gold scores for {input_path.name} missing")
        sentences, scores = read_lines(input_path), read_lines(gold_path)
        if len(sentences) != len(scores):
            raise malformed(gold_path, None, f"{len(scores)} lines but {input_path.name} has {len(sentences)}")
        for number, (line, score) in enumerate(zip(sentences, scores), start=1):
            if not score.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2:
                raise malformed(input_path, number, "expected two tab-separated sentences")
            pairs.first.append(fields[0])
            pairs.second.append(fields[1])
            pairs.gold.append(to_float(gold_path, number, score.strip(), "score"))
    at_least(folder, len(pairs.gold), 2, "scored pairs")
    return pairs


def score_pairs(first: np.ndarray, second: np.ndarray, gold) -> dict[str, float]:
    """STS metrics of normalised embeddings row-paired: cosine Spearman (main) and Pearson."""
    cosine = np.einsum("nd,nd->n", first, second)
    return {"main_score": metrics.spearman(cosine, gold),
            "cosine_spearman": metrics.spearman(cosine, gold),
            "cosine_pearson": metrics.pearson(cosine, gold)}


def evaluate(ctx: EvalContext, pairs: Pairs) -> dict[str, float]:
    embeddings = ctx.encode(pairs.first + pairs.second, task="sts")
    n = len(pairs.first)
    return score_pairs(embeddings[:n], embeddings[n:], pairs.gold)
