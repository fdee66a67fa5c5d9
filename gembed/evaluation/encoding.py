"""Embedding texts for evaluation through the encoder protocol.

Any object with `encode(texts, task=None, dim=None, batch_size=..., show_progress=...)` returning
L2-normalised float32 rows works (gembed's `Embedder`, or an adapter around another model). Each
distinct text is embedded once. `task` names the task family on the query side
("sts", "retrieval", "code_search", "classification", "clustering", "pair_classification",
"bitext"), so a model folder's task prompts can apply; documents are encoded with task=None.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def encode(encoder, texts: Sequence[str], task: str | None = None, batch_size: int = 64,
           dim: int | None = None) -> np.ndarray:
    """float32[len(texts), D] embeddings, computed once per distinct text."""
    unique = list(dict.fromkeys(texts))
    index = {text: i for i, text in enumerate(unique)}
    embeddings = np.asarray(encoder.encode(unique, task=task, dim=dim, batch_size=batch_size,
                                           show_progress=False), np.float32)
    return embeddings[[index[text] for text in texts]]
