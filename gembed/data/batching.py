"""Examples -> tokenized, fixed-shape training batches, addressed by step.

The order of examples is a pure function of (seed, step): per dataset, a grain `MapDataset`
shuffles example indices per epoch and groups them into global batches, and `MapDataset.mix`
interleaves the datasets' batches by their weights, so every batch comes from one dataset and the
batch of step s can be built without reading steps 0..s-1. The data iterator's whole state is
therefore the step, which every checkpoint holds: resuming at step s sees exactly the examples an
uninterrupted run would have seen. Each process tokenizes only its own rows of the global batch
(`sharding.host_slice`).

A batch holds, per example, `2 + k` text slots: 0 = query, 1 = positive, 2.. = hard negatives.
By default the texts are packed into MAX_LENGTH rows (`gembed.data.packing`): the examples are cut
into equal, contiguous groups (one per data-parallel device, or one per gradient-cache chunk), each
group's texts are packed into the same number of rows, and a text's segment id is its index within
its group, so a device (or a chunk) holds whole texts of its own examples only.
"""
from __future__ import annotations

import functools
import hashlib
from typing import Callable, Iterator, Sequence

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils

from gembed.data.examples import Example
from gembed.data.mixture import TrainingDataset
from gembed.data.packing import pack
from gembed.errors import GembedUserError
from gembed.losses.contrastive import text_keys

QUERY_SLOT, POSITIVE_SLOT, FIRST_NEGATIVE_SLOT = 0, 1, 2
MIN_BUCKET = 16


