"""Code search: each query has one gold function in a pool; MRR over the full ranking (main).

- `cosqa`: CoSQA retrieval test (500 web queries) over the 6,267-function pool, as UniXcoder.
- `csn_ruby`: CodeXGLUE CodeSearchNet Ruby test, docstring -> code over the 1,261 test functions.
- `stdlib_code`: built-in stdlib docstring summary -> function over the split's functions (no
  data needed): the test split (`stdlib_code`), or validation (`stdlib_code:validation`) for
  every model-selection choice.
"""
from __future__ import annotations

from typing import NamedTuple

from gembed.data.builtin import load_builtin
from gembed.evaluation import metrics, ranking
from gembed.evaluation.context import EvalContext
from gembed.evaluation.data_files import at_least, data_path, malformed, read_json, read_jsonl


class CodeSearchSet(NamedTuple):
    queries: list[str]
    codes: list[str]
    gold: list[int]        # index into codes of each query's function


def load_cosqa(data_dir, split: str = "test") -> CodeSearchSet:
    queries_path = data_path(data_dir, "cosqa", f"cosqa-retrieval-{split}-500.json")
    pool_path = data_path(data_dir, "cosqa", "code_idx_map.txt")
    pool = read_json(pool_path)
    if not isinstance(pool, dict):
        raise malformed(pool_path, None, "expected a JSON object {code: index}")
    codes = [""] * len(pool)
    for code, index in pool.items():
        if not isinstance(index, int) or not 0 <= index < len(pool):
            raise malformed(pool_path, None, f"index {index!r} out of range 0..{len(pool) - 1}")
        codes[index] = code
    items = read_json(queries_path)
    if not isinstance(items, list):
        raise malformed(queries_path, None, "expected a JSON list of query objects")
    at_least(pool_path, len(codes), 2, "functions")
    at_least(queries_path, len(items), 1, "queries")
    queries, gold = [], []
    for item in items:
        if "doc" not in item or "retrieval_idx" not in item:
            raise malformed(queries_path, None, f"item {item.get('idx')!r} lacks doc or retrieval_idx")
        queries.append(item["doc"])
        gold.append(int(item["retrieval_idx"]))
    return CodeSearchSet(queries, codes, gold)


def load_csn(data_dir, language: str = "ruby") -> CodeSearchSet:
    path = data_path(data_dir, f"codexglue_csn_{language}", "test.jsonl")
    queries, codes = [], []
    for number, row in read_jsonl(path):
        if "docstring" not in row or "code" not in row:
            raise malformed(path, number, "expected \"docstring\" and \"code\" fields")
        queries.append(row["docstring"])
        codes.append(row["code"])
    at_least(path, len(codes), 2, "functions")
    return CodeSearchSet(queries, codes, list(range(len(codes))))


def load_stdlib_code(split: str = "test") -> CodeSearchSet:
    examples = load_builtin("stdlib_code", split)
    return CodeSearchSet([e.query for e in examples], [e.positive for e in examples],
                         list(range(len(examples))))


def evaluate(ctx: EvalContext, data: CodeSearchSet) -> dict[str, float]:
    ranks = ranking.ranker(ctx).gold_ranks(data.queries, data.codes, data.gold, task="code_search")
    return metrics.gold_rank_scores(ranks)
