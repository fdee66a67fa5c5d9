"""Resolve a data spec string (JSONL path or builtin:NAME) to a list of examples."""
import os

from gembed.data.builtin import load_builtin
from gembed.data.examples import Example
from gembed.data.jsonl import read_jsonl
from gembed.errors import GembedUserError

ACCEPTED_FORMS = "a JSONL file path, tfds:NAME[/CONFIG]:SPLIT, builtin:stdlib_code or builtin:stdlib_docs"


def load_examples(spec: str, split: str = "train") -> list[Example]:
    """Load the examples `spec` names; `split` picks a built-in corpus split and is ignored for files."""
    if spec.startswith("builtin:"):
        return load_builtin(spec.removeprefix("builtin:"), split)
    if spec.startswith("tfds:"):
        raise GembedUserError(
            f"{spec}: TFDS sources are not supported yet; use a JSONL file or builtin:stdlib_code"
        )
    if spec.endswith((".jsonl", ".json")) or os.path.isfile(spec):
        return read_jsonl(spec)
    raise GembedUserError(f"{spec!r}: not a data source gembed understands; use {ACCEPTED_FORMS}")
