"""Faults never reach disk silently (issue 21): divergence, concurrent runs, overwrites, damaged
files, encode's rows, infrastructure errors, preemption. Tiny model, a dozen steps per run."""
from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy

import gembed
from gembed import checkpoint, cli, model_folder, preemption, train
from gembed.data import load_builtin, train_sentencepiece, write_jsonl

STEPS = 12


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    train = load_builtin("stdlib_code", "train")[:300]
    write_jsonl(root / "pairs.jsonl", train)
    texts = [t for e in train for t in (e.query, e.positive)]
    train_sentencepiece(texts, 400, root / "sp.model")
    train_sentencepiece(texts, 600, root / "sp600.model")
    return root


def train_args(corpus, workdir, *extra):
    params = [f"TRAIN_DATA='{corpus / 'pairs.jsonl'}'", f"TRAIN_STEPS={STEPS}", "BATCH_SIZE=16",
              "LEARNING_RATE=1e-3", "CHECKPOINT_EVERY=4", "LOG_EVERY=2", "VOCAB_SIZE=400",
              f"TrainConfig.tokenizer='{corpus / 'sp.model'}'", "TrainConfig.warmup_steps=1", *extra]
    return (["train", "--gin_file=model/tiny.gin", "--gin_file=prefinetune.gin",
             f"--workdir={workdir}"] + [f"--gin_param={p}" for p in params])


def metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").open()]


def error_line(capsys, argv, code=2) -> str:
    capsys.readouterr()
    assert cli.main(argv) == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("gembed: error: "), lines
    return lines[-1]


@pytest.fixture(scope="module")
def good_run(corpus):
    workdir = corpus / "good"
    assert cli.main(train_args(corpus, workdir)) == 0
    return workdir


@pytest.fixture(scope="module")
def good_folder(good_run, corpus):
    folder = corpus / "good_folder"
    assert cli.main(["export", f"--checkpoint={good_run}", f"--output={folder}"]) == 0
    return folder


def raw_params(step_dir: pathlib.Path) -> dict:
    """The params of a step folder as orbax stores them (no gembed checks)."""
    with ocp.CheckpointManager(step_dir.parent, item_names=("params",),
                               options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
        restored = manager.restore(int(step_dir.name), args=ocp.args.Composite(
            params=ocp.args.StandardRestore()))
    return restored["params"]


def all_finite(tree) -> bool:
    return all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(tree))


@pytest.mark.slow   # three short runs: ~15 s of CPU, longer on a shared machine
def test_diverged_run_exits_2_keeps_last_finite_checkpoint_and_writes_no_nan(corpus, capsys):
    workdir = corpus / "diverged"
    args = train_args(corpus, workdir, "LEARNING_RATE=1e4", "CHECKPOINT_EVERY=2")
    line = error_line(capsys, args)
    assert "training diverged at step" in line and "LEARNING_RATE" in line
    diverged_at = int(line.split("diverged at step ")[1].split()[0])
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
    assert steps and max(steps) < diverged_at
    assert f"checkpoints/{max(steps)}," in line
    assert all(all_finite(raw_params(workdir / "checkpoints" / str(s))) for s in steps)
    assert all(m["step"] < diverged_at for m in metrics(workdir))
    # the same command again diverges again (no silent exit 0); a sane rate resumes and finishes
    assert "training diverged" in error_line(capsys, args)
    assert cli.main(train_args(corpus, workdir, "CHECKPOINT_EVERY=2")) == 0
    assert metrics(workdir)[-1]["step"] == STEPS


def nan_checkpoint_workdir(good_run, path) -> pathlib.Path:
    """A copy of the good run whose latest checkpoint holds NaN params (as older gembed wrote)."""
    shutil.copytree(good_run, path)
    latest = max(int(p.name) for p in (path / "checkpoints").iterdir())
    with ocp.CheckpointManager(path / "checkpoints", item_names=checkpoint.ITEMS) as manager:
        items = manager.restore(latest, args=ocp.args.Composite(
            **{name: ocp.args.StandardRestore() for name in checkpoint.ITEMS}))
        items = {name: items[name] for name in checkpoint.ITEMS}
        items["params"] = jax.tree.map(lambda x: np.full_like(x, np.nan), items["params"])
        manager.delete(latest)
        manager.save(latest, args=ocp.args.Composite(
            **{name: ocp.args.StandardSave(items[name]) for name in checkpoint.ITEMS}))
        manager.wait_until_finished()
    return path


