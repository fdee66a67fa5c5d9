"""Examples -> tokenized, fixed-shape training batches, addressed by step.

The order of examples is a pure function of (seed, step): a grain `MapDataset` shuffles example
indices per epoch and groups them into global batches, so the batch of step s can be built without
reading steps 0..s-1. Resuming at step s therefore sees exactly the examples an uninterrupted run
would have seen, with nothing to save but the step. Each process tokenizes only its own rows of the
global batch (`sharding.host_slice`).

A batch holds, per example, `2 + k` text slots: 0 = query, 1 = positive, 2.. = hard negatives.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import grain
import numpy as np

from gembed.data.examples import Example
from gembed.losses import text_keys

QUERY_SLOT, POSITIVE_SLOT, FIRST_NEGATIVE_SLOT = 0, 1, 2


def global_batch_indices(num_examples: int, batch_size: int, seed: int) -> grain.MapDataset:
    """Step -> int64[batch_size] example indices; reshuffled every epoch, endless."""
    return (grain.MapDataset.range(num_examples)
            .shuffle(seed=seed)
            .repeat(None)
            .batch(batch_size, drop_remainder=True))


class TrainBatches:
    """Host-local training batches for one process.

    Each batch is a dict of NumPy arrays with leading axis = this process's rows `b`:
      token_ids  int32[b, 2+k, max_length]   right-padded with `tokenizer.pad_id`
      token_mask bool [b, 2+k, max_length]   True on real tokens
      text_valid bool [b, 2+k]               False on hard-negative slots the example lacks
      text_keys  int32[b, 2+k, 2]            64-bit text identity (duplicate masking)
    """

    def __init__(self, examples: Sequence[Example], tokenizer, *, batch_size: int,
                 max_length: int, num_hard_negatives: int, seed: int, add_eos: bool,
                 rows: slice):
        self._examples = examples
        self._tokenizer = tokenizer
        self._max_length = max_length
        self._num_slots = FIRST_NEGATIVE_SLOT + num_hard_negatives
        self._add_eos = add_eos
        self._rows = rows
        self._indices = global_batch_indices(len(examples), batch_size, seed)

    def example_indices(self, step: int) -> np.ndarray:
        """int64[b]: indices into `examples` of this process's rows at `step`."""
        return np.asarray(self._indices[step])[self._rows]

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        return self._tokenize([self._examples[i] for i in self.example_indices(step)])

    def iterate(self, start_step: int, prefetch: int = 4) -> Iterator[dict[str, np.ndarray]]:
        """Batches for steps start_step, start_step+1, ..., prepared by a background thread."""
        steps = grain.MapDataset.range(start_step, start_step + (1 << 40)).map(self.__getitem__)
        options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch)
        return iter(steps.to_iter_dataset(options))

    def _tokenize(self, examples: Sequence[Example]) -> dict[str, np.ndarray]:
        rows, slots, length = len(examples), self._num_slots, self._max_length
        texts, valid = [], np.zeros((rows, slots), bool)
        for row, example in enumerate(examples):
            negatives = list(example.negatives[: slots - FIRST_NEGATIVE_SLOT])
            valid[row, : FIRST_NEGATIVE_SLOT + len(negatives)] = True
            padding = [""] * (slots - FIRST_NEGATIVE_SLOT - len(negatives))
            texts.extend([example.query, example.positive, *negatives, *padding])
        token_ids = np.full((rows * slots, length), self._tokenizer.pad_id, np.int32)
        token_mask = np.zeros((rows * slots, length), bool)
        for i, ids in enumerate(self._tokenizer.encode(texts, length, add_eos=self._add_eos)):
            token_ids[i, : len(ids)] = ids
            token_mask[i, : len(ids)] = True
        token_mask &= valid.reshape(-1, 1)
        return {
            "token_ids": token_ids.reshape(rows, slots, length),
            "token_mask": token_mask.reshape(rows, slots, length),
            "text_valid": valid,
            "text_keys": text_keys(texts).reshape(rows, slots, 2),
        }
