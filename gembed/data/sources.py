"""Resolve a data spec string (JSONL path, tfds:NAME[/CONFIG]:SPLIT or builtin:NAME) to examples."""
import os
from collections.abc import Sequence

from gembed.data.builtin import load_builtin
from gembed.data.examples import Example
from gembed.data.jsonl import SkippedLines, read_jsonl
from gembed.data.tfds_pairs import TfdsExamples
from gembed.errors import GembedUserError

ACCEPTED_FORMS = "a JSONL file path, tfds:NAME[/CONFIG]:SPLIT, builtin:stdlib_code or builtin:stdlib_docs"


def load_examples(spec: str, split: str = "train", *, max_text_chars: int | None = None,
                  skipped: SkippedLines | None = None) -> Sequence[Example]:
    """The examples `spec` names, as a random-access sequence.

    `split` picks a built-in corpus split (TFDS specs name their own; files have one). JSONL bad
    lines raise, or are counted in `skipped` when given (see `read_jsonl`).
    """
    if spec.startswith("builtin:"):
        return load_builtin(spec.removeprefix("builtin:"), split)
    if spec.startswith("tfds:"):
        return TfdsExamples(spec)
    if spec.endswith((".jsonl", ".json")) or os.path.isfile(spec):
        return read_jsonl(spec, max_text_chars=max_text_chars, skipped=skipped)
    raise GembedUserError(f"{spec!r}: not a data source gembed understands; use {ACCEPTED_FORMS}")
