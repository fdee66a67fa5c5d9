"""Hugging Face tokenizers (`tokenizer.json`) behind the interface of `SentencePieceTokenizer`.

The special tokens a source model adds ([CLS]/[SEP] for BERT, BOS for Llama/Gemma) come from the
`tokenizer.json` post-processor, and truncation keeps them, as `transformers` fast tokenizers and
sentence-transformers do. The pad and eos tokens, which `tokenizer.json` does not name, are read
from a `tokenizer_config.json` beside it (the Hugging Face file; only `pad_token` and `eos_token`
are used).
"""
from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

import tokenizers
from tokenizers.implementations import BertWordPieceTokenizer

from gembed.errors import GembedUserError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_SETTINGS = "tokenizer_config.json"


def _token_content(token) -> str | None:
    """A special token as `tokenizer_config.json` writes it (a string or an AddedToken dict)."""
    return token.get("content") if isinstance(token, dict) else token


class HuggingFaceTokenizer:
    """Encodes text with a `tokenizers` model read from DIR/tokenizer.json (+ tokenizer_config.json)."""

    kind = "huggingface"

    def __init__(self, directory: str | os.PathLike):
        directory = pathlib.Path(directory)
        self.path = str(directory / TOKENIZER_JSON)
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(self.path)
        except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception)
            raise GembedUserError(
                f"{self.path}: not a readable Hugging Face tokenizer ({str(e).splitlines()[0]}); "
                f"re-run `gembed import` on the source model.") from None
        special = read_special_tokens(directory)
        self.vocab_size: int = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_id: int | None = self._token_id(special.get("eos_token"))
        pad_id = self._token_id(special.get("pad_token"))
        self.pad_id: int = pad_id if pad_id is not None else (self.eos_id or 0)

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tokenizer.token_to_id(token)

    def encode(self, texts: Sequence[str], max_length: int, add_eos: bool = False) -> list[list[int]]:
        """Token ids per text with the source's special tokens, truncated to `max_length` ids.

        With `add_eos` (and an eos token) the last id is always eos.
        """
        if max_length < 1:
            raise GembedUserError(f"max_length must be at least 1, got {max_length}; raise MAX_LENGTH")
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length)
        ids = [encoding.ids for encoding in self._tokenizer.encode_batch(list(texts))]
        if add_eos and self.eos_id is not None:
            return [row if row[-1:] == [self.eos_id] else row[:max_length - 1] + [self.eos_id]
                    for row in ids]
        return ids


def read_special_tokens(directory: pathlib.Path, file_name: str = TOKENIZER_SETTINGS) -> dict[str, str]:
    """`pad_token`, `eos_token` and `bos_token` of DIR/tokenizer_config.json (or of another
    Hugging Face file with these keys, such as special_tokens_map.json), those present."""
    path = directory / file_name
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GembedUserError(f"{path}: not valid JSON ({e}); restore it from the source model.") from None
    tokens = {name: _token_content(config.get(name)) for name in ("pad_token", "eos_token", "bos_token")}
    return {name: token for name, token in tokens.items() if token is not None}


def wordpiece_from_vocab(vocab_path: pathlib.Path, lowercase: bool) -> tokenizers.Tokenizer:
    """A BERT WordPiece tokenizer ([CLS] ... [SEP]) built from a `vocab.txt`."""
    return BertWordPieceTokenizer(str(vocab_path), lowercase=lowercase)._tokenizer


def write_huggingface_tokenizer(tokenizer: tokenizers.Tokenizer, special_tokens: dict[str, str],
                                directory: pathlib.Path) -> None:
    """Writes DIR/tokenizer.json and a tokenizer_config.json naming the special tokens."""
    tokenizer.save(str(directory / TOKENIZER_JSON))
    (directory / TOKENIZER_SETTINGS).write_text(json.dumps(special_tokens, indent=2) + "\n")
