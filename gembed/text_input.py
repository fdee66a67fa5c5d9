"""The input of `gembed encode`: one text per line, or (a `.jsonl` file) JSON objects with `text`.

Row i of the output is line i of the file, lines as Python's universal-newline file iteration
splits them (`\n`, `\r\n`, `\r`; U+0085, U+2028 and form feed stay inside a text); a UTF-8 BOM is
dropped. An empty text, invalid UTF-8 or a malformed JSON line stops with the file and line named.
"""
from __future__ import annotations

import json
import os
import pathlib

from gembed.errors import GembedUserError


def read_texts(path: str | os.PathLike) -> list[str]:
    """The texts of FILE, in order."""
    path = pathlib.Path(path)
    try:
        with open(path, encoding="utf-8-sig", newline=None) as file:
            lines = [line.removesuffix("\n") for line in file]
    except IsADirectoryError:
        raise GembedUserError(f"{path}: is a folder; --input names a file.") from None
    except FileNotFoundError:
        raise GembedUserError(f"{path}: no such file; check --input.") from None
    except UnicodeDecodeError as e:
        raise GembedUserError(f"{path}: not UTF-8 ({e}); re-encode the file as UTF-8.") from None
    jsonl = path.suffix == ".jsonl"
    texts = []
    for number, line in enumerate(lines, start=1):
        text = line
        if jsonl:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise GembedUserError(f"{path}:{number}: invalid JSON ({e}); fix the line.") from None
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise GembedUserError(f"{path}:{number}: expected an object with a string "
                                      f"\"text\" field; fix the line.")
        if not text.strip():
            raise GembedUserError(f"{path}:{number}: empty text; remove the line.")
        texts.append(text)
    if not texts:
        raise GembedUserError(f"{path}: no texts; give one text per line (or JSONL with \"text\").")
    return texts
