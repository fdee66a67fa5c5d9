"""Read and write training examples as JSON Lines, the contract data format.

Each line is one UTF-8 JSON object: {"query": str, "positive": str} with optional
"negatives": [str, ...] and "task": str. Extra keys are ignored; blank lines are skipped.
A bad line (invalid UTF-8 or JSON, a missing key, an empty or overlong text) stops the read with its
file and line, or, given a `SkippedLines` record, is counted there and left out.
"""
import dataclasses
import functools
import json
import os
from collections.abc import Iterable

from gembed.data.examples import Example
from gembed.errors import GembedUserError

LINE_FORMAT = '{"query": str, "positive": str} (optional "negatives": [str], "task": str)'


@dataclasses.dataclass
class SkippedLines:
    """Bad lines left out of a read: how many, and the first error message."""

    count: int = 0
    first_error: str | None = None

    def add(self, error: GembedUserError) -> None:
        self.count += 1
        self.first_error = self.first_error or str(error)


def read_jsonl(path: str | os.PathLike, *, max_text_chars: int | None = None,
               skipped: SkippedLines | None = None) -> list[Example]:
    """Parse every non-blank line of `path` into an Example.

    A bad line raises GembedUserError naming it, unless `skipped` is given: then it is counted
    there and left out. Texts longer than `max_text_chars` characters count as bad.
    """
    try:
        with open(path, "rb") as file:
            raw_lines = file.read().split(b"\n")
    except FileNotFoundError:
        raise GembedUserError(f"{path}: file not found; check the path to your JSONL data") from None
    except OSError as error:
        raise GembedUserError(
            f"{path}: cannot read file ({error.strerror}); pass a readable JSONL file"
        ) from None
    examples = []
    for line_number, raw_line in enumerate(raw_lines, start=1):
        where = f"{path}:{line_number}"
        try:
            line = _decode_line(raw_line, where, strip_bom=line_number == 1)
            if line.strip():
                examples.append(_parse_example(line, where, max_text_chars))
        except GembedUserError as error:
            if skipped is None:
                raise
            skipped.add(error)
    if not examples:
        raise GembedUserError(f"{path}: no examples found; each line needs {LINE_FORMAT}")
    return examples


def write_jsonl(path: str | os.PathLike, examples: Iterable[Example]) -> None:
    """Write `examples` to `path` in the format read_jsonl reads."""
    with open(path, "w", encoding="utf-8") as file:
        for example in examples:
            file.write(example_line(example))


def example_line(example: Example) -> str:
    """One JSONL line (newline included) holding `example` as read_jsonl reads it."""
    record = {"query": example.query, "positive": example.positive}
    if example.negatives:
        record["negatives"] = list(example.negatives)
    if example.task is not None:
        record["task"] = example.task
    return json.dumps(record, ensure_ascii=False) + "\n"


def _decode_line(raw_line: bytes, where: str, strip_bom: bool) -> str:
    try:
        line = raw_line.decode("utf-8")
    except UnicodeDecodeError as error:
        bad_byte = raw_line[error.start]
        raise GembedUserError(
            f"{where}: not valid UTF-8 (byte 0x{bad_byte:02x} at column {error.start + 1}); "
            "re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None
    return line.removeprefix("\ufeff") if strip_bom else line


def _parse_example(line: str, where: str, max_text_chars: int | None) -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise GembedUserError(
            f"{where}: invalid JSON ({error.msg} at column {error.colno}); each line needs {LINE_FORMAT}"
        ) from None
    if not isinstance(record, dict):
        raise GembedUserError(
            f"{where}: expected a JSON object, got {_json_type(record)}; each line needs {LINE_FORMAT}"
        )
    for key in ("query", "positive"):
        if key not in record:
            raise GembedUserError(f'{where}: missing key "{key}"; each line needs {LINE_FORMAT}')
    text = functools.partial(_text, where=where, max_chars=max_text_chars)
    query = text(record["query"], "query")
    positive = text(record["positive"], "positive")
    negatives = record.get("negatives", [])
    if not isinstance(negatives, list):
        raise GembedUserError(
            f'{where}: "negatives" must be a list of strings, got {_json_type(negatives)}'
        )
    task = record.get("task")
    if task is not None and not isinstance(task, str):
        raise GembedUserError(f'{where}: "task" must be a string, got {_json_type(task)}')
    return Example(
        query=query,
        positive=positive,
        negatives=tuple(
            text(negative, f"negatives[{index}]") for index, negative in enumerate(negatives)
        ),
        task=task,
    )


def _text(value: object, name: str, where: str, max_chars: int | None) -> str:
    if not isinstance(value, str):
        raise GembedUserError(f'{where}: "{name}" must be a string, got {_json_type(value)}')
    if not value.strip():
        raise GembedUserError(f'{where}: "{name}" is empty; give it non-whitespace text or drop the line')
    if max_chars is not None and len(value) > max_chars:
        raise GembedUserError(
            f'{where}: "{name}" has {len(value)} characters, over TrainConfig.max_text_chars='
            f"{max_chars}; shorten it, raise the limit, or set TrainConfig.skip_bad_examples=True")
    return value


def _json_type(value: object) -> str:
    """Name a parsed JSON value's type the way JSON does."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
