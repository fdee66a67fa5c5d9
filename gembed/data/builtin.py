"""Built-in corpora made at run time from the installed Python standard library (no download).

- ``stdlib_code``: docstring summary -> function source (docstring removed).
- ``stdlib_docs``: dotted name -> docstring, plus pydoc topic title -> topic text.

Both are split by the module file an example comes from (pydoc topics by topic name), so a
function held out of one corpus is held out of the other too: its docstring never reaches
training as a docs positive while its code is a code-search test document. A stable hash of the
key puts about 10% of keys in "test", another 10% in "validation" and the rest in "train", so
splits are the same on every machine with the same Python version. Only the standard library's
own sources are read (never site-packages).
"""
import ast
import functools
import hashlib
import os
import sysconfig
import tokenize
import warnings
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from pydoc_data.topics import topics as PYDOC_TOPICS

from gembed.data.examples import Example
from gembed.errors import GembedUserError

CORPUS_NAMES = ("stdlib_code", "stdlib_docs")
SPLITS = ("train", "validation", "test")
TEST_PERCENT = 10         # hash buckets 0..9
VALIDATION_PERCENT = 10   # hash buckets 10..19
SKIPPED_DIRECTORIES = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages",
                                 "__pycache__"})
MIN_TEXT_WORDS = 4
MIN_BODY_LINES = 2
MAX_CODE_CHARS = 4000
MAX_PASSAGE_CHARS = 1500

FUNCTION_NODES = (ast.FunctionDef, ast.AsyncFunctionDef)
STATEMENT_NODES = (ast.stmt, ast.excepthandler, ast.match_case)  # where a def or class can appear


def load_builtin(name: str, split: str) -> list[Example]:
    """Return the `split` ("train", "validation" or "test") examples of the built-in corpus `name`."""
    if name not in CORPUS_NAMES:
        raise GembedUserError(f"unknown built-in corpus {name!r}; known: {', '.join(CORPUS_NAMES)}")
    if split not in SPLITS:
        raise GembedUserError(f"unknown split {split!r} for builtin:{name}; use one of: {', '.join(SPLITS)}")
    return [entry.example for entry in _build_corpora()[name] if _split_of(entry.split_key) == split]


class CorpusEntry(NamedTuple):
    """An example and the key its split is hashed from: its module file, or a pydoc topic's name."""

    split_key: str
    example: Example


@functools.lru_cache(maxsize=1)
def _build_corpora() -> dict[str, tuple[CorpusEntry, ...]]:
    """Parse the stdlib once into the entries of every corpus."""
    code, docs = [], []
    for relative_path, module_name, source, tree in _stdlib_modules():
        definitions = list(_definitions(tree))
        code.extend(CorpusEntry(relative_path, example) for example in _code_examples(source, definitions))
        for qualname, node, in_function in definitions:
            if not in_function:
                title = f"{module_name}.{qualname}"
                docs.extend(CorpusEntry(relative_path, example)
                            for example in _docstring_examples(title, node))
        docs.extend(CorpusEntry(relative_path, example)
                    for example in _docstring_examples(module_name, tree))
    for topic, text in sorted(PYDOC_TOPICS.items()):
        topic_key = f"pydoc_data.topics:{topic}"
        docs.extend(CorpusEntry(topic_key, example) for example in _topic_examples(topic, text))
    return {"stdlib_code": _deduplicated(code), "stdlib_docs": _deduplicated(docs)}


def _stdlib_modules() -> Iterator[tuple[str, str, str, ast.Module]]:
    """Yield (relative path, module name, source, tree) for each parseable stdlib source file, sorted."""
    stdlib_directory = sysconfig.get_paths()["stdlib"]
    found_any = False
    for directory, subdirectories, files in os.walk(stdlib_directory):
        subdirectories[:] = sorted(name for name in subdirectories if name not in SKIPPED_DIRECTORIES)
        for file_name in sorted(name for name in files if name.endswith(".py")):
            path = os.path.join(directory, file_name)
            relative_path = os.path.relpath(path, stdlib_directory).replace(os.sep, "/")
            try:
                with tokenize.open(path) as file, warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    source = file.read()
                    tree = ast.parse(source)
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            found_any = True
            yield relative_path, _module_name(relative_path), source, tree
    if not found_any:
        raise GembedUserError(
            f"{stdlib_directory}: no Python standard library sources found; the built-in corpora need "
            "the stdlib .py files (install your distribution's full Python package) or use a JSONL file"
        )


