"""The tokenizer of a training workdir: given, inherited from INIT_FROM, or trained once and cached.

The chosen tokenizer is kept as DIR/tokenizer.model, so a resumed run, a later stage that inits
from this one, and the export all read the same file.
"""
from __future__ import annotations

import os
import pathlib
import shutil
from typing import Sequence

from gembed.data.examples import Example
from gembed.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

TOKENIZER_FILE = "tokenizer.model"
TRAINING_TEXTS = 50_000   # texts sampled (in corpus order) to train a new vocabulary


def _copy_atomically(source: pathlib.Path, destination: pathlib.Path) -> None:
    tmp = destination.with_name(f"{destination.name}.{os.getpid()}.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, destination)


def prepare_tokenizer(workdir: pathlib.Path, *, tokenizer: str | None,
                      init_from_workdir: pathlib.Path | None, vocab_size: int,
                      examples: Sequence[Example]) -> SentencePieceTokenizer:
    """Returns the workdir's tokenizer, creating DIR/tokenizer.model on first use.

    Order: the workdir's own file (resume), an explicit `tokenizer` path, the INIT_FROM workdir's
    file, else a sentencepiece model of `vocab_size` trained on the examples' texts.
    """
    cached = workdir / TOKENIZER_FILE
    if not cached.exists():
        inherited = init_from_workdir / TOKENIZER_FILE if init_from_workdir else None
        if tokenizer is not None:
            _copy_atomically(pathlib.Path(SentencePieceTokenizer(tokenizer).path), cached)
        elif inherited is not None and inherited.exists():
            _copy_atomically(inherited, cached)
        else:
            texts = [text for example in examples[:TRAINING_TEXTS // 2]
                     for text in (example.query, example.positive)]
            train_sentencepiece(texts, vocab_size, cached)
    return SentencePieceTokenizer(cached)
