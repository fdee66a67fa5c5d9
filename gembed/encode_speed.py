"""Encode speed of an embedding model: sentences per second through `Embedder.encode`.

Every model encodes the same texts, cut to the same token count (whatever max length it was
trained or exported with), in calls of the same batch size;
one untimed pass compiles the call shapes, then the best of `repeats` timed passes counts (the
least disturbed by other work on the machine).
"""
from __future__ import annotations

import time
from typing import Sequence

from gembed.embedder import Embedder


def sentences_per_second(embedder: Embedder, texts: Sequence[str], max_length: int,
                         batch_size: int = 64, repeats: int = 3) -> float:
    """len(texts) / the fastest of `repeats` timed encodes, each text cut to at most `max_length`
    tokens of the model's own tokenizer (at most its position table)."""
    config = embedder.model_config
    limit = (config.max_position_embeddings if config.position_embedding == "learned"
             else max_length)
    timed = Embedder(config, embedder.params, embedder.tokenizer, min(max_length, limit),
                     embedder.task_prompts)
    timed.encode(texts, batch_size=batch_size)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        timed.encode(texts, batch_size=batch_size)
        seconds.append(time.perf_counter() - start)
    return len(texts) / min(seconds)