def test_nan_params_are_refused_by_export_soup_encode_eval_and_skipped_by_resume(
        corpus, good_run, good_folder, tmp_path, capsys):
    nan_run = nan_checkpoint_workdir(good_run, tmp_path / "nan_run")
    assert "NaN" in error_line(capsys, ["export", f"--checkpoint={nan_run}",
                                        f"--output={tmp_path / 'x'}"])
    assert "NaN" in error_line(capsys, ["soup", str(nan_run), str(good_run),
                                        f"--output={tmp_path / 'soup'}"])
    assert not (tmp_path / "x").exists() and not (tmp_path / "soup").exists()
    nan_folder = tmp_path / "nan_folder"
    shutil.copytree(good_folder, nan_folder)
    weights = model_folder.read_weights(nan_folder / model_folder.WEIGHTS_FILE)
    safetensors.numpy.save_file({k: np.full_like(v, np.nan) for k, v in weights.items()},
                                str(nan_folder / model_folder.WEIGHTS_FILE))
    config = json.loads((nan_folder / model_folder.CONFIG_FILE).read_text())
    config["weights_sha256"] = model_folder.file_sha256(nan_folder / model_folder.WEIGHTS_FILE)
    (nan_folder / model_folder.CONFIG_FILE).write_text(json.dumps(config))
    (tmp_path / "in.txt").write_text("a\nb\n")
    assert "NaN" in error_line(capsys, ["encode", f"--model={nan_folder}",
                                        f"--input={tmp_path / 'in.txt'}",
                                        f"--output={tmp_path / 'out.npy'}"])
    assert not (tmp_path / "out.npy").exists()
    assert "NaN" in error_line(capsys, ["eval", f"--model={nan_folder}", "--tasks=stdlib_code"])
    # resume: the NaN step is skipped (and moved aside), the run redoes it from the previous one
    latest = max(int(p.name) for p in (nan_run / "checkpoints").iterdir())
    capsys.readouterr()
    assert cli.main(train_args(corpus, nan_run)) == 0
    err = capsys.readouterr().err
    assert f"skipped checkpoint {nan_run / 'checkpoints' / str(latest)} (it holds NaN" in err
    assert (nan_run / checkpoint.SKIPPED_DIR / str(latest)).is_dir()
    assert all_finite(raw_params(nan_run / "checkpoints" / str(latest)))
    np.testing.assert_allclose([m["loss"] for m in metrics(nan_run)],
                               [m["loss"] for m in metrics(good_run)], rtol=1e-5)


def test_corrupt_latest_checkpoint_resumes_from_the_previous_one(corpus, good_run, tmp_path,
                                                                 capsys):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    latest = run / "checkpoints" / str(STEPS)
    for path in (latest / "params").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\0" * path.stat().st_size)
    capsys.readouterr()
    assert cli.main(train_args(corpus, run)) == 0
    err = capsys.readouterr().err
    assert f"skipped checkpoint {latest} (it does not restore" in err
    assert f"resuming from step {STEPS - 4}" in err
    fields = ("step", "examples_digest")
    assert [[m[f] for f in fields] for m in metrics(run)] == [
        [m[f] for f in fields] for m in metrics(good_run)]
    np.testing.assert_allclose([m["loss"] for m in metrics(run)],
                               [m["loss"] for m in metrics(good_run)], rtol=1e-5)
    assert gembed.load(run).params is not None


