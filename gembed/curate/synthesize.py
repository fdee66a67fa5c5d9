"""`synthesize`: synthetic queries for passages by few-shot prompting, kept when the LLM, as a
rater, grades the (query, passage) pair relevant enough (Gemini Embedding's synthetic data).

Per passage i: `num_shots` demonstrations drawn from `shots` (other passages' pairs) with the
generator seeded by (seed, i), one sampled query (PRNG key fold_in(seed, i)), its first line kept,
then the relevance score of (query, passage); pairs scoring below `min_score` are dropped.
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence

import numpy as np

from gembed.curate.judge import DEFAULT_GRADES, grade_token_ids, relevance_scores
from gembed.curate.progress import ResumableOutput, examples_digest, run_in_chunks
from gembed.curate.prompts import Prompts, load_prompts
from gembed.data.examples import Example
from gembed.errors import GembedUserError
from gembed.llm import LanguageModel

ANSWER_LABEL = re.compile(r"^\s*query\s*:\s*", re.IGNORECASE)


def first_line(text: str) -> str:
    """The generated query: the first non-blank line, without a leading "Query:" or quotes."""
    line = next((line for line in text.splitlines() if line.strip()), "")
    return ANSWER_LABEL.sub("", line).strip().strip("\"'`").strip()


def _shot_indices(rng: np.random.Generator, shots: Sequence[Example], passage: str,
                  num_shots: int) -> list[int]:
    if not shots or not num_shots:
        return []
    drawn = rng.choice(len(shots), size=min(len(shots), num_shots + 1), replace=False)
    return [int(j) for j in drawn if shots[j].positive != passage][:num_shots]


def synthesize(llm: LanguageModel, passages: Sequence[str], output: str | os.PathLike, *,
               shots: Sequence[Example] = (), prompts: Prompts | None = None, num_shots: int = 3,
               max_new_tokens: int = 48, temperature: float = 0.7, top_p: float = 0.95,
               seed: int = 0, grades: Sequence[str] = DEFAULT_GRADES, min_score: float = 0.5,
               max_text_tokens: int = 256, task: str | None = None, chunk_size: int = 64,
               show_progress: bool = False) -> dict[str, int]:
    """Writes (synthetic query, passage) examples to `output` (resuming a killed run); returns the
    counts: passages, generated (non-empty queries), kept, dropped_empty, dropped_by_rater.

    Texts in prompts are cut to `max_text_tokens` tokens; `task` is written on every example.
    """
    prompts = prompts or load_prompts()
    if max_new_tokens < 1 or max_text_tokens < 1:
        raise GembedUserError("--max_new_tokens and --max_text_tokens must be positive integers.")
    grade_ids = grade_token_ids(llm, grades)
    settings = {"stage": "synthesize", **llm.settings(), "prompts": dataclasses.asdict(prompts),
                "input": examples_digest(Example("", p) for p in passages),
                "shots": examples_digest(shots), "num_shots": num_shots,
                "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                "seed": seed, "grades": list(grades), "min_score": min_score,
                "max_text_tokens": max_text_tokens, "task": task, "chunk_size": chunk_size}
    out = ResumableOutput(output, settings)
    cut = lambda text: llm.truncate(text, max_text_tokens)  # noqa: E731

    def process(start: int, stop: int):
        texts = [cut(p) for p in passages[start:stop]]
        requests = []
        for index, passage in zip(range(start, stop), texts):
            rng = np.random.default_rng([seed, index])
            demonstrations = "".join(
                prompts.shot.format(query=cut(shots[j].query), passage=cut(shots[j].positive))
                + "\n\n" for j in _shot_indices(rng, shots, passages[index], num_shots))
            requests.append(prompts.synthesize.format(shots=demonstrations, passage=passage))
        queries = [first_line(text) for text in llm.generate(
            requests, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            seed=seed, sample_ids=range(start, stop))]
        rated = [i for i, query in enumerate(queries) if query]
        scores, mass = relevance_scores(llm, prompts, grade_ids, [queries[i] for i in rated],
                                        [texts[i] for i in rated])
        score_of = {i: (float(s), float(m)) for i, s, m in zip(rated, scores, mass)}
        examples, records = [], []
        for i, query in enumerate(queries):
            score, grade_mass = score_of.get(i, (None, None))
            kept = score is not None and score >= min_score
            records.append({"index": start + i, "query": query, "score": score,
                            "grade_mass": grade_mass, "kept": kept})
            if kept:
                examples.append(Example(query=query, positive=passages[start + i], task=task))
        counts = {"passages": stop - start, "generated": len(rated), "kept": len(examples),
                  "dropped_empty": stop - start - len(rated),
                  "dropped_by_rater": len(rated) - len(examples)}
        return examples, records, counts

    return run_in_chunks(out, len(passages), chunk_size, process, "synthesize", show_progress)
