"""The LLM's two judgements of a (query, passage) pair.

Graded relevance: the relevance prompt is followed by one grade token; with p_g the model's
next-token probabilities of the grade tokens g = 0..G-1 (least relevant first), renormalised over
them, the score is sum_g g·p_g / (G - 1), in [0, 1]. The grades' total probability before
renormalising (`grade_mass`) tells whether the model answered with a grade at all.

Query likelihood: mean over the query's tokens of log p(token | query-likelihood prompt for the
passage, the query tokens before it), in nats.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.special

from gembed.curate.prompts import Prompts
from gembed.errors import GembedUserError
from gembed.llm import LanguageModel

DEFAULT_GRADES = ("0", "1", "2", "3")


def grade_token_ids(llm: LanguageModel, grades: Sequence[str]) -> list[int]:
    """The token id of each grade label; each must be a single token of the LLM's tokenizer."""
    if len(grades) < 2:
        raise GembedUserError(f"--grades={','.join(grades)}: give at least two grade labels.")
    ids = []
    for grade, tokens in zip(grades, llm.text_ids(grades)):
        if len(tokens) != 1:
            raise GembedUserError(
                f"--grades: {grade!r} is {len(tokens)} tokens for this LLM's tokenizer; use "
                f"labels that are one token each (e.g. digits) and say so in relevance.txt.")
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise GembedUserError(f"--grades={','.join(grades)}: two labels are the same token.")
    return ids


def relevance_scores(llm: LanguageModel, prompts: Prompts, grade_ids: Sequence[int],
                     queries: Sequence[str], passages: Sequence[str]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(score, grade_mass) float64[N] of the pairs (module docstring)."""
    if not queries:
        return np.zeros(0), np.zeros(0)
    texts = [prompts.relevance.format(query=q, passage=p) for q, p in zip(queries, passages)]
    log_probs = llm.next_token_log_probs(texts, grade_ids).astype(np.float64)
    weights = scipy.special.softmax(log_probs, axis=1)
    scores = weights @ np.arange(len(grade_ids)) / (len(grade_ids) - 1)
    return scores, np.exp(scipy.special.logsumexp(log_probs, axis=1))


def query_likelihoods(llm: LanguageModel, prompts: Prompts, queries: Sequence[str],
                      passages: Sequence[str]) -> np.ndarray:
    """float64[N]: mean log p(query | passage) per pair (module docstring)."""
    texts = [prompts.query_likelihood.format(passage=p) for p in passages]
    return llm.continuation_log_likelihoods(texts, queries)[1]