def test_torn_last_metrics_line_is_dropped_on_resume(corpus, good_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    with open(run / "metrics.jsonl", "a") as file:
        file.write('{"step": 13, "lo')
    assert cli.main(train_args(corpus, run)) == 0
    assert metrics(run) == metrics(good_run)
    with open(run / "metrics.jsonl", "a") as file:
        file.write('garbage\n{"step": 12}\n')
    assert "metrics.jsonl:7: not a metrics line" in error_line(capsys, train_args(corpus, run))


@pytest.mark.slow   # a separate process: ~15 s of CPU, longer on a shared machine
def test_second_train_on_a_workdir_exits_2_and_the_first_is_untouched(corpus, good_run, tmp_path,
                                                                      capsys):
    workdir = tmp_path / "shared"
    first = subprocess.Popen([sys.executable, "-m", "gembed", *train_args(corpus, workdir)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = workdir / "gembed.lock"
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.exists() and lock.read_text().strip()):
        time.sleep(0.05)
    line = error_line(capsys, train_args(corpus, workdir, "SEED=7", "LEARNING_RATE=3e-3"))
    assert f"in use by another gembed run (pid {first.pid} on host " in line
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert "SEED = 0" in (workdir / "config.gin").read_text()
    assert [m["examples_digest"] for m in metrics(workdir)] == [
        m["examples_digest"] for m in metrics(good_run)]
    np.testing.assert_allclose([m["loss"] for m in metrics(workdir)],
                               [m["loss"] for m in metrics(good_run)], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(gembed.load(workdir).params),
                    jax.tree.leaves(gembed.load(good_run).params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert cli.main(train_args(corpus, workdir)) == 0   # the lock died with its holder


def test_export_and_soup_refuse_non_empty_output_and_overwrite_is_all_or_nothing(
        corpus, good_run, good_folder, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "model"
    shutil.copytree(good_folder, folder)
    texts = ["def add(a, b): return a + b", "sort a list in place"]
    before = gembed.load(folder).encode(texts)
    for argv in (["export", f"--checkpoint={good_run}", f"--output={folder}"],
                 ["soup", str(good_run), f"--output={folder}"]):
        assert "not empty" in error_line(capsys, argv)
    assert "overlaps the input" in error_line(
        capsys, ["export", f"--checkpoint={good_run}", f"--output={good_run}", "--overwrite"])
    # killed midway (after the weights, before the tokenizer): the old folder stays as it was
    monkeypatch.setattr(model_folder, "save_tokenizer",
                        lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    assert cli.main(["export", f"--checkpoint={good_run}", f"--output={folder}",
                     "--overwrite", "--dtype=bfloat16"]) == 130
    monkeypatch.undo()
    np.testing.assert_array_equal(gembed.load(folder).encode(texts), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # disk full while writing: one error line naming the file; the old folder again intact
    def full(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    line = error_line(capsys, ["export", f"--checkpoint={good_run}", f"--output={folder}",
                               "--overwrite"])
    assert "model.safetensors: No space left on device; free disk space" in line
    monkeypatch.undo()
    np.testing.assert_array_equal(gembed.load(folder).encode(texts), before)
    assert cli.main(["export", f"--checkpoint={good_run}", f"--output={folder}", "--overwrite",
                     "--dtype=bfloat16"]) == 0
    assert json.loads((folder / "gembed_config.json").read_text())["weights_dtype"] == "bfloat16"
    assert {oct(p.stat().st_mode & 0o777) for p in folder.iterdir()} == {"0o644"}
    soup = tmp_path / "soup"
    assert cli.main(["soup", str(good_run), f"--output={soup}"]) == 0
    assert cli.main(["soup", str(good_run), f"--output={soup}", "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "soup"]


def test_model_folder_damage_and_a_foreign_tokenizer_are_refused(corpus, good_folder, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(good_folder, damaged)
    weights = damaged / model_folder.WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-60_000:-10_000] = bytes(50_000)   # 50 KB of zeros inside the tensors
    weights.write_bytes(bytes(data))
    with pytest.raises(gembed.GembedUserError, match="weights_sha256"):
        gembed.load(damaged)
    foreign = tmp_path / "foreign"
    shutil.copytree(good_folder, foreign)
    shutil.copyfile(corpus / "sp600.model", foreign / "tokenizer.model")
    with pytest.raises(gembed.GembedUserError, match="600 pieces but the model's embedding"):
        gembed.load(foreign)


def test_encode_rows_are_file_lines_and_flags_are_checked_first(good_folder, tmp_path, capsys):
    texts = ["one\u0085still one", "two\u2028and\x0cmore", "three"]
    source = tmp_path / "in.txt"
    (tmp_path / "d.npy").mkdir()
    source.write_bytes(b"\xef\xbb\xbf" + "\n".join(texts[:2]).encode() + b"\r\n" + b"three\n")
    assert cli.main(["encode", f"--model={good_folder}", f"--input={source}",
                     f"--output={tmp_path / 'x'}"]) == 0
    assert f"to {tmp_path / 'x.npy'}" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(tmp_path / "x.npy"), gembed.load(good_folder).encode(texts),
                               atol=1e-6)
    for flag, expected in (("--batch_size=-1", "--batch_size=-1"),
                           (f"--output={tmp_path / 'missing' / 'x.npy'}", "does not exist"),
                           (f"--output={tmp_path / 'd.npy'}", "is a folder"),
                           ("--task=nosuchtask", "--task=nosuchtask")):
        argv = ["encode", f"--model={good_folder}", f"--input={source}",
                f"--output={tmp_path / 'y.npy'}", flag]
        assert expected in error_line(capsys, argv)
    assert not (tmp_path / "y.npy").exists()


@pytest.mark.parametrize("binding, expected", [
    ("BATCH_SIZE='16'", "BATCH_SIZE='16' must be an integer"),
    ("BATCH_SIZE=16.5", "BATCH_SIZE=16.5 must be an integer"),
    ("ModelConfig.output_sizes = [32,", "--gin_param="),
])
def test_mistyped_bindings_are_one_error_line(corpus, tmp_path, capsys, binding, expected):
    assert expected in error_line(capsys, train_args(corpus, tmp_path / "run", binding))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_eval_of_degenerate_inputs_is_one_error_line(good_folder, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "one.jsonl").write_text('{"query": "a b", "positive": "c d"}\n')
    for tasks, flag in ((f"pairs:{tmp_path / 'empty.jsonl'}", None),
                        (f"pairs:{tmp_path / 'one.jsonl'}", None), (f"pairs:{tmp_path}", None),
                        ("stdlib_code", "--dim=999")):
        argv = ["eval", f"--model={good_folder}", f"--tasks={tasks}"] + ([flag] if flag else [])
        error_line(capsys, argv)


@pytest.mark.slow   # a separate process: ~15 s of CPU, longer on a shared machine
def test_ctrl_c_during_saves_prints_one_line_and_keeps_whole_checkpoints(corpus, tmp_path):
    workdir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "gembed", *train_args(corpus, workdir, "TRAIN_STEPS=400",
                                                     "CHECKPOINT_EVERY=1", "LOG_EVERY=1")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300   # generous: under pytest -n 2 a cold compile shares 2 cores
    while time.time() < deadline and not (
            (workdir / "metrics.jsonl").exists() and len(metrics(workdir)) >= 6):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)   # every step saves: the Ctrl-C lands amid saves
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130
    assert stderr.strip().splitlines() == ["gembed: interrupted; checkpoints written so far are kept."]
    steps = [p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps and all(all_finite(raw_params(p)) for p in steps)


def test_sigterm_saves_the_step_reached_and_a_rerun_resumes_to_the_same_run(
        corpus, good_run, tmp_path, capsys, monkeypatch):
    """A preemption notice (SIGTERM, delivered to this process while step 6 is logged) saves step
    6, which is no CHECKPOINT_EVERY step, and exits 143 with one line; the rerun ends where the
    uninterrupted run did."""
    run = tmp_path / "run"
    write = train.MetricsWriter.write

    def write_then_sigterm(self, step, values):
        write(self, step, values)
        if step == 6:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(train.MetricsWriter, "write", write_then_sigterm)
    capsys.readouterr()
    assert cli.main(train_args(corpus, run)) == preemption.EXIT_CODE == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"gembed: stopped by SIGTERM after step 6; {run / 'checkpoints'}/6 is saved and rerunning "
        "the same command resumes from it.")
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [4, 6]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    monkeypatch.undo()
    assert cli.main(train_args(corpus, run)) == 0
    assert [m["step"] for m in metrics(run)] == [m["step"] for m in metrics(good_run)]
    resumed, uninterrupted = (raw_params(r / "checkpoints" / str(STEPS)) for r in (run, good_run))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 resumed, uninterrupted)


class _SaveWithCtrlC:
    """Stands in for orbax's main-thread part of a save, with `presses` Ctrl-Cs in its middle."""

    directory = "/nonexistent"   # no DELETING_DIR to empty

    def __init__(self, presses: int):
        self.presses, self.completed = presses, False

    def save(self, step, args):
        for _ in range(self.presses):
            signal.raise_signal(signal.SIGINT)
        self.completed = True


@pytest.mark.parametrize("presses, completed", [(1, True), (2, False)])
def test_ctrl_c_inside_a_save_waits_for_it_and_a_second_one_does_not(presses, completed):
    manager = _SaveWithCtrlC(presses)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(manager, 1, {name: {} for name in checkpoint.ITEMS})
    assert manager.completed is completed
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_old_steps_leave_by_one_rename_so_a_kill_never_leaves_part_of_one(tmp_path, monkeypatch):
    state = {"params": {"w": jax.numpy.ones(3)}, "opt_state": {"m": jax.numpy.zeros(3)},
             "loop": {"step": jax.numpy.int32(0)}}
    steps = tmp_path / "checkpoints"
    manager = checkpoint.open_manager(tmp_path, keep=1)
    with monkeypatch.context() as killed:   # the process dies before it empties .deleting
        killed.setattr(checkpoint, "_empty_deleting", lambda *args, **kwargs: None)
        for step in (1, 2):
            checkpoint.save(manager, step, state)
        manager.wait_until_finished()
    assert sorted(p.name for p in steps.iterdir()) == [checkpoint.DELETING_DIR, "2"]
    assert np.array_equal(raw_params(steps / checkpoint.DELETING_DIR / "1")["w"], np.ones(3))
    checkpoint.finish(checkpoint.open_manager(tmp_path, keep=1))   # the next run empties it
    assert sorted(p.name for p in steps.iterdir()) == ["2"]
