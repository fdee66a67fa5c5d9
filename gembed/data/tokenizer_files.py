"""Which tokenizer a folder (training workdir or model folder) holds, opening and copying it.

A folder holds one tokenizer under fixed names: SentencePiece `tokenizer.model`, or Hugging Face
`tokenizer.json` with an optional `tokenizer_config.json` (see `hf_tokenizer`).
"""
from __future__ import annotations

import os
import pathlib
import shutil

from gembed.data.hf_tokenizer import (
    TOKENIZER_SETTINGS,
    TOKENIZER_JSON,
    HuggingFaceTokenizer,
)
from gembed.data.tokenizer import SentencePieceTokenizer
from gembed.errors import GembedUserError

SENTENCEPIECE_FILE = "tokenizer.model"
TOKENIZER_FILES = {
    SentencePieceTokenizer.kind: (SENTENCEPIECE_FILE,),
    HuggingFaceTokenizer.kind: (TOKENIZER_JSON, TOKENIZER_SETTINGS),
}


def tokenizer_kind(directory: pathlib.Path) -> str | None:
    """The kind of tokenizer DIR holds, or None when it holds none."""
    for kind, files in TOKENIZER_FILES.items():
        if (directory / files[0]).is_file():
            return kind
    return None


def open_tokenizer(directory: str | os.PathLike, kind: str | None = None):
    """The tokenizer in DIR, of the recorded `kind` or, when None, whichever DIR holds."""
    directory = pathlib.Path(directory)
    kind = kind or tokenizer_kind(directory)
    if kind == SentencePieceTokenizer.kind:
        return SentencePieceTokenizer(directory / SENTENCEPIECE_FILE)
    if kind == HuggingFaceTokenizer.kind:
        return HuggingFaceTokenizer(directory)
    raise GembedUserError(
        f"{directory}: no tokenizer ({SENTENCEPIECE_FILE} or {TOKENIZER_JSON}) found; "
        f"copy the model's tokenizer file there or re-create the folder.")


def copy_tokenizer(source: pathlib.Path, destination: pathlib.Path, kind: str | None = None) -> None:
    """Copies the tokenizer files of folder `source` (of `kind`, or whichever it holds) into
    folder `destination`, each atomically.

    The file that marks the kind is copied last, so an interrupted copy is redone on the next run.
    """
    kind = kind or tokenizer_kind(source)
    if source.resolve() == destination.resolve():
        return
    for name in reversed(TOKENIZER_FILES.get(kind, ())):
        if (source / name).is_file():
            _copy_atomically(source / name, destination / name)


def save_tokenizer(tokenizer, directory: pathlib.Path) -> None:
    """Copies the files of an open tokenizer into `directory` under the fixed names."""
    if tokenizer.kind == SentencePieceTokenizer.kind:
        _copy_atomically(pathlib.Path(tokenizer.path), directory / SENTENCEPIECE_FILE)
    else:
        copy_tokenizer(pathlib.Path(tokenizer.path).parent, directory, tokenizer.kind)


def _copy_atomically(source: pathlib.Path, destination: pathlib.Path) -> None:
    tmp = destination.with_name(f"{destination.name}.{os.getpid()}.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, destination)
