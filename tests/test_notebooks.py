"""The notebooks in notebooks/ run top to bottom in small mode and each shows a plot.

Each is executed with nbclient in a kernel of this interpreter (the venv's python) from
notebooks/, with GEMBED_NOTEBOOK_SMALL=1 and its outputs in a temporary folder. A cell appended to
the notebook prints, as JSON, the values the checks read from the notebook's variables.
"""
from __future__ import annotations

import json
import math
import pathlib

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = ["quickstart.ipynb", "train_and_soup.ipynb", "matryoshka_and_export.ipynb"]


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory) -> KernelSpecManager:
    """Kernel specs holding one "python3" that runs this interpreter, whatever kernels are installed."""
    spec_dir = write_kernel_spec(tmp_path_factory.mktemp("kernels") / "python3")
    return KernelSpecManager(kernel_dirs=[str(pathlib.Path(spec_dir).parent)])


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory) -> pathlib.Path:
    """A JAX compilation cache the notebooks share: a train step or encoder compiled once is reused
    (JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0: the sub-second encoder compiles too)."""
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture
def run_notebook(kernel_specs, compilation_cache, tmp_path, monkeypatch):
    """run(NAME, report) executes notebooks/NAME in small mode, writing under tmp_path; returns the
    executed notebook and the JSON value of the expression `report` evaluated after its last cell."""
    monkeypatch.setenv("GEMBED_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("GEMBED_NOTEBOOK_WORKDIR", str(tmp_path))
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(compilation_cache))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

    def run(name: str, report: str):
        notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
        notebook.cells.append(nbformat.v4.new_code_cell(f"import json\nprint(json.dumps({report}))"))
        kernel = KernelManager(kernel_name="python3", kernel_spec_manager=kernel_specs)
        NotebookClient(notebook, km=kernel, timeout=600,
                       resources={"metadata": {"path": str(NOTEBOOK_DIR)}}).execute()
        printed = "".join(output.text for output in notebook.cells[-1].outputs
                          if output.get("name") == "stdout")
        return notebook, json.loads(printed)

    return run


def count_images(notebook) -> int:
    return sum("image/png" in output.get("data", {})
               for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs)


def test_quickstart(run_notebook):
    notebook, report = run_notebook(
        "quickstart.ipynb", "{'model': MODEL_NAME, 'similarity': similarity.tolist(), "
        "'top_ids': ids.tolist(), 'corpus': len(CORPUS)}")
    assert count_images(notebook) >= 1
    assert report["model"] in ("all-MiniLM-L6-v2", "quickstart model")
    for row, top in zip(report["similarity"], report["top_ids"]):
        assert len(row) == report["corpus"] and all(-1.0001 <= s <= 1.0001 for s in row)
        assert row[top[0]] == pytest.approx(max(row), abs=1e-5)   # the search's best is the row's max


def test_train_and_soup(run_notebook):
    notebook, report = run_notebook(
        "train_and_soup.ipynb", "{'soups': soups, 'metrics': {n: read_metrics(p) for n, p in runs.items()}}")
    assert count_images(notebook) >= 2
    for lines in report["metrics"].values():
        assert all(math.isfinite(line["loss"]) for line in lines)
        assert any("eval/stdlib_code/main_score" in line for line in lines)
    for soup in report["soups"].values():
        scores = [ingredient["score"] for ingredient in soup["ingredients"]] + [soup["score"]]
        assert len(scores) == len(report["metrics"]) + 1
        assert all(0 <= score <= 100 for score in scores)
    greedy = report["soups"]["greedy"]   # keeps an ingredient only when the soup scores no worse
    assert greedy["score"] >= max(ingredient["score"] for ingredient in greedy["ingredients"])


def test_matryoshka_and_export(run_notebook):
    notebook, report = run_notebook(
        "matryoshka_and_export.ipynb",
        "{'scores': {str(d): s for d, s in scores_by_dim.items()}, 'export_max_diff': float(export_max_diff), "
        "'shapes': {str(d): e.shape for d, e in reloaded_by_dim.items()}, "
        "'norms': [float(np.abs(np.linalg.norm(e, axis=1) - 1).max()) for e in reloaded_by_dim.values()]}")
    assert count_images(notebook) >= 1
    assert all(0 <= score <= 100 for score in report["scores"].values())
    assert report["export_max_diff"] <= 1e-5   # the float32 export embeds like the checkpoint
    assert all(shape[1] == int(dim) for dim, shape in report["shapes"].items())
    assert max(report["norms"]) <= 1e-5


def test_every_notebook_is_executed_here():
    assert sorted(path.name for path in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebooks_have_no_outputs(name):
    notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code_cells)
