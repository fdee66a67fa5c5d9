"""`gembed export`: a training CKPT (workdir, step folder, or soup) -> a model folder.

The folder (see `gembed.model_folder`) holds the checkpoint's params, the workdir's model config,
tokenizer and task prompts, and the max length the run trained with (its embedder.json) unless
overridden.
"""
from __future__ import annotations

import os
import pathlib

from gembed import checkpoint
from gembed.embedder import load_checkpoint
from gembed.model_folder import write_model_folder


def export(checkpoint_path: str | os.PathLike, output: str | os.PathLike,
           max_length: int | None = None, weights_dtype: str = "float32") -> pathlib.Path:
    """Writes the model folder of `checkpoint_path` at `output` and returns its path."""
    embedder = load_checkpoint(checkpoint_path, max_length=max_length)
    ref = checkpoint.resolve(checkpoint_path)
    return write_model_folder(output, embedder.model_config, embedder.params, embedder.tokenizer,
                              embedder.max_length, embedder.task_prompts,
                              source={"checkpoint": str(ref.step_dir), "step": ref.step},
                              weights_dtype=weights_dtype)
