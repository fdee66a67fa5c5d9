"""Inference: `Embedder.encode(texts) -> float32[N, dim]`, L2-normalised rows.

Texts are sorted by token length and embedded in calls of a fixed token budget (`batch_size` x
max_length tokens), so short texts go many to a call and long ones few (`plan_calls`); a call's
texts are padded to a bucket length (four per octave: 16, 32, 48, 64, 80, ...) and its rows to the
bucket's capacity, or to a power of two for a partial call, so few shapes are compiled however
many calls. Each call is dispatched before the previous one is read back, so the host prepares
call i+1 while the device computes call i. An `Embedder` is built from a model folder
(`gembed.load`) or a training CKPT (`gembed.workdir.read_checkpoint_model`); it reads no files.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np
import tqdm

from gembed.data.batching import bucket_length
from gembed.model import EmbeddingModel, ModelConfig
from gembed.mteb_protocol import MtebEncoderMixin

BUCKETS_PER_OCTAVE = 4   # from 64 tokens up padding waste <= 25% (vs 100% for powers of two)


class Call(NamedTuple):
    """One forward pass: texts (indices into the input), their padded length and the row count."""

    texts: np.ndarray
    length: int
    rows: int


def plan_calls(lengths: Sequence[int], max_length: int, tokens_per_call: int) -> list[Call]:
    """Calls covering every text once, in increasing length: each holds at most
    tokens_per_call // L texts padded to L = the bucket of its longest; rows are that capacity
    when full, else the next power of two (at most the capacity)."""
    order = np.argsort(np.asarray(lengths), kind="stable")

    def bucket(index) -> int:
        return bucket_length(int(lengths[index]), max_length, BUCKETS_PER_OCTAVE)

    def capacity(length: int) -> int:
        return max(1, tokens_per_call // length)

    def close(members: list[int]) -> Call:
        length = bucket(members[-1])
        rows = min(capacity(length), 1 << (len(members) - 1).bit_length())
        return Call(np.asarray(members), length, rows)

    calls, members = [], []
    for index in order:
        if members and len(members) + 1 > capacity(bucket(index)):
            calls.append(close(members))
            members = []
        members.append(int(index))
    if members:
        calls.append(close(members))
    return calls


@functools.lru_cache(maxsize=8)
def _embed_function(model_config: ModelConfig):
    """The jitted forward pass of a model config, shared by every Embedder of that config."""
    module = EmbeddingModel(model_config)
    return jax.jit(lambda params, ids, mask: module.apply({"params": params}, ids, mask))


class Embedder(MtebEncoderMixin):
    """A trained model ready to embed text: params, model config, tokenizer and max length.

    Also an MTEB 2.x encoder (see `gembed.mteb_protocol`).
    """

    def __init__(self, model_config: ModelConfig, params: Any, tokenizer, max_length: int,
                 task_prompts: dict[str, str] | None = None):
        self.model_config = model_config
        self.params = params
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.task_prompts = dict(task_prompts or {})
        self._embed = _embed_function(model_config)

    @classmethod
    def of(cls, model, matmul_precision: str | None = None) -> "Embedder":
        """The Embedder of a read model: a `ModelFolder` or a `workdir.CheckpointModel`, computing
        with `matmul_precision` (None: the model config's)."""
        config = model.model_config
        if matmul_precision is not None:
            config = dataclasses.replace(config, matmul_precision=matmul_precision)
        return cls(config, jax.device_put(model.params), model.tokenizer, model.max_length,
                   model.task_prompts)

    @property
    def embedding_size(self) -> int:
        return self.model_config.embedding_size

    def encode(self, texts: Sequence[str], task: str | None = None, dim: int | None = None,
               batch_size: int = 64, show_progress: bool = False, **mteb_kwargs) -> np.ndarray:
        """float32[len(texts), dim or embedding_size], rows L2-normalised.

        `task` prepends that task's prompt (query side); `dim` keeps the first `dim` coordinates
        (Matryoshka) before normalising; `batch_size` texts of the max length make one call's
        token budget. Called by mteb (with `task_metadata=...` etc.), `texts` is its DataLoader.
        """
        if mteb_kwargs:
            return self.encode_mteb(texts, dim=dim, batch_size=batch_size, **mteb_kwargs)
        if isinstance(texts, (str, bytes)):
            raise TypeError("encode takes a sequence of texts; wrap a single text in a list.")
        dim = self._checked_dim(dim)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be a positive number of texts")
        prompt = self.task_prompts.get(task, "") if task is not None else ""
        token_lists = self.tokenizer.encode([prompt + text for text in texts], self.max_length,
                                            add_eos=self.model_config.pooling == "last")
        calls = plan_calls([len(ids) for ids in token_lists], self.max_length,
                           batch_size * self.max_length)
        output = np.zeros((len(texts), dim), np.float32)

        def read_back(call: Call, embeddings) -> None:
            output[call.texts] = np.asarray(embeddings)[:len(call.texts), :dim]

        in_flight = None   # (call, embeddings being computed) of the previous call
        for call in tqdm.tqdm(calls, desc="encode", disable=not show_progress):
            ids = np.full((call.rows, call.length), self.tokenizer.pad_id, np.int32)
            mask = np.zeros((call.rows, call.length), bool)
            for row, index in enumerate(call.texts):
                ids[row, :len(token_lists[index])] = token_lists[index]
                mask[row, :len(token_lists[index])] = True
            dispatched = (call, self._embed(self.params, ids, mask))
            if in_flight is not None:
                read_back(*in_flight)
            in_flight = dispatched
        if in_flight is not None:
            read_back(*in_flight)
        norms = np.linalg.norm(output, axis=1, keepdims=True)
        return output / np.maximum(norms, 1e-12)

    def _checked_dim(self, dim: int | None) -> int:
        """The output size: `dim`, or the full size when None; warns (once per size) for a size
        the model was not trained to be cut at."""
        if dim is None:
            return self.embedding_size
        if not 0 < dim <= self.embedding_size:
            raise ValueError(f"dim={dim} must be in 1..{self.embedding_size} (None: full size)")
        trained = self.model_config.output_sizes or (self.embedding_size,)
        if dim not in trained:
            warnings.warn(f"dim={dim} is not one of the trained Matryoshka sizes {trained}; its "
                          f"prefix was not trained to stand alone.", stacklevel=3)
        return dim