def bucket_length(length: int, max_length: int, steps_per_octave: int = 1) -> int:
    """The padded length for `length` tokens: the next bucket (at least 16), capped.

    Buckets split each octave [2^k, 2^(k+1)) into `steps_per_octave` equal steps of at least 16
    tokens: 1 gives the powers of two (16, 32, 64, ...), 4 gives 16, 32, 48, 64, 80, ..., 128, 160,
    .... Padding to a few bucket lengths instead of max_length cuts padding waste (from 64 tokens
    up at most a factor 1 + 1/steps_per_octave for a power-of-two steps_per_octave) while keeping the number of compiled shapes at about
    steps_per_octave * log2(max_length / 16) + 1.
    """
    bucket = MIN_BUCKET
    while bucket < length:
        octave_start = 1 << (bucket.bit_length() - 1)
        bucket += max(MIN_BUCKET, octave_start // steps_per_octave)
    return min(bucket, max_length)


TOKEN_ARRAYS = ("token_ids", "token_mask", "segment_ids", "positions")


def pad_to_common_shape(host_batch: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """Pads this process's token arrays to the largest of all processes (multi-host): the longest
    length bucket (padded batches) or the most rows per group (packed batches)."""
    if jax.process_count() == 1:
        return host_batch
    axis = -2 if "segment_ids" in host_batch else -1
    size = host_batch["token_ids"].shape[axis]
    common = int(np.max(multihost_utils.process_allgather(np.int32(size))))
    if common == size:
        return host_batch
    padded = dict(host_batch)
    for name in TOKEN_ARRAYS:
        if name in host_batch:
            padding = [(0, 0)] * host_batch[name].ndim
            padding[axis] = (0, common - size)
            padded[name] = np.pad(host_batch[name], padding,
                                  constant_values=pad_id if name == "token_ids" else 0)
    return padded


def global_batch_indices(datasets: Sequence[TrainingDataset], batch_size: int,
                         seed: int) -> grain.MapDataset:
    """Step -> (dataset index, int64[batch_size] example indices in it); endless.

    Each dataset is reshuffled every epoch; steps go to datasets in proportion to their weights.
    """
    per_dataset = [
        grain.MapDataset.range(len(dataset.examples))
        .shuffle(seed=seed + index)
        .repeat(None)
        .batch(batch_size, drop_remainder=True)
        .map(lambda indices, index=index: (index, indices))
        for index, dataset in enumerate(datasets)]
    if len(per_dataset) == 1:
        return per_dataset[0]
    return grain.MapDataset.mix(per_dataset, weights=[d.spec.weight for d in datasets])


class TrainBatches:
    """Host-local training batches for one process.

    Each batch is a dict of NumPy arrays; `b` is this process's examples and S = 2+k slots:
      text_valid bool [b, S]        False on hard-negative slots the example lacks
      text_keys  int32[b, S, 2]     64-bit text identity (duplicate masking)
    Packed (`pack_groups` > 0; G = pack_groups groups of b/G examples, R rows per group, a
    multiple of `gembed.data.packing.ROW_MULTIPLE`, L = max_length):
      token_ids, token_mask, segment_ids, positions   [G, R, L]; the segment id of text s of the
        group's example e is e * S + s (`gembed.data.packing.pack`)
    Padded (`pack_groups` = 0):
      token_ids  int32[b, S, L]     right-padded with `tokenizer.pad_id`; L = max_length, or
                                    with length_buckets the bucket of the longest text
      token_mask bool [b, S, L]     True on real tokens
    With `teacher_vectors` (raw texts -> f32[N, Dt], e.g. `gembed.teacher_cache.TeacherVectors.lookup`):
      teacher_vectors f32[b, S, Dt]  the teacher's vector of each slot's text (zeros if invalid)
    Queries carry their dataset's query prompt, documents its document prompt.
    """

    def __init__(self, datasets: Sequence[TrainingDataset], tokenizer, *, batch_size: int,
                 max_length: int, num_hard_negatives: int, seed: int, add_eos: bool,
                 rows: slice, pack_groups: int = 0, length_buckets: bool = False,
                 teacher_vectors: Callable[[Sequence[str]], np.ndarray] | None = None):
        local_examples = len(range(batch_size)[rows])
        if pack_groups < 0 or (pack_groups and local_examples % pack_groups):
            raise ValueError(f"{local_examples} examples do not split into {pack_groups} groups")
        self.datasets = list(datasets)
        self._length_buckets = length_buckets
        self._pack_groups = pack_groups
        self._tokenizer = tokenizer
        self._max_length = max_length
        self._num_slots = FIRST_NEGATIVE_SLOT + num_hard_negatives
        self._add_eos = add_eos
        self._rows = rows
        self._teacher_vectors = teacher_vectors
        for dataset in self.datasets:
            if len(dataset.examples) < batch_size:
                raise GembedUserError(
                    f"{dataset.spec.data}: {len(dataset.examples)} examples, fewer than "
                    f"BATCH_SIZE={batch_size}; use a smaller batch or more data.")
        indices = global_batch_indices(self.datasets, batch_size, seed)
        self._indices = functools.lru_cache(maxsize=16)(indices.__getitem__)

    def dataset_index(self, step: int) -> int:
        """Which dataset the batch of `step` comes from."""
        return int(self._indices(step)[0])

    def example_indices(self, step: int) -> np.ndarray:
        """int64[b]: indices into that dataset's examples of this process's rows at `step`."""
        return np.asarray(self._indices(step)[1])[self._rows]

    def fingerprint(self, step: int) -> bytes:
        """8 bytes identifying the (dataset, examples) of the whole global batch of `step`."""
        index, indices = self._indices(step)
        payload = np.concatenate([[index], np.asarray(indices)]).astype("<i8").tobytes()
        return hashlib.blake2b(payload, digest_size=8).digest()

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        dataset = self.datasets[self.dataset_index(step)]
        examples = [dataset.examples[i] for i in self.example_indices(step)]
        return self._tokenize(examples, dataset.spec.query_prompt, dataset.spec.document_prompt)

    def iterate(self, start_step: int, prefetch: int = 4,
                num_steps: int = 1 << 40) -> Iterator[dict[str, np.ndarray]]:
        """Batches for steps start_step, ..., start_step + num_steps - 1, prepared by a background thread."""
        steps = grain.MapDataset.range(start_step, start_step + num_steps).map(self.__getitem__)
        options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch)
        return iter(steps.to_iter_dataset(options))

    def _tokenize(self, examples: Sequence[Example], query_prompt: str,
                  document_prompt: str) -> dict[str, np.ndarray]:
        rows, slots, length = len(examples), self._num_slots, self._max_length
        texts, valid = [], np.zeros((rows, slots), bool)
        for row, example in enumerate(examples):
            negatives = list(example.negatives[: slots - FIRST_NEGATIVE_SLOT])
            valid[row, : FIRST_NEGATIVE_SLOT + len(negatives)] = True
            padding = [""] * (slots - FIRST_NEGATIVE_SLOT - len(negatives))
            texts.extend([example.query, example.positive, *negatives, *padding])
        prompts = [query_prompt] + [document_prompt] * (slots - 1)
        prompted = [prompts[i % slots] + text if text else text for i, text in enumerate(texts)]
        token_lists = self._tokenizer.encode(prompted, length, add_eos=self._add_eos)
        keys = text_keys(texts).reshape(rows, slots, 2)
        extra = {} if self._teacher_vectors is None else {
            "teacher_vectors": self._teacher_vectors(texts).reshape(rows, slots, -1)}
        if self._pack_groups:
            return {**self._pack(token_lists, valid.reshape(-1)), "text_valid": valid,
                    "text_keys": keys, **extra}
        if self._length_buckets:
            length = bucket_length(max(map(len, token_lists)), length)
        token_ids = np.full((rows * slots, length), self._tokenizer.pad_id, np.int32)
        token_mask = np.zeros((rows * slots, length), bool)
        for i, ids in enumerate(token_lists):
            token_ids[i, : len(ids)] = ids
            token_mask[i, : len(ids)] = True
        token_mask &= valid.reshape(-1, 1)
        return {
            "token_ids": token_ids.reshape(rows, slots, length),
            "token_mask": token_mask.reshape(rows, slots, length),
            "text_valid": valid,
            "text_keys": keys,
            **extra,
        }


    def _pack(self, token_lists: list[list[int]], valid: np.ndarray) -> dict[str, np.ndarray]:
        """Each group's texts packed into the same number of rows: arrays [G, R, max_length]."""
        texts_per_group = len(token_lists) // self._pack_groups
        groups = [pack(token_lists[start:start + texts_per_group], self._max_length,
                       self._tokenizer.pad_id, keep=valid[start:start + texts_per_group])
                  for start in range(0, len(token_lists), texts_per_group)]
        rows = max(group["token_ids"].shape[0] for group in groups)
        return {name: np.stack([np.pad(group[name], [(0, rows - len(group[name])), (0, 0)],
                                       constant_values=self._tokenizer.pad_id
                                       if name == "token_ids" else 0)
                                for group in groups])
                for name in TOKEN_ARRAYS}


class DataWindow:
    """What the steps since the last log line trained on, for `metrics.jsonl`.

    `examples_digest` chains the fingerprints of every step's global batch, so two runs that log
    the same digests saw the same examples in the same order (an exact-resume check).
    """

    def __init__(self, batches: TrainBatches):
        self._batches = batches
        self._names = [dataset.spec.name for dataset in batches.datasets]
        self._steps: dict[str, int] = {}
        self._digest = hashlib.blake2b(digest_size=8)

    def add(self, step: int) -> None:
        name = self._names[self._batches.dataset_index(step)]
        self._steps[name] = self._steps.get(name, 0) + 1
        self._digest.update(self._batches.fingerprint(step))

    def flush(self) -> dict:
        """{"steps_per_dataset": {name: steps}, "examples_digest": hex} of the window; resets it."""
        values = {"steps_per_dataset": dict(self._steps),
                  "examples_digest": self._digest.hexdigest()}
        self._steps, self._digest = {}, hashlib.blake2b(digest_size=8)
        return values
