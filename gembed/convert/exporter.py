"""`export_sentence_transformers`: a gembed model (training CKPT or model folder) -> a folder that
sentence-transformers, transformers' AutoModel and text-embeddings-inference load with the
vectors gembed computes.

    config.json, model.safetensors     the encoder as its transformers family (`families`)
    tokenizer.json, tokenizer_config.json
    modules.json                       Transformer, Pooling, [Dense], Normalize (the legacy
                                       layout TEI parses)
    sentence_bert_config.json          max_seq_length
    1_Pooling/config.json              all six pooling_mode_* flags
    2_Dense/                           the projection: linear.weight [out, in], linear.bias,
                                       identity activation
    config_sentence_transformers.json  prompts, similarity "cosine", and a "gembed" record
                                       (log_scale, Matryoshka output sizes) that `gembed import`
                                       reads back, so export -> import gives the params bit
                                       for bit
    README.md                          the model card (`model_card`)

The folder is written next to OUTPUT and renamed into place, so OUTPUT is complete or absent.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np
import safetensors.numpy
from flax import traverse_util

from gembed import model_folder, workdir
from gembed.convert.families import to_transformers
from gembed.convert.model_card import ModelCard, model_card, provenance
from gembed.convert.source import ST_SETTINGS_FILE
from gembed.convert.transformers_tokenizer import write_transformers_tokenizer
from gembed.errors import GembedUserError
from gembed.model import ModelConfig

IDENTITY = "torch.nn.modules.linear.Identity"
POOLING_MODES = {"first": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
                 "last": "pooling_mode_lasttoken"}
ALL_POOLING_MODES = ("pooling_mode_cls_token", "pooling_mode_mean_tokens",
                     "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                     "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")


def _write_json(path: pathlib.Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")


def _modules(model: ModelConfig) -> list[dict[str, Any]]:
    """modules.json: Transformer, Pooling, Dense (with a projection), Normalize."""
    kinds = [("Transformer", ""), ("Pooling", "1_Pooling")]
    if model.projection_dim is not None:
        kinds.append(("Dense", "2_Dense"))
    kinds.append(("Normalize", f"{len(kinds)}_Normalize"))
    return [{"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
            for i, (kind, path) in enumerate(kinds)]


def write_sentence_transformers(output: pathlib.Path, model: ModelConfig, params: Any, tokenizer,
                                max_length: int, task_prompts: dict[str, str],
                                card: ModelCard) -> None:
    """Writes the folder's files into the (new, empty) folder `output`; errors name the source
    `card.source`."""
    if model.position_embedding == "learned" and max_length > model.max_position_embeddings:
        raise GembedUserError(
            f"{card.source}: --max_length={max_length} exceeds the model's "
            f"{model.max_position_embeddings} positions; pass at most that.")
    family, hf_config, tensors = to_transformers(model, params["encoder"], pathlib.Path(card.source))
    token_ids = write_transformers_tokenizer(tokenizer, output, append_eos=model.pooling == "last",
                                             max_length=max_length)
    _write_json(output / "config.json", {"architectures": [family.architecture], **hf_config,
                                         **token_ids, "torch_dtype": "float32"})
    safetensors.numpy.save_file(tensors, str(output / "model.safetensors"), metadata={"format": "pt"})
    modules = _modules(model)
    _write_json(output / "modules.json", modules)
    _write_json(output / "sentence_bert_config.json",
                {"max_seq_length": max_length, "do_lower_case": False})
    _write_json(output / "1_Pooling" / "config.json", {
        "word_embedding_dimension": model.hidden_size,
        **{mode: mode == POOLING_MODES[model.pooling] for mode in ALL_POOLING_MODES},
        "include_prompt": True})
    if model.projection_dim is not None:
        projection = {name: np.asarray(value, np.float32) for name, value in
                      traverse_util.flatten_dict(params["projection"], sep="/").items()}
        dense = {"linear.weight": np.ascontiguousarray(projection["kernel"].T)}
        if "bias" in projection:
            dense["linear.bias"] = projection["bias"]
        _write_json(output / "2_Dense" / "config.json", {
            "in_features": model.hidden_size, "out_features": model.projection_dim,
            "bias": "bias" in projection, "activation_function": IDENTITY})
        safetensors.numpy.save_file(dense, str(output / "2_Dense" / "model.safetensors"),
                                    metadata={"format": "pt"})
    _write_json(output / ST_SETTINGS_FILE, {
        "model_type": "SentenceTransformer", "prompts": dict(task_prompts),
        "default_prompt_name": None, "similarity_fn_name": "cosine",
        "gembed": {"log_scale": float(np.float32(params["log_scale"])),
                   "output_sizes": list(model.output_sizes) if model.output_sizes else None}})
    card = dataclasses.replace(card, family=family, model=model, max_length=max_length,
                               task_prompts=dict(task_prompts),
                               output_sizes=list(model.output_sizes or (model.embedding_size,)),
                               tokenizer_kind=tokenizer.kind, causal_flags="is_causal" in hf_config,
                               num_params=sum(np.size(value) for value in traverse_util.flatten_dict(
                                   params["encoder"]).values()))
    (output / "README.md").write_text(model_card(card, [m["path"] or "." for m in modules]))


def export_sentence_transformers(source: str | os.PathLike, output: str | os.PathLike, *,
                                 max_length: int | None = None,
                                 eval_results: str | os.PathLike | None = None) -> pathlib.Path:
    """Writes the sentence-transformers folder of a CKPT or model folder at `output` (absent or
    empty); returns its path. `max_length` overrides the recorded one; `eval_results`: a
    `gembed eval --output` JSON for the card (default: the recipe's DIR/eval/results.json row of
    `source`, when there is one)."""
    output = pathlib.Path(output).resolve()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise GembedUserError(f"{output}: --output exists and is not empty; choose a new folder.")
    if model_folder.is_model_folder(source):
        model = model_folder.read_model_folder(source)
        model = dataclasses.replace(model, max_length=max_length or model.max_length)
    else:
        model = workdir.read_checkpoint_model(source, max_length=max_length)
    card = dataclasses.replace(provenance(pathlib.Path(source), eval_results), name=output.name)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}."))
    try:
        write_sentence_transformers(staging, model.model_config, model.params, model.tokenizer,
                                    model.max_length, model.task_prompts, card)
        if output.exists():
            output.rmdir()
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output

