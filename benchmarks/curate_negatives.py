"""Candidates/s of `gembed curate negatives`' LLM scoring: graded relevance + query likelihood.

Scores --queries stdlib docstring queries x --candidates neighbours each (the candidates are other
pairs' code, as the first-round search would return them) with an LLM: a decoder folder given with
--llm, else a tiny random Llama (tests/curate_fixtures.py: hidden 32, 2 layers, byte-level BPE of
320 tokens). Both prompts are the defaults of experiments/curate/prompts/, texts cut to
--max_text_tokens. A warm-up pass compiles every shape; then --repeats timed passes. Prints one
JSON line: candidates_per_second (median and every pass) for the two prompts together and for
each alone, prompt tokens per candidate, and the load average (a shared machine is noisy).

    python benchmarks/curate_negatives.py              # a few minutes on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm", help="a Hugging Face decoder folder (default: a tiny random one)")
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--max_text_tokens", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from gembed import xla_cpu_flags

    xla_cpu_flags.apply()   # the XLA:CPU settings the gembed command runs with
    from gembed.curate import load_prompts
    from gembed.curate.judge import DEFAULT_GRADES, grade_token_ids, query_likelihoods, relevance_scores
    from gembed.data import load_builtin
    from gembed.llm import load_language_model

    pairs = load_builtin("stdlib_code", "test")
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.llm
        if folder is None:
            sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
            from curate_fixtures import write_tiny_llama

            folder = write_tiny_llama(pathlib.Path(scratch) / "llm",
                                      [t for e in pairs for t in (e.query, e.positive)])
        llm = load_language_model(str(folder), batch_size=args.batch_size)
    prompts, grades = load_prompts(), grade_token_ids(llm, DEFAULT_GRADES)
    queries, passages = [], []
    for i in range(args.queries):
        for j in range(1, args.candidates + 1):
            queries.append(llm.truncate(pairs[i].query, args.max_text_tokens))
            passages.append(llm.truncate(pairs[(i + j) % len(pairs)].positive, args.max_text_tokens))
    prompt_tokens = statistics.mean(len(ids) for ids in llm.prompt_ids(
        [prompts.relevance.format(query=q, passage=p) for q, p in zip(queries, passages)]))

    def timed(score) -> float:
        start = time.perf_counter()
        score()
        return len(queries) / (time.perf_counter() - start)

    relevance = lambda: relevance_scores(llm, prompts, grades, queries, passages)  # noqa: E731
    likelihood = lambda: query_likelihoods(llm, prompts, queries, passages)  # noqa: E731
    both = lambda: (relevance(), likelihood())  # noqa: E731
    start = time.perf_counter()
    both()
    warmup = time.perf_counter() - start
    rates = {name: [timed(score) for _ in range(args.repeats)]
             for name, score in (("both", both), ("relevance", relevance),
                                 ("query_likelihood", likelihood))}
    print(json.dumps({
        "candidates_per_second": {name: {"median": round(statistics.median(r), 1),
                                         "runs": [round(x, 1) for x in r]}
                                  for name, r in rates.items()},
        "candidates": len(queries), "relevance_prompt_tokens_mean": round(prompt_tokens, 1),
        "llm": args.llm or "tiny random llama (hidden 32, 2 layers, vocab 320)",
        "batch_size": args.batch_size, "warmup_seconds": round(warmup, 1),
        "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()}}))


if __name__ == "__main__":
    main()
