"""Reading a Hugging Face or sentence-transformers source folder, without torch.

A plain Hugging Face folder holds config.json and safetensors weights (one model.safetensors, or
shards named by model.safetensors.index.json). A sentence-transformers folder adds modules.json:
module 0 (Transformer) names the subfolder with those files, a Pooling module its pooling mode,
an optional Dense module (identity activation: a linear projection), an optional Normalize
module; sentence_bert_config.json gives the max sequence length, config_sentence_transformers.json
the prompts (and, in gembed's exports, a "gembed" record: log_scale and Matryoshka sizes).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from gembed.errors import GembedUserError

# sentence-transformers Pooling modes -> gembed pooling.
ST_POOLINGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "first",
               "pooling_mode_lasttoken": "last"}
ST_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")
IDENTITY = "torch.nn.modules.linear.Identity"
ST_SETTINGS_FILE = "config_sentence_transformers.json"
CONVERT_HINT = ("convert it with transformers: AutoModel.from_pretrained(SRC)"
                ".save_pretrained(SRC, safe_serialization=True)")


@dataclasses.dataclass(frozen=True)
class SourceModel:
    """A source checkpoint: its config.json, float32 weights by their Hugging Face names, and the
    sentence-transformers pooling ('mean' | 'first' | 'last'), projection ({"kernel": [in, out],
    "bias"} of a Dense module), max length, prompts and gembed record when it has them."""

    root: pathlib.Path
    transformer_dir: pathlib.Path
    config: dict[str, Any]
    weights: dict[str, np.ndarray]
    pooling: str | None
    max_seq_length: int | None
    projection: dict[str, np.ndarray] | None = None
    prompts: dict[str, str] = dataclasses.field(default_factory=dict)
    gembed: dict[str, Any] = dataclasses.field(default_factory=dict)


def read_json(path: pathlib.Path) -> dict[str, Any]:
    """A JSON object from `path`, with a user error naming the file when it is unreadable."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise GembedUserError(f"{path}: file missing; the source folder is incomplete.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GembedUserError(f"{path}: not valid JSON ({e}); re-download the source model.") from None


def _weight_files(directory: pathlib.Path) -> list[pathlib.Path]:
    """The safetensors files holding the model weights in `directory`."""
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        return [directory / shard for shard in shards]
    if (directory / "pytorch_model.bin").is_file():
        raise GembedUserError(
            f"{directory / 'pytorch_model.bin'}: gembed reads safetensors only (no pickle); "
            f"{CONVERT_HINT}.")
    raise GembedUserError(
        f"{directory}: no model.safetensors (or model.safetensors.index.json) found; "
        f"point --source at a Hugging Face model folder.")


def read_weights(directory: pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of the folder's safetensors files as float32 NumPy (bf16/f16 upcast)."""
    weights = {}
    for path in _weight_files(directory):
        try:
            with safe_open(str(path), framework="flax") as tensors:
                for name in tensors.keys():  # noqa: SIM118 (safe_open is not a dict)
                    weights[name] = np.asarray(tensors.get_tensor(name), np.float32)
        except (OSError, SafetensorError) as e:
            raise GembedUserError(
                f"{path}: not a readable safetensors file ({str(e).splitlines()[0]}); "
                f"re-download the source model.") from None
    return weights


def _projection(directory: pathlib.Path) -> dict[str, np.ndarray]:
    """A Dense module's linear map as gembed projection params; only identity activations."""
    settings = read_json(directory / "config.json")
    if settings.get("activation_function") != IDENTITY or settings.get("use_residual"):
        raise GembedUserError(
            f"{directory / 'config.json'}: a Dense module with activation "
            f"{settings.get('activation_function')!r} (or a residual) is not supported (only "
            f"{IDENTITY}); import a model without it.")
    weights = read_weights(directory)
    shape = (settings["out_features"], settings["in_features"])
    if weights.get("linear.weight", np.empty(0)).shape != shape:
        raise GembedUserError(f"{directory}: linear.weight missing or not of shape {shape}; "
                              f"re-download the source model.")
    projection = {"kernel": np.ascontiguousarray(weights["linear.weight"].T)}
    if settings.get("bias", True):
        projection["bias"] = weights["linear.bias"]
    return projection


def _sentence_transformers_modules(root: pathlib.Path
                                   ) -> tuple[pathlib.Path, str | None, dict | None]:
    """(transformer folder, pooling or None, projection or None) from modules.json; (root, None,
    None) without one."""
    if not (root / "modules.json").is_file():
        return root, None, None
    modules = json.loads((root / "modules.json").read_text())
    kinds = [module["type"].rsplit(".", 1)[-1] for module in modules]
    in_order = [kind for kind in ST_MODULES if kind in kinds]
    if kinds != in_order or kinds[:1] != ["Transformer"] or ("Dense" in kinds and "Pooling" not in kinds):
        raise GembedUserError(
            f"{root / 'modules.json'}: sentence-transformers modules {kinds} are not supported "
            f"(only Transformer, then Pooling, Dense and Normalize in that order, each optional); "
            f"import a model without the others.")
    transformer_dir, pooling, projection = root, None, None
    for module, kind in zip(modules, kinds):
        if kind == "Dense":
            projection = _projection(root / module["path"])
        if kind == "Transformer":
            transformer_dir = root / module["path"]
        if kind == "Pooling":
            pooling_path = root / module["path"] / "config.json"
            modes = [mode for mode, enabled in read_json(pooling_path).items()
                     if mode.startswith("pooling_mode_") and enabled is True]
            if len(modes) != 1 or modes[0] not in ST_POOLINGS:
                raise GembedUserError(
                    f"{pooling_path}: pooling {modes} is not supported (one of "
                    f"{', '.join(ST_POOLINGS)}); pass --pooling to choose one.")
            pooling = ST_POOLINGS[modes[0]]
    return transformer_dir, pooling, projection


def read_source(root: str | pathlib.Path) -> SourceModel:
    """Reads config, weights and sentence-transformers settings of a source folder."""
    root = pathlib.Path(root).resolve()
    if not root.is_dir():
        raise GembedUserError(f"{root}: --source is not a folder; point it at a model folder.")
    try:
        transformer_dir, pooling, projection = _sentence_transformers_modules(root)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise GembedUserError(
            f"{root / 'modules.json'}: malformed ({e}); re-download the source model.") from None
    max_seq_length = None
    st_config = transformer_dir / "sentence_bert_config.json"
    if st_config.is_file():
        settings = read_json(st_config)
        if settings.get("do_lower_case"):
            raise GembedUserError(
                f"{st_config}: do_lower_case=true is not supported; lowercase in the tokenizer "
                f"instead or import the bare transformer.")
        max_seq_length = settings.get("max_seq_length")
    model_settings = read_json(root / ST_SETTINGS_FILE) if (root / ST_SETTINGS_FILE).is_file() else {}
    return SourceModel(root=root, transformer_dir=transformer_dir,
                       config=read_json(transformer_dir / "config.json"),
                       weights=read_weights(transformer_dir), pooling=pooling,
                       max_seq_length=max_seq_length, projection=projection,
                       prompts=dict(model_settings.get("prompts") or {}),
                       gembed=dict(model_settings.get("gembed") or {}))
