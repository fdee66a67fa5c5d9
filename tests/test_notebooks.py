"""The notebooks in notebooks/ run top to bottom in small mode and each shows a plot.

The three are executed at once with nbclient (they are mostly single-threaded, so on two cores
this takes about half the time of one after another), each in a kernel of this interpreter (the
venv's python) started in notebooks/, with GEMBED_NOTEBOOK_SMALL=1, a folder of its own to write
in, and a JAX compilation cache they share. A cell appended to each prints, as JSON, the values
the checks read from the notebook's variables.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import pathlib
import sys

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
REPORTS = {   # notebook -> the expression of its variables that its checks read
    "quickstart.ipynb": (
        "{'python': sys.executable, 'model': MODEL_NAME, 'similarity': similarity.tolist(), "
        "'top_ids': ids.tolist(), 'corpus': len(CORPUS)}"),
    "train_and_soup.ipynb": (
        "{'soups': soups, 'metrics': {n: read_metrics(p) for n, p in runs.items()}}"),
    "matryoshka_and_export.ipynb": (
        "{'scores': list(scores_by_dim.values()), 'export_max_diff': float(export_max_diff), "
        "'shapes': {d: e.shape for d, e in reloaded_by_dim.items()}, "
        "'norms': [float(np.abs(np.linalg.norm(e, axis=1) - 1).max()) "
        "for e in reloaded_by_dim.values()]}"),
}


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> dict:
    """{notebook: (the executed notebook, its report) or the exception its execution raised}."""
    spec_dir = write_kernel_spec(tmp_path_factory.mktemp("kernels") / "python3")   # runs sys.executable
    kernel_specs = KernelSpecManager(kernel_dirs=[str(pathlib.Path(spec_dir).parent)])
    compilation_cache = tmp_path_factory.mktemp("jax_cache")

    async def execute(name: str):
        notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
        report_cell = f"import json\nprint(json.dumps({REPORTS[name]}))"
        notebook.cells.append(nbformat.v4.new_code_cell(report_cell))
        env = {**os.environ, "GEMBED_NOTEBOOK_SMALL": "1",
               "GEMBED_NOTEBOOK_WORKDIR": str(tmp_path_factory.mktemp(pathlib.Path(name).stem)),
               "JAX_COMPILATION_CACHE_DIR": str(compilation_cache),
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}   # the encoders' short compiles too
        kernel = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=kernel_specs)
        await NotebookClient(notebook, km=kernel, timeout=600,
                             resources={"metadata": {"path": str(NOTEBOOK_DIR)}}).async_execute(env=env)
        printed = "".join(output.text for output in notebook.cells[-1].outputs
                          if output.get("name") == "stdout")
        return notebook, json.loads(printed)

    async def execute_all():
        return await asyncio.gather(*map(execute, REPORTS), return_exceptions=True)

    return dict(zip(REPORTS, asyncio.run(execute_all())))


def result(executed, name: str):
    """(the executed notebook, its report); re-raises the error that stopped the notebook."""
    if isinstance(executed[name], BaseException):
        raise executed[name]
    return executed[name]


def count_images(notebook) -> int:
    return sum("image/png" in output.get("data", {})
               for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs)


@pytest.mark.slow
def test_quickstart(executed):
    notebook, report = result(executed, "quickstart.ipynb")
    assert report["python"] == sys.executable
    assert count_images(notebook) >= 1
    assert report["model"] in ("all-MiniLM-L6-v2", "quickstart model")
    for row, top in zip(report["similarity"], report["top_ids"]):
        assert len(row) == report["corpus"] and all(-1.0001 <= s <= 1.0001 for s in row)
        assert row[top[0]] == pytest.approx(max(row), abs=1e-5)   # the search's best is the row's max


@pytest.mark.slow
def test_train_and_soup(executed):
    notebook, report = result(executed, "train_and_soup.ipynb")
    assert count_images(notebook) >= 2
    for lines in report["metrics"].values():
        assert all(math.isfinite(line["loss"]) for line in lines)
        assert any("eval/stdlib_code/main_score" in line for line in lines)
    for soup in report["soups"].values():
        scores = [ingredient["score"] for ingredient in soup["ingredients"]] + [soup["score"]]
        assert len(scores) == len(report["metrics"]) + 1
    greedy = report["soups"]["greedy"]   # keeps an ingredient only when the soup scores no worse
    assert greedy["score"] >= max(ingredient["score"] for ingredient in greedy["ingredients"])


@pytest.mark.slow
def test_matryoshka_and_export(executed):
    notebook, report = result(executed, "matryoshka_and_export.ipynb")
    assert count_images(notebook) >= 1
    assert report["export_max_diff"] <= 1e-5   # the float32 export embeds like the checkpoint
    assert all(shape[1] == int(dim) for dim, shape in report["shapes"].items())
    assert max(report["norms"]) <= 1e-5


def test_every_notebook_is_executed_here():
    assert sorted(path.name for path in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(REPORTS)


@pytest.mark.parametrize("name", REPORTS)
def test_committed_notebooks_have_no_outputs(name):
    notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code_cells)
