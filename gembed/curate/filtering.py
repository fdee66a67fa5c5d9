"""`filter`: the LLM grades each (query, positive) pair; pairs scoring below `min_score` are
dropped (Gemini Embedding's filtering of noisy human pairs). Kept examples are written unchanged.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from gembed.curate.judge import DEFAULT_GRADES, grade_token_ids, relevance_scores
from gembed.curate.progress import ResumableOutput, examples_digest, run_in_chunks
from gembed.curate.prompts import Prompts, load_prompts
from gembed.data.examples import Example
from gembed.errors import GembedUserError
from gembed.llm import LanguageModel


def filter_pairs(llm: LanguageModel, examples: Sequence[Example], output: str | os.PathLike, *,
                 prompts: Prompts | None = None, grades: Sequence[str] = DEFAULT_GRADES,
                 min_score: float = 0.5, max_text_tokens: int = 256, chunk_size: int = 64,
                 show_progress: bool = False) -> dict[str, int]:
    """Writes the examples whose relevance score (in [0, 1], `gembed.curate.judge`) is at least
    `min_score` to `output` (resuming a killed run), each pair's score to OUT.scores.jsonl;
    returns the counts: examples, kept, dropped. Texts in prompts are cut to `max_text_tokens`."""
    prompts = prompts or load_prompts()
    if max_text_tokens < 1:
        raise GembedUserError(f"--max_text_tokens={max_text_tokens} must be a positive integer.")
    grade_ids = grade_token_ids(llm, grades)
    settings = {"stage": "filter", **llm.settings(), "prompts": dataclasses.asdict(prompts),
                "input": examples_digest(examples), "grades": list(grades),
                "min_score": min_score, "max_text_tokens": max_text_tokens,
                "chunk_size": chunk_size}
    out = ResumableOutput(output, settings)

    def process(start: int, stop: int):
        chunk = examples[start:stop]
        scores, mass = relevance_scores(
            llm, prompts, grade_ids, [llm.truncate(e.query, max_text_tokens) for e in chunk],
            [llm.truncate(e.positive, max_text_tokens) for e in chunk])
        kept = [e for e, score in zip(chunk, scores) if score >= min_score]
        records = [{"index": start + i, "score": float(score), "grade_mass": float(m),
                    "kept": bool(score >= min_score)}
                   for i, (score, m) in enumerate(zip(scores, mass))]
        return kept, records, {"examples": len(chunk), "kept": len(kept),
                               "dropped": len(chunk) - len(kept)}

    return run_in_chunks(out, len(examples), chunk_size, process, "filter", show_progress)
