"""End-to-end `gembed train`: learning, exact resume after SIGKILL, 8 devices == 1 (FSDP, gradient
caching), 2 processes x 4 devices == 8 devices, user errors.

One uninterrupted in-process run is the reference for the others; every other run is a separate
process (a killed-and-resumed one, and one on 8 fake CPU devices).
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from gembed import cli
from gembed.data import load_builtin, train_sentencepiece, write_jsonl
from gembed.data.tokenizer_files import open_tokenizer
import gembed
from gembed.embedder import Embedder
from gembed.evaluation.pair_retrieval import evaluate_pairs
from gembed.model import init_params

STEPS = 160
SHORT_STEPS = 80   # the subprocess runs repeat the reference run's first 80 steps


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A JSONL of real stdlib (docstring, code) pairs, a held-out set, and a shared tokenizer."""
    root = tmp_path_factory.mktemp("corpus")
    train = load_builtin("stdlib_code", "train")[:2000]
    write_jsonl(root / "pairs.jsonl", train)
    train_sentencepiece([t for e in train for t in (e.query, e.positive)], 1000, root / "sp.model")
    return {"root": root, "pairs": root / "pairs.jsonl", "tokenizer": root / "sp.model",
            "heldout": load_builtin("stdlib_code", "test")[:256]}


def train_args(corpus, workdir, *extra_params):
    """The module's run. The learning rate is constant after warmup, so a run of fewer steps
    repeats the first steps of a longer one."""
    params = [f"TRAIN_DATA='{corpus['pairs']}'", f"TRAIN_STEPS={STEPS}", "BATCH_SIZE=64",
              "MAX_LENGTH=64", "LEARNING_RATE=1e-3", "CHECKPOINT_EVERY=20", "LOG_EVERY=5",
              "VOCAB_SIZE=1000", "TrainConfig.warmup_steps=10",
              "TrainConfig.end_learning_rate_fraction=1.0", f"TrainConfig.tokenizer='{corpus['tokenizer']}'", *extra_params]
    return (["train", "--gin_file=model/tiny.gin", "--gin_file=prefinetune.gin",
             f"--workdir={workdir}"] + [f"--gin_param={p}" for p in params])


def read_metrics(workdir) -> list[dict]:
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def run_gembed(args, env_extra=None, **popen_kwargs):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "gembed", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen_kwargs)


@pytest.fixture(scope="module")
def reference_run(corpus):
    """The uninterrupted run, through `python -m gembed` like the runs compared with it: in this
    process XLA may already have started without the flags the command sets (gembed.xla_cpu_flags),
    which changes float rounding."""
    workdir = corpus["root"] / "reference"
    process = run_gembed(train_args(corpus, workdir))
    _, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stderr
    return workdir


def test_loss_falls_temperature_moves_and_retrieval_improves(corpus, reference_run):
    metrics = read_metrics(reference_run)
    assert [m["step"] for m in metrics] == list(range(5, STEPS + 1, 5))
    for key in ("loss", "temperature", "learning_rate", "examples_per_second"):
        assert all(np.isfinite(m[key]) for m in metrics)
    losses = [m["loss"] for m in metrics]
    assert np.mean(losses[-4:]) < 0.85 * np.mean(losses[:4])
    assert abs(metrics[-1]["temperature"] - 0.05) > 1e-5  # tiny.gin: initial_temperature 0.05
    trained = gembed.load(reference_run)
    untrained = Embedder(trained.model_config, init_params(trained.model_config, jax.random.PRNGKey(0)),
                         trained.tokenizer, max_length=64)
    assert (evaluate_pairs(trained, corpus["heldout"])["mrr@10"]
            > evaluate_pairs(untrained, corpus["heldout"])["mrr@10"])
    assert "BATCH_SIZE = 64" in (reference_run / "config.gin").read_text()
    assert any((reference_run / "tb").iterdir())


@pytest.mark.slow
def test_sigkill_then_resume_repeats_the_uninterrupted_run_exactly(corpus, reference_run):
    """Killed after step 30 of 80, resumed from its last checkpoint: the 80 steps repeat the
    reference run's first 80 (params and data order)."""
    workdir = corpus["root"] / "killed"
    args = train_args(corpus, workdir, f"TRAIN_STEPS={SHORT_STEPS}")
    process = run_gembed(args)
    metrics_file = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if metrics_file.exists() and any(m["step"] >= 30 for m in read_metrics(workdir)):
            break
        time.sleep(0.2)
    assert process.poll() is None, "training ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert read_metrics(workdir)[-1]["step"] < SHORT_STEPS
    resumed = run_gembed(args)
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    fields = ("step", "loss", "temperature", "examples_digest", "steps_per_dataset")
    expected = [tuple(m[f] for f in fields) for m in read_metrics(reference_run)
                if m["step"] <= SHORT_STEPS]
    got = [tuple(m[f] for f in fields) for m in read_metrics(workdir)]
    assert got == expected


