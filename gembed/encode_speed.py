"""Encode speed of an embedding model: sentences per second through `Embedder.encode`.

Every model encodes the same texts, cut to the same token count, in calls of the same batch size;
one untimed pass compiles the call shapes, then the best of `repeats` timed passes counts (the
least disturbed by other work on the machine).
"""
from __future__ import annotations

import time
from typing import Sequence

from gembed.embedder import Embedder


def sentences_per_second(embedder: Embedder, texts: Sequence[str], max_length: int,
                         batch_size: int = 64, repeats: int = 2) -> float:
    """len(texts) / the fastest of `repeats` timed encodes, each text cut to at most
    min(max_length, the model's max length) tokens of its own tokenizer."""
    timed = Embedder(embedder.model_config, embedder.params, embedder.tokenizer,
                     min(max_length, embedder.max_length), embedder.task_prompts)
    timed.encode(texts, batch_size=batch_size)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        timed.encode(texts, batch_size=batch_size)
        seconds.append(time.perf_counter() - start)
    return len(texts) / min(seconds)