def _module_name(relative_path: str) -> str:
    parts = relative_path.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _definitions(
    tree: ast.AST, prefix: str = "", in_function: bool = False
) -> Iterator[tuple[str, ast.AST, bool]]:
    """Yield (qualname, node, nested in a function) for every class and function, like __qualname__."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, (ast.ClassDef, *FUNCTION_NODES)):
            qualname = prefix + child.name
            yield qualname, child, in_function
            is_function = isinstance(child, FUNCTION_NODES)
            child_prefix = qualname + (".<locals>." if is_function else ".")
            yield from _definitions(child, child_prefix, in_function or is_function)
        elif isinstance(child, STATEMENT_NODES):
            yield from _definitions(child, prefix, in_function)


def _code_examples(source: str, definitions: list[tuple[str, ast.AST, bool]]) -> Iterator[Example]:
    """Yield (summary -> source without docstring) for each documented, non-trivial function."""
    source_lines = source.split("\n")
    for _, node, _ in definitions:
        if not isinstance(node, FUNCTION_NODES):
            continue
        docstring = ast.get_docstring(node, clean=True)
        if docstring is None:
            continue
        summary = " ".join(docstring.split("\n\n")[0].split())
        code = _source_without_docstring(source_lines, node)
        if (
            len(summary.split()) >= MIN_TEXT_WORDS
            and code is not None
            and len(code) <= MAX_CODE_CHARS
            and summary not in " ".join(code.split())
        ):
            yield Example(query=summary, positive=code)


def _source_without_docstring(
    source_lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef
) -> str | None:
    """The function's dedented source lines with the docstring dropped; None if trivial or entangled."""
    docstring_node = node.body[0]
    shares_line_with_code = docstring_node.lineno == node.lineno or (
        len(node.body) > 1 and node.body[1].lineno == docstring_node.end_lineno
    )
    if shares_line_with_code:
        return None
    signature = source_lines[node.lineno - 1 : docstring_node.lineno - 1]
    body = source_lines[docstring_node.end_lineno : node.end_lineno]
    if sum(1 for line in body if line.strip() and not line.strip().startswith("#")) < MIN_BODY_LINES:
        return None
    indent = signature[0][: len(signature[0]) - len(signature[0].lstrip())]
    return "\n".join(line.removeprefix(indent) for line in signature + body).rstrip()


def _docstring_examples(title: str, node: ast.AST) -> Iterator[Example]:
    """Yield (dotted name -> docstring) if the node has a docstring of at least a few words."""
    docstring = ast.get_docstring(node, clean=True)
    if docstring and len(docstring.split()) >= MIN_TEXT_WORDS:
        yield Example(query=title, positive=_truncated(docstring.strip(), MAX_PASSAGE_CHARS))


def _topic_examples(topic: str, text: str) -> Iterator[Example]:
    """Yield (topic -> passage) examples, packing paragraphs into passages of bounded length."""
    passages = list(_packed_paragraphs(text.strip().split("\n\n"), MAX_PASSAGE_CHARS))
    for part, passage in enumerate(passages, start=1):
        title = topic if len(passages) == 1 else f"{topic} (part {part})"
        yield Example(query=title, positive=passage)


def _packed_paragraphs(paragraphs: Iterable[str], limit: int) -> Iterator[str]:
    passage = ""
    for paragraph in (paragraph.strip("\n") for paragraph in paragraphs):
        if not paragraph.strip():
            continue
        if passage and len(passage) + 2 + len(paragraph) > limit:
            yield passage
            passage = ""
        passage = _truncated(f"{passage}\n\n{paragraph}" if passage else paragraph, limit)
    if passage:
        yield passage


def _truncated(text: str, limit: int) -> str:
    """Cut `text` to at most `limit` characters, at a word boundary."""
    return text if len(text) <= limit else text[:limit].rsplit(None, 1)[0]


def _split_of(split_key: str) -> str:
    """The split of a key: its SHA-256 (first 8 bytes, big-endian) mod 100 picks a bucket; buckets
    below TEST_PERCENT are "test", the next VALIDATION_PERCENT "validation", the rest "train"."""
    bucket = int.from_bytes(hashlib.sha256(split_key.encode("utf-8")).digest()[:8], "big") % 100
    if bucket < TEST_PERCENT:
        return "test"
    return "validation" if bucket < TEST_PERCENT + VALIDATION_PERCENT else "train"


def _deduplicated(entries: list[CorpusEntry]) -> tuple[CorpusEntry, ...]:
    """Keep the first of each exact (query, positive) pair, so no pair lands in both splits."""
    seen = set()
    kept = []
    for entry in entries:
        pair = (entry.example.query, entry.example.positive)
        if pair not in seen:
            seen.add(pair)
            kept.append(entry)
    return tuple(kept)
