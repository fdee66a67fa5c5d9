"""The training workdir: its layout, the metadata a run records, and reading a trained model back.

    DIR/config.gin            the operative gin config of the run
    DIR/model_config.json     the ModelConfig fields (`ModelConfig.to_dict`)
    DIR/task_prompts.json     {dataset name: query prompt}, for `Embedder.encode(task=...)`
    DIR/embedder.json         {"max_length": MAX_LENGTH}, the tokens per text the run trained with
    DIR/lora.json             a LoRA run only: {"lora": LoraConfig fields, "base": the model folder
                              or CKPT step folder of INIT_FROM}; its checkpoints hold the
                              trainable tree (`gembed.lora`), read back merged with that base
    DIR/tokenizer.model | tokenizer.json (+ tokenizer_config.json)   see `data.tokenizer_files`
    DIR/checkpoints/STEP/     orbax checkpoints (`gembed.checkpoint`)
    DIR/metrics.jsonl, DIR/tb/   training metrics (`gembed.metrics`)

A soup folder (`gembed.soup`) has the same layout with a params-only checkpoint. Everything that
reads a CKPT for inference (export, soup, mining, the recipe's evaluation) goes through
`read_checkpoint_model`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from typing import Any

import jax

from gembed import checkpoint, lora, model_folder
from gembed.data.tokenizer_files import TOKENIZER_FILES, open_tokenizer
from gembed.errors import GembedUserError
from gembed.model import ModelConfig, init_params

CONFIG_GIN = "config.gin"
ARCHITECTURE_FILE = "model_config.json"
TASK_PROMPTS_FILE = "task_prompts.json"
EMBEDDER_FILE = "embedder.json"
LORA_FILE = "lora.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"
# What a run's inference needs besides its params: copied as a whole into a soup.
INFERENCE_FILES = (ARCHITECTURE_FILE, TASK_PROMPTS_FILE, EMBEDDER_FILE,
                   *(name for files in TOKENIZER_FILES.values() for name in files))


def _write_json(path: pathlib.Path, value: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def write_run_metadata(workdir: pathlib.Path, model_config: ModelConfig,
                       task_prompts: dict[str, str], max_length: int) -> None:
    """Records what inference from this workdir needs: architecture, prompts, max length."""
    _write_json(workdir / ARCHITECTURE_FILE, model_config.to_dict())
    _write_json(workdir / TASK_PROMPTS_FILE, task_prompts)
    _write_json(workdir / EMBEDDER_FILE, {"max_length": max_length})


def _read_json(path: pathlib.Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise GembedUserError(f"{path}: missing; {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GembedUserError(f"{path}: not valid JSON ({e}); {what}") from None


def read_model_config(workdir: pathlib.Path) -> ModelConfig:
    """The ModelConfig a training workdir (or soup) recorded."""
    path = workdir / ARCHITECTURE_FILE
    fields = _read_json(path, "the workdir is incomplete; name a workdir a finished run wrote.")
    try:
        return ModelConfig.from_dict(fields)
    except (TypeError, AttributeError) as e:
        raise GembedUserError(f"{path}: not a ModelConfig ({e}); re-run the stage that wrote it.") from None


def read_task_prompts(workdir: pathlib.Path) -> dict[str, str]:
    """{task: query prompt} of a workdir; {} when it recorded none."""
    path = workdir / TASK_PROMPTS_FILE
    if not path.is_file():
        return {}
    prompts = _read_json(path, "re-run the stage that wrote it.")
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise GembedUserError(f"{path}: expected a JSON object of strings; re-run the stage.")
    return prompts


def recorded_max_length(workdir: pathlib.Path) -> int:
    """The max length (tokens per text) a training workdir trained with."""
    path = workdir / EMBEDDER_FILE
    if not path.is_file():
        raise GembedUserError(f"{path}: missing (a run older than this gembed version); "
                              f"pass --max_length, the MAX_LENGTH the run trained with.")
    return int(_read_json(path, "pass --max_length instead.")["max_length"])


@dataclasses.dataclass(frozen=True)
class LoraRecord:
    """A LoRA run's lora.json: its LoraConfig and the reference to its base."""

    config: lora.LoraConfig
    base: str


