"""`import_model`: a Hugging Face / sentence-transformers source folder -> a gembed model folder.

The encoder weights come from the source; `log_scale` (and a projection, when asked for) are
freshly initialised. The tokenizer becomes a Hugging Face tokenizer.json (built from vocab.txt for
BERT folders without one) plus a tokenizer_config.json naming the pad and eos tokens.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib

import jax
import numpy as np
import tokenizers

from gembed.convert import bert, decoder
from gembed.convert.source import read_json, read_source
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


def _fresh_head(model_config: ModelConfig, seed: int) -> dict:
    """The params EmbeddingModel adds around the encoder: log_scale and the optional projection."""
    head = {"log_scale": np.float32(-math.log(model_config.initial_temperature))}
    if model_config.projection_dim is not None:
        shape = (model_config.hidden_size, model_config.projection_dim)
        head["projection"] = {"kernel": np.asarray(KERNEL_INIT(jax.random.PRNGKey(seed), shape))}
        if model_config.projection_bias:
            head["projection"]["bias"] = np.zeros(shape[1], np.float32)
    return head


def import_model(source: str | pathlib.Path, output: str | pathlib.Path, *,
                 attention: str | None = None, pooling: str | None = None,
                 projection_dim: int | None = None, max_length: int | None = None,
                 seed: int = 0) -> pathlib.Path:
    """Converts the source folder into a model folder at `output`; returns its path.

    `attention` ('causal' | 'bidirectional', decoders only; default causal) and `pooling`
    ('mean' | 'first' | 'last'; default: the sentence-transformers Pooling module, else mean for
    encoders and last for decoders) override the source's; `projection_dim` adds a fresh
    projection; `max_length` defaults to the source's max_seq_length, else 512 (capped by the
    position table).
    """
    for flag, value in (("--projection_dim", projection_dim), ("--max_length", max_length)):
        if value is not None and value < 1:
            raise GembedUserError(f"{flag}={value} must be a positive integer.")
    output = pathlib.Path(output)
    if output.exists() and any(output.iterdir()):
        raise GembedUserError(f"{output}: --output exists and is not empty; choose a new folder.")
    model = read_source(source)
    config, where = model.config, model.transformer_dir / "config.json"
    model_type = config.get("model_type")
    if model_type in bert.MODEL_TYPES:
        if attention not in (None, "bidirectional"):
            raise GembedUserError(f"--attention={attention}: BERT-family encoders are "
                                  f"bidirectional; drop the flag.")
        model_config = bert.bert_model_config(config, pooling or model.pooling or "mean", where)
        encoder = bert.bert_params(model.weights, model_config, model.transformer_dir)
    elif model_type in decoder.MODEL_TYPES:
        model_config = decoder.decoder_model_config(
            config, attention or "causal", pooling or model.pooling or "last", where)
        encoder = decoder.decoder_params(model.weights, model_config, model.transformer_dir)
    else:
        raise GembedUserError(
            f"{where}: model_type {model_type!r} is not supported; supported: "
            f"{', '.join(bert.MODEL_TYPES + decoder.MODEL_TYPES)}.")
    model_config = dataclasses.replace(model_config, projection_dim=projection_dim)
    if max_length is None:
        max_length = model.max_seq_length or min(DEFAULT_MAX_LENGTH, model_config.max_position_embeddings)
    output.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = model.transformer_dir if (
        (model.transformer_dir / TOKENIZER_JSON).is_file()
        or (model.transformer_dir / "vocab.txt").is_file()) else model.root
    tokenizer = _import_tokenizer(tokenizer_dir, output)
    params = {"encoder": encoder, **_fresh_head(model_config, seed)}
    source_info = {"path": str(model.root), "model_type": model_type,
                   "architectures": config.get("architectures", [])}
    return write_model_folder(output, model_config, params, tokenizer, max_length,
                              source=source_info)
