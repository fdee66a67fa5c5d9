"""`import_model`: a Hugging Face / sentence-transformers source folder -> a gembed model folder.

The encoder weights come from the source through its family's weight table
(`gembed.convert.families`); a Dense projection, the prompts and a gembed export's `log_scale`
and Matryoshka sizes come along, so importing a gembed export gives back its params bit for bit;
what the source lacks (`log_scale`, a requested projection) is freshly initialised. The tokenizer
becomes a Hugging Face tokenizer.json (built from vocab.txt for BERT folders without one) plus a
tokenizer_config.json naming the pad and eos tokens.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib

import jax
import numpy as np
import tokenizers

from gembed.convert.families import family_of
from gembed.convert.hub import HubModel, is_hub_name, resolve
from gembed.convert.source import SourceModel, read_json, read_source
from gembed.convert.weight_table import import_encoder
from gembed.data.hf_tokenizer import (
    TOKENIZER_SETTINGS,
    TOKENIZER_JSON,
    HuggingFaceTokenizer,
    read_special_tokens,
    wordpiece_from_vocab,
    write_huggingface_tokenizer,
)
from gembed.errors import GembedUserError
from gembed.model import ModelConfig
from gembed.model.layers import KERNEL_INIT
from gembed.model_folder import write_model_folder

DEFAULT_MAX_LENGTH = 512   # when the source states none (capped by its position table)


def _import_tokenizer(source_dir: pathlib.Path, output: pathlib.Path) -> HuggingFaceTokenizer:
    """Writes the source's tokenizer into `output` and opens it there."""
    special = {**read_special_tokens(source_dir, "special_tokens_map.json"),
               **read_special_tokens(source_dir)}
    if (source_dir / TOKENIZER_JSON).is_file():
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(source_dir / TOKENIZER_JSON))
        except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception)
            raise GembedUserError(f"{source_dir / TOKENIZER_JSON}: unreadable "
                                  f"({str(e).splitlines()[0]}); re-download the source model.") from None
    elif (source_dir / "vocab.txt").is_file():
        settings = (read_json(source_dir / TOKENIZER_SETTINGS)
                    if (source_dir / TOKENIZER_SETTINGS).is_file() else {})
        tokenizer = wordpiece_from_vocab(source_dir / "vocab.txt", settings.get("do_lower_case", True))
    else:
        raise GembedUserError(f"{source_dir}: no tokenizer.json or vocab.txt; add the source "
                              f"model's tokenizer files.")
    tokenizer.no_truncation()
    tokenizer.no_padding()
    write_huggingface_tokenizer(tokenizer, special, output)
    return HuggingFaceTokenizer(output)


def _head(model: SourceModel, model_config: ModelConfig, projection_dim: int | None, seed: int
          ) -> tuple[dict, ModelConfig]:
    """The params EmbeddingModel adds around the encoder, and the config with its head.

    `log_scale` and the Matryoshka sizes come from a gembed export's record, the projection from
    a Dense module; what the source lacks is fresh (`projection_dim` asks for a projection).
    """
    record = model.gembed
    log_scale = record.get("log_scale", -math.log(model_config.initial_temperature))
    head = {"log_scale": np.float32(log_scale)}
    if model.projection is not None:
        if projection_dim is not None:
            raise GembedUserError(f"--projection_dim={projection_dim}: {model.root} already has a "
                                  f"projection (a Dense module); drop the flag.")
        head["projection"] = model.projection
        projection_dim = model.projection["kernel"].shape[1]
    elif projection_dim is not None:
        shape = (model_config.hidden_size, projection_dim)
        head["projection"] = {"kernel": np.asarray(KERNEL_INIT(jax.random.PRNGKey(seed), shape))}
        if model_config.projection_bias:
            head["projection"]["bias"] = np.zeros(shape[1], np.float32)
    output_sizes = record.get("output_sizes")
    model_config = dataclasses.replace(
        model_config, projection_dim=projection_dim,
        projection_bias=model_config.projection_bias if model.projection is None
        else "bias" in model.projection,
        output_sizes=tuple(output_sizes) if output_sizes else None)
    return head, model_config


def import_model(source: str | pathlib.Path, output: str | pathlib.Path, *,
                 attention: str | None = None, pooling: str | None = None,
                 projection_dim: int | None = None, max_length: int | None = None,
                 seed: int = 0, hub: HubModel | None = None) -> pathlib.Path:
    """Converts the source folder (or `hf:ORG/NAME[@REVISION]`) into a model folder at `output`;
    returns its path.

    `attention` ('causal' | 'bidirectional', decoders only; default: what config.json says, else
    causal) and `pooling` ('mean' | 'first' | 'last'; default: the sentence-transformers Pooling
    module, else mean for encoders and last for decoders) override the source's;
    `projection_dim` adds a fresh projection (a Dense module's is imported as is); `max_length`
    defaults to the source's max_seq_length, else 512 (capped by the position table); `hub`: the
    `hf:` name `source` was resolved from, recorded as provenance.
    """
    for flag, value in (("--projection_dim", projection_dim), ("--max_length", max_length)):
        if value is not None and value < 1:
            raise GembedUserError(f"{flag}={value} must be a positive integer.")
    output = pathlib.Path(output)
    if output.exists() and any(output.iterdir()):
        raise GembedUserError(f"{output}: --output exists and is not empty; choose a new folder.")
    if is_hub_name(source):
        hub = resolve(str(source))
        source = hub.path
    model = read_source(source)
    config, where = model.config, model.transformer_dir / "config.json"
    family = family_of(config.get("model_type"), where)
    tensors = family.source_tensors(model.weights)
    model_config = family.model_config(config, tensors, attention=attention,
                                       pooling=pooling or model.pooling or family.default_pooling,
                                       where=where)
    encoder = import_encoder(family, tensors, model_config, model.transformer_dir)
    head, model_config = _head(model, model_config, projection_dim, seed)
    if max_length is None:
        max_length = model.max_seq_length or min(DEFAULT_MAX_LENGTH, model_config.max_position_embeddings)
    output.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = model.transformer_dir if (
        (model.transformer_dir / TOKENIZER_JSON).is_file()
        or (model.transformer_dir / "vocab.txt").is_file()) else model.root
    tokenizer = _import_tokenizer(tokenizer_dir, output)
    source_info = {"path": str(model.root), "model_type": family.model_type,
                   "architectures": config.get("architectures", [])}
    if hub is not None:
        source_info |= {"hub": hub.name, "revision": hub.revision, "origin": hub.origin}
    return write_model_folder(output, model_config, {"encoder": encoder, **head}, tokenizer,
                              max_length, task_prompts=model.prompts, source=source_info)
