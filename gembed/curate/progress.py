"""Resumable stage output: OUT.jsonl (training examples), OUT.scores.jsonl (the LLM's scores, one
object per input example) and OUT.progress.json, the commit record.

A stage works through its input in chunks of consecutive examples. After each chunk both JSONL
files are appended and synced, then the progress record is replaced atomically with the number of
input examples done, both files' sizes and the running counts. A run killed at any point resumes
from the last record: the files are cut back to its sizes and the next chunk starts where it
left off, so, chunks being pure functions of their examples and the settings, the files end up
byte for byte those of an uninterrupted run. The record also holds the settings (and a digest of
the input); resuming with others is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import tqdm

from gembed.data.examples import Example
from gembed.data.jsonl import example_line
from gembed.errors import GembedUserError


def sidecar_paths(output: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """(scores JSONL, progress record) beside OUT.jsonl."""
    return output.with_suffix(".scores.jsonl"), output.with_suffix(".progress.json")


def examples_digest(examples: Iterable[Example]) -> str:
    """A SHA-256 over every text of the examples, in order."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(example_line(example).encode("utf-8"))
    return digest.hexdigest()


def _write_json_atomically(path: pathlib.Path, value: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(value, file, indent=1)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def _append(path: pathlib.Path, lines: Iterable[str]) -> int:
    """Appends the lines, syncs, and returns the file's new size in bytes."""
    with open(path, "a", encoding="utf-8") as file:
        file.writelines(lines)
        file.flush()
        os.fsync(file.fileno())
        return file.tell()


class ResumableOutput:
    """The output files of one stage run, opened fresh or at the last commit of a killed run."""

    def __init__(self, output: str | os.PathLike, settings: dict[str, Any]):
        self.output = pathlib.Path(output)
        self.scores, self.progress = sidecar_paths(self.output)
        self.settings = json.loads(json.dumps(settings))   # as it reads back from the record
        if self.progress.is_file():
            self._resume()
        else:
            if self.output.exists() and self.output.stat().st_size:
                raise GembedUserError(f"{self.output}: exists and has no {self.progress.name} to "
                                      f"resume from; choose a new --output or delete the file.")
            self.output.parent.mkdir(parents=True, exist_ok=True)
            self.output.write_bytes(b"")
            self.scores.write_bytes(b"")
            self.record = {"settings": self.settings, "done": 0, "complete": False,
                           "bytes": {"output": 0, "scores": 0}, "counts": {}}
            _write_json_atomically(self.progress, self.record)

    def _resume(self) -> None:
        try:
            self.record = json.loads(self.progress.read_text())
            sizes = self.record["bytes"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise GembedUserError(f"{self.progress}: unreadable ({e}); delete it and {self.output} "
                                  f"to start over.") from None
        if self.record.get("settings") != self.settings:
            changed = sorted(key for key in set(self.settings) | set(self.record.get("settings", {}))
                             if self.settings.get(key) != self.record["settings"].get(key))
            raise GembedUserError(
                f"{self.progress}: was written with other settings ({', '.join(changed)} differ); "
                f"rerun with the same ones or choose a new --output.")
        for path, size in ((self.output, sizes["output"]), (self.scores, sizes["scores"])):
            if not path.is_file() or path.stat().st_size < size:
                raise GembedUserError(f"{path}: shorter than {self.progress.name} records; delete "
                                      f"both to start over.")
            with open(path, "r+b") as file:
                file.truncate(size)

    @property
    def done(self) -> int:
        """Input examples done (committed)."""
        return self.record["done"]

    @property
    def counts(self) -> dict[str, int]:
        return dict(self.record["counts"])

    def commit(self, done: int, examples: Sequence[Example], scores: Sequence[dict],
               counts: dict[str, int]) -> None:
        """Appends a chunk's examples and score records; `done` input examples are now done and
        `counts` are added to the running counts."""
        sizes = {"output": _append(self.output, map(example_line, examples)),
                 "scores": _append(self.scores, (json.dumps(s, ensure_ascii=False) + "\n"
                                                 for s in scores))}
        totals = self.counts
        for name, value in counts.items():
            totals[name] = totals.get(name, 0) + int(value)
        self.record = {**self.record, "done": done, "bytes": sizes, "counts": totals}
        _write_json_atomically(self.progress, self.record)

    def finish(self) -> None:
        self.record = {**self.record, "complete": True}
        _write_json_atomically(self.progress, self.record)


ChunkResult = tuple[list[Example], list[dict], dict[str, int]]


def run_in_chunks(output: ResumableOutput, total: int, chunk_size: int,
                  process: Callable[[int, int], ChunkResult], description: str,
                  show_progress: bool = False) -> dict[str, int]:
    """Runs `process(start, stop)` over the input examples not yet done, committing each chunk;
    returns the final counts."""
    if chunk_size < 1:
        raise GembedUserError(f"--chunk_size={chunk_size} must be a positive integer.")
    starts = range(output.done, total, chunk_size)
    for start in tqdm.tqdm(starts, desc=description, disable=not show_progress):
        stop = min(start + chunk_size, total)
        examples, scores, counts = process(start, stop)
        output.commit(stop, examples, scores, counts)
    output.finish()
    return output.counts
