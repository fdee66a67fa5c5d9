"""Sequence packing: several texts per fixed-length row, so that almost no token is padding.

The rows feed the model's packed mode (`EmbeddingModel(..., segment_ids=, positions=,
num_texts=)`), where a token attends only to its own text and is embedded at its position in that
text: each text gets the embedding it would get alone in a row. Rows are filled first-fit
decreasing; their number is rounded up to a multiple of `row_multiple`, so that a few shapes are
compiled however the lengths vary.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ROW_MULTIPLE = 4


def pack(token_lists: Sequence[Sequence[int]], row_length: int, pad_id: int,
         keep: Sequence[bool] | None = None, row_multiple: int = ROW_MULTIPLE) -> dict[str, np.ndarray]:
    """Packs texts (token ids, each at most `row_length`) into R rows; texts with keep=False
    are left out (their embedding comes out as zeros).

    Returns, each [R, row_length]: token_ids int32 (pad_id on padding), token_mask bool (True on
    real tokens), segment_ids int32 (the text's index in `token_lists`; 0 on padding) and
    positions int32 (0.. within each text; 0 on padding). Each text's tokens are contiguous and in
    order, so causal attention within a row stays causal within each text.
    """
    lengths = np.array([len(ids) for ids in token_lists], np.int64)
    if lengths.size and lengths.max() > row_length:
        raise ValueError(f"a text of {lengths.max()} tokens does not fit a row of {row_length}")
    texts = np.arange(len(token_lists)) if keep is None else np.flatnonzero(keep)
    rows: list[list[int]] = []   # the texts in each row
    free: list[int] = []         # the free tokens of each row
    for text in texts[np.argsort(-lengths[texts], kind="stable")]:
        row = next((r for r, space in enumerate(free) if space >= lengths[text]), len(rows))
        if row == len(rows):
            rows.append([])
            free.append(row_length)
        rows[row].append(int(text))
        free[row] -= int(lengths[text])
    num_rows = max(row_multiple, -(-len(rows) // row_multiple) * row_multiple)
    token_ids = np.full((num_rows, row_length), pad_id, np.int32)
    segment_ids = np.zeros((num_rows, row_length), np.int32)
    positions = np.zeros((num_rows, row_length), np.int32)
    token_mask = np.zeros((num_rows, row_length), bool)
    for row, row_texts in enumerate(rows):
        start = 0
        for text in row_texts:
            end = start + len(token_lists[text])
            token_ids[row, start:end] = token_lists[text]
            segment_ids[row, start:end] = text
            positions[row, start:end] = np.arange(end - start)
            token_mask[row, start:end] = True
            start = end
    return {"token_ids": token_ids, "token_mask": token_mask, "segment_ids": segment_ids,
            "positions": positions}