@pytest.fixture(scope="module")
def eight_device_run(corpus):
    """8 devices as 4 (data) x 2 (model), FSDP + tensor-parallel rules, gradient caching (chunks of 4)."""
    workdir = corpus["root"] / "eight_devices"
    args = train_args(corpus, workdir, f"TRAIN_STEPS={SHORT_STEPS}", "CHUNK_SIZE=4",
                      "ShardingConfig.model_parallelism=2")
    process = run_gembed(args + ["--gin_file=sharding/fsdp.gin"],
                         {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    return workdir


@pytest.mark.slow
def test_eight_devices_with_fsdp_and_gradient_caching_match_one_device(reference_run, eight_device_run):
    eight = np.array([m["loss"] for m in read_metrics(eight_device_run)])
    one = np.array([m["loss"] for m in read_metrics(reference_run)])[:len(eight)]
    assert len(eight) == SHORT_STEPS // 5
    np.testing.assert_allclose(eight, one, rtol=1e-5, atol=1e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(args):
    """`gembed train` as 2 processes x 4 CPU devices over 127.0.0.1 (jax.distributed, gloo)."""
    address = f"127.0.0.1:{free_port()}"
    processes = [run_gembed(args + [f"--coordinator_address={address}", "--num_processes=2",
                                    f"--process_id={index}"],
                            {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
                 for index in range(2)]
    deadline = time.time() + 600
    while time.time() < deadline and any(p.poll() is None for p in processes):
        if any(p.poll() not in (None, 0) for p in processes):   # one failed: do not wait on the other
            break
        time.sleep(0.5)
    for process in processes:
        if process.poll() is None:
            process.kill()
        _, stderr = process.communicate()
        assert process.returncode == 0, stderr[-5000:]


@pytest.mark.slow
def test_two_hosts_of_four_devices_match_eight_devices_and_resume(corpus, eight_device_run):
    """30 steps, pure data parallel over 2 processes, equal the 1-process FSDP run on 8 devices;
    both processes then resume from a checkpoint they wrote together and repeat the run exactly."""
    workdir = corpus["root"] / "two_hosts"
    args = train_args(corpus, workdir, "TRAIN_STEPS=30")
    run_two_processes(args)
    first = read_metrics(workdir)
    np.testing.assert_allclose([m["loss"] for m in first],
                               [m["loss"] for m in read_metrics(eight_device_run)[:len(first)]],
                               rtol=1e-5, atol=1e-5)
    checkpoints = workdir / "checkpoints"
    assert sorted(int(p.name) for p in checkpoints.iterdir()) == [20, 30]
    shutil.rmtree(checkpoints / "30")
    run_two_processes(args)
    assert without_timing(read_metrics(workdir)) == without_timing(first)


def without_timing(metrics: list[dict]) -> list[dict]:
    timing = ("examples_per_second", "model_flops_per_second", "mfu", "compiled_shapes")
    return [{k: v for k, v in m.items() if k not in timing} for m in metrics]


def test_logged_model_flops_are_those_of_the_texts_trained_on(corpus, reference_run):
    """160 steps x 64 pairs is ~5 passes over the 2,000 pairs, so the logged model FLOPs per
    example average to the corpus mean, computed here from the tiny model's shapes: per text
    of n tokens, 3 (forward + backward) x 2 FLOPs per multiply-add x (layers x (4 D^2 + 2 D F) x n
    + layers x 2 D n^2 attention + D x projection)."""
    config = json.loads((reference_run / "model_config.json").read_text())
    layers, width, mlp = config["num_layers"], config["hidden_size"], config["mlp_dim"]
    tokenizer = open_tokenizer(reference_run)
    pairs = [json.loads(line) for line in corpus["pairs"].read_text().splitlines()]
    lengths = np.array([len(ids) for ids in tokenizer.encode(
        [t for pair in pairs for t in (pair["query"], pair["positive"])], 64)], np.float64)
    per_text = 6 * (layers * (4 * width**2 + 2 * width * mlp) * lengths
                    + layers * 2 * width * lengths**2 + width * config["projection_dim"])
    expected_per_example = 2 * per_text.mean()
    logged = [m["model_flops_per_second"] / m["examples_per_second"] for m in read_metrics(reference_run)]
    np.testing.assert_allclose(np.mean(logged), expected_per_example, rtol=0.03)


def test_padded_training_repeats_the_packed_run(corpus, reference_run, tmp_path):
    """The reference run packs its texts into 64-token rows (the default); the same run with
    TrainConfig.packing=False pads them instead: its first 20 steps give the same losses."""
    args = train_args(corpus, tmp_path / "padded", "TrainConfig.packing=False", "TRAIN_STEPS=20")
    assert cli.main(args) == 0
    padded = [m["loss"] for m in read_metrics(tmp_path / "padded")]
    packed = [m["loss"] for m in read_metrics(reference_run)][:len(padded)]
    assert len(padded) == 4
    np.testing.assert_allclose(padded, packed, rtol=1e-4)


def test_finetune_inits_from_the_prefinetune_checkpoint(corpus, reference_run, tmp_path):
    args = train_args(corpus, tmp_path / "finetune", "TRAIN_STEPS=5",
                      f"INIT_FROM='{reference_run}'")
    args[2] = "--gin_file=finetune.gin"
    assert cli.main(args) == 0
    first_loss = read_metrics(tmp_path / "finetune")[0]["loss"]
    scratch_first_loss = read_metrics(reference_run)[0]["loss"]
    assert first_loss < scratch_first_loss


def test_finetune_from_a_checkpoint_needs_no_model_gin_file(corpus, reference_run, tmp_path):
    """INIT_FROM=CKPT fixes the architecture, as a model folder does: no model gin file, and a
    binding that contradicts the checkpoint is an error."""
    workdir = tmp_path / "bare"
    params = [f"TRAIN_DATA='{corpus['pairs']}'", "TRAIN_STEPS=2", "BATCH_SIZE=8", "MAX_LENGTH=32",
              f"INIT_FROM='{reference_run}'"]
    args = ["train", "--gin_file=finetune.gin", f"--workdir={workdir}",
            *[f"--gin_param={p}" for p in params]]
    assert cli.main(args) == 0
    assert (json.loads((workdir / "model_config.json").read_text())
            == json.loads((reference_run / "model_config.json").read_text()))
    assert cli.main(args[:2] + [f"--workdir={tmp_path / 'contradicts'}", *args[3:],
                                "--gin_param=ModelConfig.num_layers=3"]) == 2


def error_line(capsys, args) -> str:
    capsys.readouterr()
    assert cli.main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gembed: error: "), lines
    return lines[0]


@pytest.mark.parametrize("content, expected", [
    (b'{"query": "a b", "positive": "c d"}\n{"query": "x", \n', "bad.jsonl:2"),
    (b'{"query": "a b", "positive": ""}\n', "bad.jsonl:1"),
    (b'{"query": "a b", "positive": "caf\xe9"}\n', "bad.jsonl:1"),
    (b'{"query": "a b", "positive": "c"}\n{"positive": "c"}\n', "bad.jsonl:2"),
    (b'{"query": "a b", "positive": "' + b"long " * 30_000 + b'"}\n', "max_text_chars=100000"),
])
def test_bad_data_exits_2_naming_file_and_line(corpus, reference_run, tmp_path, capsys,
                                               content, expected):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    line = error_line(capsys, train_args(corpus, reference_run, f"TRAIN_DATA='{bad}'"))
    assert expected in line
    assert gembed.load(reference_run).params is not None


def test_skip_bad_examples_counts_them(corpus, tmp_path):
    data = tmp_path / "mixed.jsonl"
    good = (corpus["pairs"]).read_bytes().splitlines()[:100]
    bad = [b'{"query": "x", ', b'{"query": "a"}', b'{"query": "a", "positive": " "}',
           b'{"query": "caf\xe9", "positive": "b"}',
           b'{"query": "a", "positive": "' + b"long " * 30_000 + b'"}']
    data.write_bytes(b"\n".join(good[:50] + bad + good[50:]) + b"\n")
    args = train_args(corpus, tmp_path / "run", f"TRAIN_DATA='{data}'", "TRAIN_STEPS=2",
                      "LOG_EVERY=1", "BATCH_SIZE=16", "TrainConfig.skip_bad_examples=True")
    assert cli.main(args) == 0
    assert [m["skipped_examples"] for m in read_metrics(tmp_path / "run")] == [5, 5]


def test_unknown_gin_binding_and_missing_init_from_exit_2(corpus, reference_run, tmp_path, capsys):
    line = error_line(capsys, train_args(corpus, tmp_path / "a", "TrainConfig.batch_sise=4"))
    assert "batch_sise" in line
    line = error_line(capsys, train_args(corpus, tmp_path / "b", "BATCH_SZE=4"))
    assert "BATCH_SZE" in line
    line = error_line(capsys, train_args(corpus, tmp_path / "c", "INIT_FROM='/nonexistent/run'"))
    assert "/nonexistent/run" in line and "INIT_FROM" in line
    line = error_line(capsys, ["train", "--gin_file=model/tiny.gin", "--gin_file=finetune.gin",
                               f"--workdir={tmp_path / 'd'}"])
    assert "INIT_FROM is required" in line
    line = error_line(capsys, train_args(corpus, tmp_path / "e", "ModelConfig.pooling='maen'"))
    assert "ModelConfig.pooling='maen'" in line
    line = error_line(capsys, ["train", "--gin_file=no_such.gin", f"--workdir={tmp_path}"])
    assert "no_such.gin" in line
    assert gembed.load(reference_run).params is not None
