"""`gembed export`: a training CKPT (workdir, step folder, or soup) -> a model folder.

The folder (see `gembed.model_folder`) holds the checkpoint's params, the workdir's model config,
tokenizer and task prompts, and the max length the run trained with unless overridden.
"""
from __future__ import annotations

import os
import pathlib

from gembed.model_folder import write_model_folder
from gembed.workdir import read_checkpoint_model


def export(checkpoint_path: str | os.PathLike, output: str | os.PathLike,
           max_length: int | None = None, weights_dtype: str = "float32") -> pathlib.Path:
    """Writes the model folder of `checkpoint_path` at `output` and returns its path."""
    model = read_checkpoint_model(checkpoint_path, max_length=max_length)
    return write_model_folder(output, model.model_config, model.params, model.tokenizer,
                              model.max_length, model.task_prompts,
                              source={"checkpoint": str(model.ref.step_dir), "step": model.ref.step},
                              weights_dtype=weights_dtype)
