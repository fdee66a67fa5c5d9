"""The prompt texts of the curation stages: Python format strings in a folder users edit.

Defaults live in experiments/curate/prompts/ (its README lists the files and their placeholders);
a folder passed with --prompts overrides the files it holds.
"""
from __future__ import annotations

import dataclasses
import pathlib
import string

from gembed.errors import GembedUserError

DEFAULT_PROMPTS_DIR = (pathlib.Path(__file__).resolve().parents[2]
                       / "experiments" / "curate" / "prompts")
# field -> (file name, the placeholders it must use)
PROMPT_FILES = {
    "synthesize": ("synthesize.txt", {"shots", "passage"}),
    "shot": ("shot.txt", {"query", "passage"}),
    "relevance": ("relevance.txt", {"query", "passage"}),
    "query_likelihood": ("query_likelihood.txt", {"passage"}),
}


@dataclasses.dataclass(frozen=True)
class Prompts:
    """The format strings of every LLM call of `gembed curate` (see PROMPT_FILES)."""

    synthesize: str
    shot: str
    relevance: str
    query_likelihood: str


def _read_template(path: pathlib.Path, placeholders: set[str]) -> str:
    try:
        text = path.read_text(encoding="utf-8").rstrip("\n")
        fields = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except UnicodeDecodeError as e:
        raise GembedUserError(f"{path}: not UTF-8 ({e}); re-encode the prompt as UTF-8.") from None
    except ValueError as e:
        raise GembedUserError(f"{path}: not a format string ({e}); write literal braces as "
                              f"{{{{ and }}}}.") from None
    if fields != placeholders:
        raise GembedUserError(
            f"{path}: uses placeholders {sorted(fields)}, needs exactly {sorted(placeholders)}; "
            f"edit the prompt (literal braces are written {{{{ and }}}}).")
    return text


def load_prompts(directory: str | pathlib.Path | None = None) -> Prompts:
    """The prompts of `directory`, each file it lacks taken from the defaults."""
    folders = [pathlib.Path(directory)] if directory is not None else []
    if folders and not folders[0].is_dir():
        raise GembedUserError(f"--prompts={directory}: not a folder; pass a folder of prompt files "
                              f"like {DEFAULT_PROMPTS_DIR}.")
    texts = {}
    for field, (name, placeholders) in PROMPT_FILES.items():
        path = next((folder / name for folder in [*folders, DEFAULT_PROMPTS_DIR]
                     if (folder / name).is_file()), None)
        if path is None:
            raise GembedUserError(f"{DEFAULT_PROMPTS_DIR / name}: missing (gembed installed without "
                                  f"its experiments/ folder); pass --prompts=FOLDER holding {name}.")
        texts[field] = _read_template(path, placeholders)
    return Prompts(**texts)
