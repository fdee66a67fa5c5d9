"""MTEB (>= 2.0) encoder protocol for gembed encoders; `pip install -e ".[mteb]"`.

mteb 2.x calls `encode(inputs: DataLoader[BatchedInput], *, task_metadata, hf_split, hf_subset,
prompt_type=None, **kwargs)` (each batch a dict whose "text" holds a list of strings), and uses
`similarity`, `similarity_pairwise` and the `mteb_model_meta` property. `MtebEncoderMixin` supplies
all of these on top of gembed's own `encode(texts, task=None, dim=None, batch_size=...)`; `Embedder`
inherits it, and `MtebEncoder` wraps any other object with the gembed encoder protocol:

    import mteb, gembed
    model = gembed.load("model_dir")          # an Embedder: mteb can evaluate it directly
    mteb.evaluate(model, mteb.get_tasks(tasks=["STSBenchmark"]))

The task prompt is chosen from the MTEB task type, on the query side only (documents of retrieval
tasks get none), with the same family keys `gembed eval` uses ("sts", "retrieval", ...). mteb is an
optional dependency, imported only when one of these methods runs.
"""
from __future__ import annotations

from typing import Any

import numpy as np

# MTEB task type -> gembed task family key (see gembed.evaluation.encoding).
MTEB_TYPE_TO_TASK = {
    "STS": "sts", "Retrieval": "retrieval", "Reranking": "retrieval", "InstructionRetrieval": "retrieval",
    "Classification": "classification", "MultilabelClassification": "classification",
    "Clustering": "clustering", "PairClassification": "pair_classification",
    "BitextMining": "bitext", "Summarization": "sts",
}


def task_for(task_metadata: Any, prompt_type: Any) -> str | None:
    """The gembed task key for an MTEB call: None for the document side of retrieval."""
    if prompt_type is not None and getattr(prompt_type, "value", prompt_type) in ("passage", "document"):
        return None
    return MTEB_TYPE_TO_TASK.get(getattr(task_metadata, "type", None))


def texts_of(inputs: Any) -> list[str]:
    """The texts of an MTEB DataLoader (batches of {"text": [...]}) or of a plain list."""
    if isinstance(inputs, (list, tuple)) and all(isinstance(t, str) for t in inputs):
        return list(inputs)
    texts: list[str] = []
    for batch in inputs:
        texts.extend(batch["text"])
    return texts


class MtebEncoderMixin:
    """Adds MTEB 2.x's encoder protocol to a class whose `encode(texts, task=..., dim=...,
    batch_size=...)` returns L2-normalised rows."""

    mteb_name: str = "gembed/model"
    mteb_revision: str = "local"

    def encode_mteb(self, inputs, *, task_metadata=None, hf_split=None, hf_subset=None,
                    prompt_type=None, batch_size: int = 64, dim: int | None = None,
                    **unused) -> np.ndarray:
        return self.encode(texts_of(inputs), task=task_for(task_metadata, prompt_type), dim=dim,
                           batch_size=batch_size)

    def similarity(self, embeddings1, embeddings2):
        from mteb.similarity_functions import cos_sim

        return cos_sim(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2):
        from mteb.similarity_functions import pairwise_cos_sim

        return pairwise_cos_sim(embeddings1, embeddings2)

    @property
    def mteb_model_meta(self):
        from mteb.models.model_meta import ModelMeta

        size = getattr(self, "embedding_size", None)
        return ModelMeta.create_empty({"name": self.mteb_name, "revision": self.mteb_revision,
                                       "embed_dim": size, "similarity_fn_name": "cosine",
                                       "framework": []})


class MtebEncoder(MtebEncoderMixin):
    """Any gembed-protocol encoder, for mteb: `mteb.evaluate(MtebEncoder(encoder), tasks)`."""

    def __init__(self, encoder, name: str = "gembed/model", revision: str = "local",
                 dim: int | None = None, batch_size: int = 64):
        self.encoder, self.dim, self.batch_size = encoder, dim, batch_size
        self.mteb_name, self.mteb_revision = name, revision

    def encode(self, inputs, task=None, dim=None, batch_size=None, show_progress=False, **mteb_kwargs):
        if mteb_kwargs:   # called by mteb
            return self.encode_mteb(inputs, dim=self.dim, batch_size=self.batch_size, **mteb_kwargs)
        return self.encoder.encode(inputs, task=task, dim=dim or self.dim,
                                   batch_size=batch_size or self.batch_size, show_progress=show_progress)
