"""Inference: `Embedder.encode(texts) -> float32[N, dim]`, L2-normalised rows.

Texts are sorted by token length and padded to a few bucket lengths (four per octave: 16, 32, 48,
64, 80, ...), and batches are padded to `batch_size` rows, so only a handful of shapes is ever
compiled however many calls. Each batch is dispatched before the previous one is read back, so
the host prepares batch i+1 while the device computes batch i.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, Sequence

import jax
import numpy as np
import tqdm

from gembed import checkpoint
from gembed.data.batching import bucket_length
from gembed.data.tokenizer_files import open_tokenizer
from gembed.errors import GembedUserError
from gembed.evaluation.mteb_adapter import MtebEncoderMixin
from gembed.model import EmbeddingModel, ModelConfig, init_params

BUCKETS_PER_OCTAVE = 4   # from 64 tokens up padding waste <= 25% (vs 100% for powers of two)

class Embedder(MtebEncoderMixin):
    """A trained model ready to embed text: params, model config, tokenizer and max length.

    Also an MTEB 2.x encoder (see `gembed.evaluation.mteb_adapter`).
    """

    def __init__(self, model_config: ModelConfig, params: Any, tokenizer, max_length: int,
                 task_prompts: dict[str, str] | None = None):
        self.model_config = model_config
        self.params = params
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.task_prompts = dict(task_prompts or {})
        module = EmbeddingModel(model_config)
        self._embed = jax.jit(lambda p, ids, mask: module.apply({"params": p}, ids, mask))

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


def recorded_max_length(workdir) -> int:
    """The max length (tokens per text) a training workdir recorded in its embedder.json."""
    from gembed.train import EMBEDDER_FILE

    path = pathlib.Path(workdir) / EMBEDDER_FILE
    if not path.is_file():
        raise GembedUserError(f"{path}: missing (a run older than this gembed version); "
                              f"pass --max_length, the MAX_LENGTH the run trained with.")
    return int(json.loads(path.read_text())["max_length"])


def load_params(ref: checkpoint.CheckpointRef) -> tuple[ModelConfig, Any]:
    """The model config (the workdir's model_config.json) and params of a resolved CKPT."""
    config_dict = json.loads((ref.workdir / "model_config.json").read_text())
    model_config = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in config_dict.items()})
    abstract = jax.eval_shape(lambda: init_params(model_config, jax.random.PRNGKey(0)))
    placement = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return model_config, checkpoint.restore_params(ref, checkpoint.abstract_like(abstract, placement))


def load_checkpoint(path, max_length: int | None = None) -> Embedder:
    """An Embedder from a training CKPT (a workdir, its latest step, or one step folder).

    The params come from the checkpoint; the model config, tokenizer, task prompts and (unless
    `max_length` is given) the max length from the workdir's model_config.json, tokenizer files,
    task_prompts.json and embedder.json.
    """
    ref = checkpoint.resolve(path)
    model_config, params = load_params(ref)
    tokenizer = open_tokenizer(ref.workdir)
    prompts_file = ref.workdir / "task_prompts.json"
    prompts = json.loads(prompts_file.read_text()) if prompts_file.exists() else {}
    max_length = max_length or recorded_max_length(ref.workdir)
    return Embedder(model_config, params, tokenizer, max_length, task_prompts=prompts)


def load_embedder(path, max_length: int | None = None) -> Embedder:
    """An Embedder from a model folder (`gembed.load`) or a training CKPT (`load_checkpoint`)."""
    from gembed import load, model_folder

    if model_folder.is_model_folder(path):
        return load(path)
    return load_checkpoint(path, max_length=max_length)
