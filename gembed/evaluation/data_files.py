"""Reading evaluation files: where they are, what to say when they are absent or malformed.

A data set that is not there raises `DataMissing` (the runner skips that task with one line); a
file that is there but cannot be parsed raises `GembedUserError` naming the file and line.
"""
from __future__ import annotations

import csv
import json
import pathlib
from typing import Iterator

from gembed.errors import GembedUserError


class DataMissing(Exception):
    """A task's data set is not on this machine; the task is skipped, not failed."""


def data_path(data_dir: str | pathlib.Path | None, *parts: str) -> pathlib.Path:
    """data_dir/parts..., or DataMissing if data_dir is unset or the path does not exist."""
    if data_dir is None:
        raise DataMissing("needs --data_dir (a folder holding the public evaluation sets)")
    path = pathlib.Path(data_dir).joinpath(*parts)
    if not path.exists():
        raise DataMissing(f"{path} not found")
    return path


def read_text(path: pathlib.Path) -> str:
    """UTF-8, else latin-1 (SentEval's MR/CR/SUBJ/MPQA/TREC files are latin-1)."""
    if path.is_dir():
        raise malformed(path, None, "is a folder where a file belongs")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise malformed(path, None, f"cannot be read ({error.strerror})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def read_lines(path: pathlib.Path) -> list[str]:
    """The lines of a text file without their line ends (a final newline ends the last line)."""
    text = read_text(path)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def at_least(path: pathlib.Path, count: int, minimum: int, what: str) -> None:
    """A user error naming `path` unless it holds `minimum` or more `what` (e.g. "scored pairs")."""
    if count < minimum:
        raise malformed(path, None, f"{count} {what}; this task needs at least {minimum}")


def malformed(path: pathlib.Path, line: int | None, what: str) -> GembedUserError:
    where = f"{path}:{line}" if line is not None else str(path)
    return GembedUserError(f"{where}: {what}; fix the file or point --data_dir at an intact copy.")


def read_jsonl(path: pathlib.Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line."""
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise malformed(path, number, f"not valid JSON ({e.msg})") from None
        if not isinstance(value, dict):
            raise malformed(path, number, "expected a JSON object")
        yield number, value


def read_json(path: pathlib.Path):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise malformed(path, e.lineno, f"not valid JSON ({e.msg})") from None


def read_csv(path: pathlib.Path, delimiter: str = ",") -> list[list[str]]:
    """Rows of a CSV/TSV file (quotes honoured for ',' files, ignored for tab files)."""
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    return list(csv.reader(read_text(path).splitlines(), delimiter=delimiter, quoting=quoting))


def to_float(path: pathlib.Path, line: int, value: str, what: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise malformed(path, line, f"{what} {value!r} is not a number") from None
