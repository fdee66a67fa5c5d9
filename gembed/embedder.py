"""Inference: `Embedder.encode(texts) -> float32[N, dim]`, L2-normalised rows.

Texts are sorted by token length and padded to a few bucket lengths (four per octave: 16, 32, 48,
64, 80, ...), and batches are padded to `batch_size` rows, so only a handful of shapes is ever
compiled however many calls. Each batch is dispatched before the previous one is read back, so
the host prepares batch i+1 while the device computes batch i. An `Embedder` is built from a
model folder (`gembed.load`) or a training CKPT (`gembed.workdir.read_checkpoint_model`); it reads
no files itself.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import numpy as np
import tqdm

from gembed.data.batching import bucket_length
from gembed.model import EmbeddingModel, ModelConfig
from gembed.mteb_protocol import MtebEncoderMixin

BUCKETS_PER_OCTAVE = 4   # from 64 tokens up padding waste <= 25% (vs 100% for powers of two)


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
    def of(cls, model) -> "Embedder":
        """The Embedder of a read model: a `ModelFolder` or a `workdir.CheckpointModel`."""
        return cls(model.model_config, jax.device_put(model.params), model.tokenizer,
                   model.max_length, model.task_prompts)

    @property
    def embedding_size(self) -> int:
        return self.model_config.embedding_size

    def encode(self, texts: Sequence[str], task: str | None = None, dim: int | None = None,
               batch_size: int = 64, show_progress: bool = False, **mteb_kwargs) -> np.ndarray:
        """float32[len(texts), dim or embedding_size], rows L2-normalised.

        `task` prepends that task's prompt (query side); `dim` keeps the first `dim` coordinates
        (Matryoshka) before normalising. Called by mteb (with `task_metadata=...` etc.), `texts` is
        its DataLoader.
        """
        if mteb_kwargs:
            return self.encode_mteb(texts, dim=dim, batch_size=batch_size, **mteb_kwargs)
        dim = dim or self.embedding_size
        if not 0 < dim <= self.embedding_size:
            raise ValueError(f"dim={dim} must be in 1..{self.embedding_size}")
        prompt = self.task_prompts.get(task, "") if task is not None else ""
        token_lists = self.tokenizer.encode([prompt + text for text in texts], self.max_length,
                                            add_eos=self.model_config.pooling == "last")
        order = np.argsort([len(ids) for ids in token_lists], kind="stable")
        output = np.zeros((len(texts), dim), np.float32)

        def read_back(rows, embeddings):
            output[rows] = np.asarray(embeddings)[:len(rows), :dim]

        in_flight = None   # (rows, embeddings being computed) of the previous batch
        for start in tqdm.trange(0, len(texts), batch_size, desc="encode",
                                 disable=not show_progress):
            rows = order[start:start + batch_size]
            length = bucket_length(max(len(token_lists[i]) for i in rows), self.max_length,
                                   BUCKETS_PER_OCTAVE)
            ids = np.full((batch_size, length), self.tokenizer.pad_id, np.int32)
            mask = np.zeros((batch_size, length), bool)
            for slot, i in enumerate(rows):
                ids[slot, :len(token_lists[i])] = token_lists[i]
                mask[slot, :len(token_lists[i])] = True
            dispatched = (rows, self._embed(self.params, ids, mask))
            if in_flight is not None:
                read_back(*in_flight)
            in_flight = dispatched
        if in_flight is not None:
            read_back(*in_flight)
        norms = np.linalg.norm(output, axis=1, keepdims=True)
        return output / np.maximum(norms, 1e-12)
