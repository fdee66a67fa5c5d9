"""The tokenizer of a training workdir: given, inherited from INIT_FROM, or trained once and cached.

The chosen tokenizer is kept in the workdir under the fixed names of `tokenizer_files`
(DIR/tokenizer.model, or DIR/tokenizer.json for a Hugging Face tokenizer of an imported model), so
a resumed run, a later stage that inits from this one, and the export all read the same files.
"""
from __future__ import annotations

import pathlib
from collections.abc import Sequence

from gembed.data.examples import Example
from gembed.data.hf_tokenizer import TOKENIZER_JSON
from gembed.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from gembed.data.tokenizer_files import (
    SENTENCEPIECE_FILE,
    copy_tokenizer,
    open_tokenizer,
    save_tokenizer,
    tokenizer_kind,
)

TOKENIZER_FILE = SENTENCEPIECE_FILE
TRAINING_TEXTS = 50_000   # texts sampled (in corpus order) to train a new vocabulary


def prepare_tokenizer(workdir: pathlib.Path, *, tokenizer: str | None,
                      init_from_dir: pathlib.Path | None, vocab_size: int,
                      examples: Sequence[Example]):
    """Returns the workdir's tokenizer, copying or training its files on first use.

    Order: the workdir's own files (resume), an explicit `tokenizer` (a sentencepiece .model, a
    Hugging Face tokenizer.json, or a folder holding either), the INIT_FROM workdir's or model
    folder's files, else a sentencepiece model of `vocab_size` trained on the examples' texts.
    """
    if tokenizer_kind(workdir) is None:
        explicit = pathlib.Path(tokenizer) if tokenizer is not None else None
        if explicit is not None and explicit.name == TOKENIZER_JSON:
            explicit = explicit.parent
        if explicit is not None and explicit.is_dir():
            save_tokenizer(open_tokenizer(explicit), workdir)
        elif explicit is not None:
            save_tokenizer(SentencePieceTokenizer(explicit), workdir)
        elif init_from_dir is not None and tokenizer_kind(init_from_dir) is not None:
            copy_tokenizer(init_from_dir, workdir)
        else:
            texts = [text for example in examples[:TRAINING_TEXTS // 2]
                     for text in (example.query, example.positive)]
            train_sentencepiece(texts, vocab_size, workdir / TOKENIZER_FILE)
    return open_tokenizer(workdir)
