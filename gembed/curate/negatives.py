"""`negatives`: LLM-judged hard negatives (Gemini Embedding).

A first-round embedder's nearest documents of each query (exact search over the distinct
positives) are the candidates, the query's own positive, its own text and repeated texts left
out. The LLM scores every candidate twice, graded relevance and query likelihood
(`gembed.curate.judge`); each scoring ranks the query's candidates, Reciprocal Rank Fusion
combines the two rankings, and the `num_negatives` candidates with the lowest fused scores (the
ones the LLM deems least relevant; ties: the embedder's order) become the example's negatives,
replacing any it had.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence

from gembed.curate.fusion import RRF_K, reciprocal_rank_fusion
from gembed.curate.judge import DEFAULT_GRADES, grade_token_ids, query_likelihoods, relevance_scores
from gembed.curate.progress import ResumableOutput, examples_digest, run_in_chunks
from gembed.curate.prompts import Prompts, load_prompts
from gembed.data.examples import Example
from gembed.errors import GembedUserError
from gembed.evaluation.search import top_k
from gembed.llm import LanguageModel


def neighbour_candidates(embedder, examples: Sequence[Example], num_candidates: int, *,
                         task: str | None = None, batch_size: int = 64,
                         show_progress: bool = False) -> list[list[str]]:
    """Per example, up to `num_candidates` distinct positives of other examples, nearest to the
    query first (its own positive and its query text excluded)."""
    pool = list(dict.fromkeys(e.positive for e in examples))
    encode = dict(batch_size=batch_size, show_progress=show_progress)
    queries = embedder.encode([e.query for e in examples], task=task, **encode)
    _, ids = top_k(queries, embedder.encode(pool, **encode), min(num_candidates + 2, len(pool)))
    candidates = []
    for example, row in zip(examples, ids):
        texts = [pool[j] for j in row if pool[j] not in (example.positive, example.query)]
        candidates.append(list(dict.fromkeys(texts))[:num_candidates])
    return candidates


def lowest_fused(fused: dict[str, float], count: int) -> list[int]:
    """Candidate positions ("0", "1", ... as ids) of the `count` lowest fused scores; ties keep
    the lower position first."""
    return sorted((int(c) for c in fused), key=lambda c: (fused[str(c)], c))[:count]


def llm_negatives(llm: LanguageModel, embedder, examples: Sequence[Example],
                  output: str | os.PathLike, *, prompts: Prompts | None = None,
                  num_candidates: int = 10, num_negatives: int = 2, rrf_k: int = RRF_K,
                  grades: Sequence[str] = DEFAULT_GRADES, task: str | None = None,
                  max_text_tokens: int = 256, chunk_size: int = 64, embed_batch_size: int = 64,
                  show_progress: bool = False) -> dict[str, int]:
    """Writes the examples with LLM-judged `negatives` to `output` (resuming a killed run) and
    every candidate's scores to OUT.scores.jsonl; returns the counts: examples, candidates,
    negatives, short (examples left with fewer than num_negatives).

    `embedder`: the first-round model (e.g. `gembed.load(MODEL_DIR_OR_CKPT)`); `task`: the task
    prompt its queries get. Texts in LLM prompts are cut to `max_text_tokens` tokens.
    """
    prompts = prompts or load_prompts()
    if num_negatives < 1 or num_candidates < num_negatives:
        raise GembedUserError(f"--num_negatives={num_negatives} and --candidates={num_candidates}: "
                              f"need 1 <= num_negatives <= candidates.")
    grade_ids = grade_token_ids(llm, grades)
    candidates = neighbour_candidates(embedder, examples, num_candidates, task=task,
                                      batch_size=embed_batch_size, show_progress=show_progress)
    neighbours_digest = hashlib.sha256("\x00".join("\x01".join(c) for c in candidates)
                                       .encode("utf-8")).hexdigest()
    settings = {"stage": "negatives", **llm.settings(), "prompts": dataclasses.asdict(prompts),
                "input": examples_digest(examples), "candidates": neighbours_digest,
                "num_candidates": num_candidates, "num_negatives": num_negatives,
                "rrf_k": rrf_k, "grades": list(grades), "max_text_tokens": max_text_tokens,
                "chunk_size": chunk_size}
    out = ResumableOutput(output, settings)

    def process(start: int, stop: int):
        pairs = [(i, c) for i in range(start, stop) for c in range(len(candidates[i]))]
        queries = [llm.truncate(examples[i].query, max_text_tokens) for i, _ in pairs]
        texts = [llm.truncate(candidates[i][c], max_text_tokens) for i, c in pairs]
        relevance, mass = relevance_scores(llm, prompts, grade_ids, queries, texts)
        likelihood = query_likelihoods(llm, prompts, queries, texts)
        scorings = ({}, {})
        for (i, c), r, q in zip(pairs, relevance, likelihood):
            scorings[0].setdefault(str(i), {})[str(c)] = float(r)
            scorings[1].setdefault(str(i), {})[str(c)] = float(q)
        fused = reciprocal_rank_fusion(scorings, k=rrf_k)
        mined, records = [], []
        for i in range(start, stop):
            chosen = lowest_fused(fused.get(str(i), {}), num_negatives)
            mined.append(dataclasses.replace(
                examples[i], negatives=tuple(candidates[i][c] for c in chosen)))
            records.append({"index": i, "candidates": [
                {"text": candidates[i][c], "relevance": scorings[0][str(i)][str(c)],
                 "grade_mass": float(mass[n]), "query_likelihood": scorings[1][str(i)][str(c)],
                 "rrf": fused[str(i)][str(c)], "negative": c in chosen}
                for n, (j, c) in enumerate(pairs) if j == i]})
        negatives = sum(len(e.negatives) for e in mined)
        return mined, records, {"examples": stop - start, "candidates": len(pairs),
                                "negatives": negatives,
                                "short": sum(len(e.negatives) < num_negatives for e in mined)}

    return run_in_chunks(out, len(examples), chunk_size, process, "negatives", show_progress)
