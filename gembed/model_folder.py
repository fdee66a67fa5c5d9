"""The model folder: what `gembed import` and `gembed export` write and `gembed.load` reads.

    gembed_config.json   format_version, the ModelConfig fields, output sizes, task prompts,
                         max length, tokenizer kind + files, source info
    model.safetensors    params under their "/"-joined pytree names (e.g.
                         encoder/layer_0/attention/query/kernel, log_scale), float32 or bfloat16
                         (`weights_dtype`); read back as float32
    tokenizer files      tokenizer.model (SentencePiece) or tokenizer.json + tokenizer_config.json

No pickle: weights go through safetensors (read with its flax backend, which knows bfloat16),
everything else is JSON. gembed_config.json is written last, so a folder is complete once it
exists; it records the SHA-256 of model.safetensors (`weights_sha256`), checked on every read (a
folder without it, from an older gembed, is read unchecked). A folder whose params are not all
finite, or whose tokenizer has more pieces than the embedding table has rows, is refused.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.flax
import safetensors.numpy
from flax import traverse_util

from gembed.data.tokenizer_files import TOKENIZER_FILES, open_tokenizer, save_tokenizer
from gembed.errors import GembedUserError
from gembed.model import ModelConfig, init_params

FORMAT_VERSION = 1
CONFIG_FILE = "gembed_config.json"
WEIGHTS_FILE = "model.safetensors"
MAKE_ONE = "create it with `gembed import` or `gembed export`"
TRAINING_FIELDS = ("dtype", "dropout_rate", "output_sizes")  # a finetuning stage may choose these
EXECUTION_FIELDS = ("attention", "remat", "matmul_precision")  # how a stage computes, never from the folder
WEIGHTS_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelFolder:
    """A read model folder: float32 NumPy params (nested dict) and everything needed to embed."""

    path: pathlib.Path
    model_config: ModelConfig
    params: dict[str, Any]
    tokenizer: Any
    max_length: int
    task_prompts: dict[str, str]
    source: dict[str, Any]


def is_model_folder(path: str | os.PathLike | None) -> bool:
    """Whether `path` is a folder holding a gembed_config.json."""
    return path is not None and (pathlib.Path(path) / CONFIG_FILE).is_file()


def write_model_folder(path: str | os.PathLike, model_config: ModelConfig, params: Any, tokenizer,
                       max_length: int, task_prompts: dict[str, str] | None = None,
                       source: dict[str, Any] | None = None,
                       weights_dtype: str = "float32") -> pathlib.Path:
    """Writes a model folder at `path` (created; existing files replaced) and returns its path.

    `params`: the EmbeddingModel params (any arrays); `tokenizer`: a SentencePieceTokenizer or
    HuggingFaceTokenizer whose files are copied; `source`: free-form provenance (JSON-able);
    `weights_dtype`: "float32", or "bfloat16" for half-size weights (rounded to nearest).
    """
    if weights_dtype not in WEIGHTS_DTYPES:
        raise GembedUserError(f"weights dtype {weights_dtype!r} is not one of {WEIGHTS_DTYPES}; "
                              f"pick one of those.")
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    check_params(model_config, params, path / WEIGHTS_FILE)
    check_finite(params, path / WEIGHTS_FILE)
    (path / CONFIG_FILE).unlink(missing_ok=True)
    flat = {name: np.asarray(value, np.float32)
            for name, value in traverse_util.flatten_dict(params, sep="/").items()}
    if weights_dtype == "bfloat16":
        safetensors.flax.save_file({name: jnp.asarray(value, jnp.bfloat16) for name, value in flat.items()},
                                   str(path / WEIGHTS_FILE), metadata={"format": "gembed"})
    else:
        safetensors.numpy.save_file(flat, str(path / WEIGHTS_FILE), metadata={"format": "gembed"})
    save_tokenizer(tokenizer, path)
    config = {
        "format_version": FORMAT_VERSION,
        "model": model_config.to_dict(),
        "output_sizes": list(model_config.output_sizes or (model_config.embedding_size,)),
        "max_length": max_length,
        "weights_dtype": weights_dtype,
        "weights_sha256": file_sha256(path / WEIGHTS_FILE),
        "task_prompts": dict(task_prompts or {}),
        "tokenizer": {"kind": tokenizer.kind, "files": list(TOKENIZER_FILES[tokenizer.kind])},
        "source": dict(source or {}),
    }
    tmp = path / f"{CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, path / CONFIG_FILE)
    return path


def check_params(model_config: ModelConfig, params: Any, where: pathlib.Path) -> None:
    """Raises a GembedUserError unless `params` has exactly the names and shapes of the model."""
    abstract = jax.eval_shape(lambda: init_params(model_config, jax.random.PRNGKey(0)))
    expected = {name: tuple(leaf.shape)
                for name, leaf in traverse_util.flatten_dict(abstract, sep="/").items()}
    actual = {name: tuple(np.shape(value))
              for name, value in traverse_util.flatten_dict(params, sep="/").items()}
    for name in sorted(expected.keys() | actual.keys()):
        if expected.get(name) != actual.get(name):
            raise GembedUserError(
                f"{where}: param {name} has shape {actual.get(name)} but the model config wants "
                f"{expected.get(name)} (None = absent); the folder is corrupt, {MAKE_ONE} again.")


def check_finite(params: Any, where: os.PathLike) -> None:
    """Raises a GembedUserError when a param holds NaN or infinite values (a diverged run)."""
    for name, value in traverse_util.flatten_dict(params, sep="/").items():
        if not np.all(np.isfinite(np.asarray(value, np.float32))):
            raise GembedUserError(
                f"{where}: param {name} holds NaN or infinite values (the run diverged); use an "
                f"earlier checkpoint, or retrain with a lower LEARNING_RATE.")


def check_vocabulary(tokenizer, model_config: ModelConfig, where: os.PathLike) -> None:
    """Raises a GembedUserError when the tokenizer has more pieces than the embedding table rows."""
    if tokenizer.vocab_size > model_config.vocab_size:
        raise GembedUserError(
            f"{where}: the tokenizer has {tokenizer.vocab_size} pieces but the model's embedding "
            f"table has {model_config.vocab_size} rows; the tokenizer belongs to another model, "
            f"put the model's own tokenizer back.")


def file_sha256(path: pathlib.Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _read_config(path: pathlib.Path) -> dict[str, Any]:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise GembedUserError(f"{path}: not a model folder (no {CONFIG_FILE}); {MAKE_ONE}.")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GembedUserError(f"{config_path}: not valid JSON ({e}); {MAKE_ONE} again.") from None
    version = config.get("format_version") if isinstance(config, dict) else None
    if version != FORMAT_VERSION:
        raise GembedUserError(
            f"{config_path}: format_version {version!r} is not {FORMAT_VERSION}; "
            f"{MAKE_ONE} with this gembed version.")
    return config


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """Only the ModelConfig of a model folder (no weights are read)."""
    config_path = pathlib.Path(path).resolve() / CONFIG_FILE
    config = _read_config(config_path.parent)
    try:
        return ModelConfig.from_dict(config["model"])
    except (KeyError, TypeError, AttributeError) as e:
        raise GembedUserError(
            f"{config_path}: missing or invalid field ({e}); {MAKE_ONE} again.") from None


def finetune_model_config(folder_config: ModelConfig, bindings: dict[str, Any],
                          folder: str | os.PathLike) -> ModelConfig:
    """The architecture of a stage whose INIT_FROM is a model folder or CKPT: its own.

    Of the gin `bindings` of ModelConfig, the TRAINING_FIELDS (compute dtype, dropout, Matryoshka
    output sizes) apply; the EXECUTION_FIELDS (attention kernel, rematerialisation), which change
    how the stage computes but not its values, are the stage's (its binding or ModelConfig's
    default), whatever the folder recorded; any other binding must agree with the folder, so a
    model gin file that contradicts the folder fails loudly instead of silently losing.
    """
    execution = {field.name: bindings.get(field.name, field.default)
                 for field in dataclasses.fields(ModelConfig) if field.name in EXECUTION_FIELDS}
    for field, value in sorted(bindings.items()):
        value = tuple(value) if isinstance(value, list) else value
        if (field not in TRAINING_FIELDS + EXECUTION_FIELDS
                and value != getattr(folder_config, field)):
            raise GembedUserError(
                f"{folder}: INIT_FROM has ModelConfig.{field}="
                f"{getattr(folder_config, field)!r} but the gin config binds {value!r}; the "
                f"INIT_FROM architecture is used, so drop that binding (or the model gin file).")
    return dataclasses.replace(
        folder_config, **execution,
        **{field: bindings[field] for field in TRAINING_FIELDS if field in bindings})


def read_weights(weights_path: pathlib.Path) -> dict[str, np.ndarray]:
    """{"/"-joined name: float32 array} of a safetensors file (float32 or bfloat16 tensors)."""
    with safetensors.safe_open(str(weights_path), framework="flax") as weights:
        return {name: np.asarray(weights.get_tensor(name), np.float32) for name in weights.keys()}


def read_model_folder(path: str | os.PathLike) -> ModelFolder:
    """Reads and checks a model folder (config, weights against the config, tokenizer)."""
    path = pathlib.Path(path).resolve()
    config = _read_config(path)
    config_path = path / CONFIG_FILE
    model_config = read_model_config(path)
    try:
        max_length = int(config["max_length"])
        tokenizer_kind = config["tokenizer"]["kind"]
    except (KeyError, TypeError, ValueError) as e:
        raise GembedUserError(
            f"{config_path}: missing or invalid field ({e}); {MAKE_ONE} again.") from None
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise GembedUserError(f"{weights_path}: weights file missing; {MAKE_ONE} again.")
    try:
        flat = read_weights(weights_path)
    except (OSError, safetensors.SafetensorError) as e:
        raise GembedUserError(
            f"{weights_path}: not a readable safetensors file ({str(e).splitlines()[0]}); "
            f"{MAKE_ONE} again.") from None
    params = traverse_util.unflatten_dict(flat, sep="/")
    check_params(model_config, params, weights_path)
    expected_hash = config.get("weights_sha256")
    if expected_hash is not None and file_sha256(weights_path) != expected_hash:
        raise GembedUserError(
            f"{weights_path}: content does not match the weights_sha256 recorded in {CONFIG_FILE} "
            f"(the file is damaged or was replaced); copy the folder again or {MAKE_ONE} again.")
    check_finite(params, weights_path)
    task_prompts = config.get("task_prompts") or {}
    if not isinstance(task_prompts, dict) or not all(
            isinstance(v, str) for v in task_prompts.values()):
        raise GembedUserError(f"{config_path}: task_prompts must be a JSON object of strings "
                              f"(task: prompt); fix it or {MAKE_ONE} again.")
    tokenizer = open_tokenizer(path, tokenizer_kind)
    check_vocabulary(tokenizer, model_config, path)
    return ModelFolder(path=path, model_config=model_config, params=params,
                       tokenizer=tokenizer, max_length=max_length,
                       task_prompts=dict(task_prompts),
                       source=dict(config.get("source") or {}))
