"""`gembed export`: a training CKPT (workdir, step folder, or soup) -> a model folder.

The folder (see `gembed.model_folder`) holds the checkpoint's params, the workdir's model config,
tokenizer and task prompts, and the max length the run trained with unless overridden. It is
written whole or not at all (`gembed.output_folder`); a non-empty output needs `overwrite`.
"""
from __future__ import annotations

import functools
import os
import pathlib

from gembed import checkpoint, output_folder
from gembed.model_folder import write_model_folder
from gembed.workdir import read_checkpoint_model


def export(checkpoint_path: str | os.PathLike, output: str | os.PathLike,
           max_length: int | None = None, weights_dtype: str = "float32",
           overwrite: bool = False) -> pathlib.Path:
    """Writes the model folder of `checkpoint_path` at `output` and returns its path."""
    output = output_folder.check_output(output, overwrite,
                                        [checkpoint.resolve(checkpoint_path).workdir])
    model = read_checkpoint_model(checkpoint_path, max_length=max_length)
    return output_folder.write_folder(output, functools.partial(
        write_model_folder, model_config=model.model_config, params=model.params,
        tokenizer=model.tokenizer, max_length=model.max_length, task_prompts=model.task_prompts,
        source={"checkpoint": str(model.ref.step_dir), "step": model.ref.step},
        weights_dtype=weights_dtype))