def write_lora(workdir: pathlib.Path, lora_config: lora.LoraConfig, base: str) -> None:
    _write_json(workdir / LORA_FILE, {"lora": lora_config.to_dict(), "base": base})


def read_lora(workdir: pathlib.Path) -> LoraRecord | None:
    """The LoRA record of a workdir; None for a run that trains every param."""
    path = workdir / LORA_FILE
    if not path.is_file():
        return None
    record = _read_json(path, "re-run the stage that wrote it.")
    try:
        return LoraRecord(lora.LoraConfig.from_dict(record["lora"]), str(record["base"]))
    except (TypeError, KeyError) as e:
        raise GembedUserError(f"{path}: not a LoRA record ({e}); re-run the stage that wrote it.") from None


def _base_params(base: str, model_config: ModelConfig) -> Any:
    """The params of a LoRA run's base: a model folder, or a CKPT (itself maybe a LoRA run)."""
    if model_folder.is_model_folder(base):
        return model_folder.read_model_folder(base).params
    if not pathlib.Path(base).is_dir():
        raise GembedUserError(f"{base}: the base of this LoRA run is gone; restore it there (its "
                              f"checkpoints hold the adapters only).")
    return restore_params(checkpoint.resolve(base, role="LoRA base"), model_config)


def abstract_params(model_config: ModelConfig) -> Any:
    """ShapeDtypeStructs of the params of `model_config`, computing nothing."""
    return jax.eval_shape(lambda: init_params(model_config, jax.random.PRNGKey(0)))


def restore_params(ref: checkpoint.CheckpointRef, model_config: ModelConfig | None = None) -> Any:
    """The params of a resolved CKPT on the default device (its workdir's model unless given); a
    LoRA run's adapters come back merged into its base (`lora.merge`), a plain params tree."""
    model_config = model_config or read_model_config(ref.workdir)
    placement = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    record = read_lora(ref.workdir)
    abstract = abstract_params(model_config)
    if record is None:
        params = checkpoint.restore_params(ref, checkpoint.abstract_like(abstract, placement))
    else:
        abstract_trainable = jax.eval_shape(functools.partial(lora.split, config=record.config),
                                            abstract, jax.random.PRNGKey(0))[0]
        trainable = checkpoint.restore_params(
            ref, checkpoint.abstract_like(abstract_trainable, placement))
        base = jax.device_put(_base_params(record.base, model_config), placement)
        params = jax.jit(functools.partial(lora.merge, rng=None, config=record.config))(
            trainable, lora.frozen_of(base, config=record.config))
    model_folder.check_finite(params, ref.step_dir)
    return params


@dataclasses.dataclass(frozen=True)
class CheckpointModel:
    """A trained model read from a CKPT: everything `Embedder` and export need."""

    ref: checkpoint.CheckpointRef
    model_config: ModelConfig
    params: Any
    tokenizer: Any
    max_length: int
    task_prompts: dict[str, str]


def read_checkpoint_model(path: str | os.PathLike, max_length: int | None = None) -> CheckpointModel:
    """The model of a CKPT (a workdir, its latest step, one step folder, or a soup): params from
    the checkpoint; architecture, tokenizer, prompts and (unless given) max length from its
    workdir."""
    ref = checkpoint.resolve(path)
    model_config = read_model_config(ref.workdir)
    tokenizer = open_tokenizer(ref.workdir)
    model_folder.check_vocabulary(tokenizer, model_config, ref.workdir)
    return CheckpointModel(
        ref=ref, model_config=model_config, params=restore_params(ref, model_config),
        tokenizer=tokenizer, task_prompts=read_task_prompts(ref.workdir),
        max_length=max_length or recorded_max_length(ref.workdir))
