"""The package's structure: no import circle, imports at module level (except in the CLI and of
optional dependencies), inference and artifact readers independent of the trainer."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "gembed"
OPTIONAL_DEPENDENCIES = ("torch", "transformers", "sentence_transformers", "mteb")
LAZY_IMPORTS_ALLOWED_IN = ("gembed.cli",)   # sub-commands import what they run


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(node: ast.AST, importer: str, known: set[str]) -> set[str]:
    """The gembed modules an import statement names (a package's submodule when it names one)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in known}
    base = node.module or ""
    if node.level:   # relative import
        base = ".".join(importer.split(".")[: -node.level] + ([base] if base else []))
    found = set()
    for alias in node.names:
        if f"{base}.{alias.name}" in known:
            found.add(f"{base}.{alias.name}")
        elif base in known:
            found.add(base)
    return found


def import_graph() -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    """({module: gembed modules it imports at module level}, {module: lazy imports, as
    'line: name'})."""
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    known = set(files)
    graph, lazy = {}, {}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        top_level = {id(node) for node in tree.body}
        graph[name] = set()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if id(node) in top_level:
                # Edges to the packages above an imported module are left out: Python
                # initialises a package before its submodules, so they cannot form a circle.
                graph[name] |= imported_modules(node, name, known) - {name}
            else:
                names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""])
                lazy.setdefault(name, []).extend(
                    f"{node.lineno}: {n}" for n in names
                    if n.split(".")[0] not in OPTIONAL_DEPENDENCIES)
    return graph, lazy


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}   # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_and_no_lazy_imports():
    graph, lazy = import_graph()
    assert len(graph) > 40   # the walk saw the package
    assert find_cycle(graph) is None
    offenders = {module: lines for module, lines in lazy.items()
                 if module not in LAZY_IMPORTS_ALLOWED_IN and lines}
    assert offenders == {}


def test_artifact_readers_do_not_load_the_trainer():
    code = ("import sys, gembed.soup, gembed.export; "
            "print(sorted(m for m in ('gembed.train', 'gembed.recipe', 'gembed.gradcache') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    graph, _ = import_graph()
    assert "gembed.evaluation" not in {m.rsplit(".", 1)[0] for m in graph["gembed.embedder"]}
