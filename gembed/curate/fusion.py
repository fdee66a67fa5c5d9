"""Reciprocal Rank Fusion (Cormack et al., 2009) of several scorings of the same candidates, with
`ranx`: a candidate ranked r_j (1 = highest score) by scoring j gets sum_j 1 / (k + r_j).
ranx compiles its numba kernels on first use in a process (tens of seconds on a small CPU).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from ranx import Run, fuse

RRF_K = 60   # the constant of the RRF paper and of ranx


def reciprocal_rank_fusion(scorings: Sequence[Mapping[str, Mapping[str, float]]], k: int = RRF_K
                           ) -> dict[str, dict[str, float]]:
    """Fused scores {query id: {candidate id: score}} of scorings of the same form, each ranking
    a query's candidates by decreasing score. Queries without candidates are left out."""
    scorings = [{query: dict(scores) for query, scores in scoring.items() if scores}
                for scoring in scorings]
    if not scorings[0]:
        return {}
    fused = fuse([Run(scoring) for scoring in scorings], norm=None, method="rrf", params={"k": k})
    return {query: dict(scores) for query, scores in fused.to_dict().items()}
