"""`gembed run`, `gembed soup`, `gembed export` and `gembed encode` on tiny trained checkpoints.

One miniature recipe run (model/tiny.gin: a 2-step prefinetune, two 3-step finetunes with seeds 0
and 1 sharing one tokenizer) is checked itself and gives the ingredients of every other test;
soups and exports are checked against NumPy reads of the checkpoints' params.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil

import gin
import jax
import numpy as np
import pytest

import gembed
from gembed import checkpoint, cli, teacher_cache
from gembed.data import load_builtin, train_sentencepiece, write_jsonl
from gembed.errors import GembedUserError
from gembed.evaluation import tasks
from gembed.model import ModelConfig, init_params
from gembed.model_folder import read_weights
from gembed.recipe import train_stage
from gembed.soup import flat_params

TEXTS = ["Return the sum of a and b.", "def add(a, b): return a + b",
         "Open a file for reading.", "x", "Split a string on whitespace and strip each part."]


RECIPE = """
Recipe.model_gin_files = ['model/tiny.gin']
Recipe.prefinetune_gin_files = ['prefinetune.gin']
Recipe.prefinetune_params = {prefinetune}
Recipe.mining = @Mining()
Mining.data = '{pairs}'
Mining.num_negatives = 1
Mining.range_max = 10
Mining.max_length = 16
Mining.relative_margin = None
Recipe.finetune_gin_files = ['finetune_mixture.gin']
Recipe.finetune_params = {finetune}
Recipe.finetune_runs = {{'a': ['SEED=0'], 'b': ['SEED=1']}}
Recipe.soup_method = 'greedy'
Recipe.soup_task = 'stdlib_code:validation'
Recipe.eval_tasks = ['stdlib_code:validation', 'stdlib_code']
Recipe.eval_max_length = 16
"""


def stage_params(corpus, data: bool = True) -> list[str]:
    return [*([f"TRAIN_DATA='{corpus['pairs']}'"] if data else []), "MAX_LENGTH=16",
            "CHECKPOINT_EVERY=3", "LOG_EVERY=1", "VOCAB_SIZE=1000", "TrainConfig.warmup_steps=1",
            f"TrainConfig.tokenizer='{corpus['tokenizer']}'"]


def train_args(corpus, workdir, *extra_params):
    params = [*stage_params(corpus), "TRAIN_STEPS=3", "BATCH_SIZE=8", *extra_params]
    return (["train", "--gin_file=model/tiny.gin", "--gin_file=prefinetune.gin",
             f"--workdir={workdir}"] + [f"--gin_param={p}" for p in params])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A miniature `gembed run` on 200 stdlib pairs: its finetune runs A (seed 0) and B (seed 1)
    are the ingredients of the other tests; C: A's workdir with a params-only checkpoint of
    another ModelConfig (mlp_dim 128)."""
    root = tmp_path_factory.mktemp("soup")
    pairs = load_builtin("stdlib_code", "train")[:200]
    write_jsonl(root / "pairs.jsonl", pairs)
    train_sentencepiece([t for e in pairs for t in (e.query, e.positive)], 1000, root / "sp.model")
    corpus = {"root": root, "pairs": root / "pairs.jsonl", "tokenizer": root / "sp.model"}
    (root / "recipe.gin").write_text(RECIPE.format(
        pairs=corpus["pairs"],
        prefinetune=stage_params(corpus) + ["TRAIN_STEPS=2", "BATCH_SIZE=16"],
        finetune=stage_params(corpus, data=False) + ["TRAIN_STEPS=3", "BATCH_SIZE=8",
                                                     "LEARNING_RATE=1e-3"]))
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        assert cli.main(["run", f"--gin_file={root / 'recipe.gin'}", f"--workdir={root / 'run'}"]) == 0
    corpus["table"], corpus["log"] = stdout.getvalue(), stderr.getvalue()
    corpus["a"], corpus["b"] = root / "run" / "a", root / "run" / "b"
    corpus["c"] = root / "c"
    corpus["c"].mkdir()
    for item in ("tokenizer.model", "task_prompts.json", "embedder.json"):
        shutil.copyfile(corpus["a"] / item, corpus["c"] / item)
    fields = {**json.loads((corpus["a"] / "model_config.json").read_text()), "mlp_dim": 128}
    (corpus["c"] / "model_config.json").write_text(json.dumps(fields))
    checkpoint.save_params(corpus["c"], 3, init_params(ModelConfig.from_dict(fields),
                                                       jax.random.PRNGKey(0)))
    return corpus


def checkpoint_params(workdir) -> dict[str, np.ndarray]:
    return flat_params(gembed.load(workdir).params)


def error_line(capsys, args) -> str:
    capsys.readouterr()
    assert cli.main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gembed: error: "), lines
    return lines[0]


def test_soup_of_two_is_their_mean_and_of_one_is_itself(corpus, tmp_path):
    a, b = checkpoint_params(corpus["a"]), checkpoint_params(corpus["b"])
    assert cli.main(["soup", f"--output={tmp_path / 'ab'}", str(corpus["a"]),
                     str(corpus["b"] / "checkpoints" / "3")]) == 0
    assert cli.main(["export", f"--checkpoint={tmp_path / 'ab'}", f"--output={tmp_path / 'ab_model'}"]) == 0
    exported = read_weights(tmp_path / "ab_model" / "model.safetensors")
    assert exported.keys() == a.keys() and "log_scale" in exported
    for name in a:   # the float64 mean, rounded once to float32
        expected = ((a[name].astype(np.float64) + b[name]) / 2).astype(np.float32)
        np.testing.assert_array_equal(exported[name], expected)

    assert cli.main(["soup", f"--output={tmp_path / 'a'}", str(corpus["a"])]) == 0
    single = checkpoint_params(tmp_path / "a")
    assert all(np.array_equal(single[n], a[n]) for n in a)
    record = json.loads((tmp_path / "ab" / "soup.json").read_text())
    assert record["method"] == "uniform" and len(record["kept"]) == 2


def test_soup_is_a_checkpoint_train_inits_from(corpus, tmp_path):
    assert cli.main(["soup", f"--output={tmp_path / 'ab'}", str(corpus["a"]), str(corpus["b"])]) == 0
    assert cli.main(train_args(corpus, tmp_path / "ft", "TRAIN_STEPS=1",
                               f"INIT_FROM='{tmp_path / 'ab'}'")) == 0
    gin.clear_config()
    assert (tmp_path / "ft" / "tokenizer.model").read_bytes() == corpus["tokenizer"].read_bytes()


def test_greedy_soup_keeps_the_best_ingredient_first(corpus, tmp_path):
    assert cli.main(["soup", f"--output={tmp_path / 'g'}", "--method=greedy",
                     "--eval_task=stdlib_code", str(corpus["a"]), str(corpus["b"])]) == 0
    record = json.loads((tmp_path / "g" / "soup.json").read_text())
    scores = {i["checkpoint"]: i["score"] for i in record["ingredients"]}
    assert record["kept"][0] == max(scores, key=scores.get)
    assert record["score"] >= max(scores.values())
    # the recorded score is the one the choice was made on; the written soup, loaded, scores it
    loaded = tasks.evaluate(gembed.load(tmp_path / "g"), ["stdlib_code"], log=lambda _: None)
    assert loaded["stdlib_code"]["main_score"] == pytest.approx(record["score"], abs=1e-4)


def test_mismatched_soups_exit_2_naming_param_or_tokenizer(corpus, tmp_path, capsys):
    line = error_line(capsys, ["soup", f"--output={tmp_path / 'ac'}", str(corpus["a"]),
                               str(corpus["c"])])
    assert "mlp" in line and str(corpus["a"]) in line and str(corpus["c"]) in line
    other = tmp_path / "other_tokenizer"
    other.mkdir()
    for item in corpus["b"].iterdir():
        (other / item.name).symlink_to(item)
    (other / "tokenizer.model").unlink()
    (other / "tokenizer.model").write_bytes(corpus["tokenizer"].read_bytes() + b"x")
    line = error_line(capsys, ["soup", f"--output={tmp_path / 'ax'}", str(corpus["a"]), str(other)])
    assert "tokenizer" in line and str(other) in line


def test_export_embeds_like_the_training_encoder_in_float32_and_bfloat16(corpus, tmp_path):
    reference = gembed.load(corpus["a"]).encode(TEXTS)
    assert cli.main(["export", f"--checkpoint={corpus['a']}", f"--output={tmp_path / 'f32'}"]) == 0
    model = gembed.load(tmp_path / "f32")
    assert model.max_length == 16
    np.testing.assert_allclose(model.encode(TEXTS), reference, atol=1e-6, rtol=0)
    assert cli.main(["export", f"--checkpoint={corpus['a']}", f"--output={tmp_path / 'bf16'}",
                     "--dtype=bfloat16"]) == 0
    half = gembed.load(tmp_path / "bf16")
    weights = read_weights(tmp_path / "bf16" / "model.safetensors")
    full = checkpoint_params(corpus["a"])
    for name, value in weights.items():   # bfloat16 keeps 8 significant bits
        np.testing.assert_allclose(value, full[name], rtol=2 ** -8, atol=0)
    assert (tmp_path / "bf16" / "model.safetensors").stat().st_size < 0.6 * (
        tmp_path / "f32" / "model.safetensors").stat().st_size
    np.testing.assert_allclose(half.encode(TEXTS), reference, atol=0.02, rtol=0)
    assert cli.main(["export", f"--checkpoint={corpus['a']}", f"--output={tmp_path / 'long'}",
                     "--max_length=32"]) == 0
    assert gembed.load(tmp_path / "long").max_length == 32


def test_encode_writes_the_embeddings_of_each_line(corpus, tmp_path):
    assert cli.main(["export", f"--checkpoint={corpus['a']}", f"--output={tmp_path / 'm'}"]) == 0
    model = gembed.load(tmp_path / "m")
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    assert cli.main(["encode", f"--model={tmp_path / 'm'}", f"--input={tmp_path / 'texts.txt'}",
                     f"--output={tmp_path / 'full.npy'}"]) == 0
    full = np.load(tmp_path / "full.npy")
    assert full.shape == (len(TEXTS), 64) and full.dtype == np.float32
    np.testing.assert_array_equal(full, model.encode(TEXTS))
    assert cli.main(["encode", f"--model={tmp_path / 'm'}", f"--input={tmp_path / 'texts.jsonl'}",
                     f"--output={tmp_path / 'short.npy'}", "--dim=32"]) == 0
    short = np.load(tmp_path / "short.npy")
    prefix = full[:, :32]
    expected = prefix / np.linalg.norm(prefix, axis=1, keepdims=True)
    assert short.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(short, expected, atol=1e-6)


def test_recipe_runs_every_stage_then_skips_them_and_prints_the_table(corpus, capsys):
    run = corpus["root"] / "run"
    stages = ["prefinetune", "mining", "a", "b", "soup_uniform", "soup_greedy", "model", "eval"]
    assert all((run / "stages" / f"{stage}.json").is_file() for stage in stages)
    mined = [json.loads(line) for line in (run / "mining" / "mined.jsonl").read_text().splitlines()]
    negatives = [example.get("negatives", []) for example in mined]
    assert len(mined) == 200 and sum(map(len, negatives)) > 100
    assert all(example["positive"] not in found for example, found in zip(mined, negatives))
    assert str(run / "mining" / "mined.jsonl") in (run / "a" / "config.gin").read_text()
    results = json.loads((run / "eval" / "results.json").read_text())
    rows = ["bm25", "prefinetune", "a", "b", "soup_uniform", "soup_greedy -> model"]
    assert list(results) == rows
    for row in rows:
        for task in ("stdlib_code:validation", "stdlib_code"):
            assert f"{results[row][task]['main_score']:.2f}" in corpus["table"]
    greedy = json.loads((run / "soup_greedy" / "soup.json").read_text())
    assert greedy["eval_task"] == "stdlib_code:validation" and greedy["max_length"] == 16
    for row in ("a", "b"):   # taken from the greedy soup's scoring: as the run, loaded, scores
        model = teacher_cache.load_model(str(run / row))
        model.max_length = 16
        fresh = tasks.evaluate(model, ["stdlib_code:validation"], log=lambda _: None)
        reused, again = (dict(scores, seconds=None) for scores in (
            results[row]["stdlib_code:validation"], fresh["stdlib_code:validation"]))
        assert reused == again   # every metric bitwise; only the timing differs
        assert f"eval: {row} (stdlib_code:validation: scored by soup_greedy)" in corpus["log"]
    assert results["soup_greedy -> model"]["stdlib_code:validation"]["main_score"] == pytest.approx(
        greedy["score"], abs=1e-4)
    assert json.loads((run / "soup_uniform" / "soup.json").read_text())["kept"] == [
        str(run / "a" / "checkpoints" / "3"), str(run / "b" / "checkpoints" / "3")]
    finished = {stage: (run / "stages" / f"{stage}.json").stat().st_mtime_ns for stage in stages}
    capsys.readouterr()
    assert cli.main(["run", f"--gin_file={corpus['root'] / 'recipe.gin'}", f"--workdir={run}"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == corpus["table"].strip()
    assert err.count("complete, skipped") == len(stages)
    assert finished == {stage: (run / "stages" / f"{stage}.json").stat().st_mtime_ns for stage in stages}
    changed = "--gin_param=Recipe.finetune_runs={'a': ['SEED=5'], 'b': ['SEED=1']}"
    assert cli.main(["run", f"--gin_file={corpus['root'] / 'recipe.gin'}", f"--workdir={run}",
                     changed]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]   # after the prefinetune "skipped"
    assert line.startswith("gembed: error: ") and "another configuration" in line
    assert str(run / "stages" / "a.json") in line and f"delete {run / 'a'}" in line


def test_train_stage_clears_the_gin_config_after_a_stage_it_refused(tmp_path):
    with pytest.raises(GembedUserError, match="BATCH_SZE"):
        train_stage(tmp_path, ["model/tiny.gin", "prefinetune.gin"], ["BATCH_SZE=8"])
    assert gin.config_str() == ""


@pytest.mark.slow
def test_distill_recipe_caches_teacher_vectors_and_tabulates_teacher_bm25_and_speed(corpus, capsys):
    """A miniature distill recipe (teacher: finetune run A): the teacher_vectors stage fills the
    cache once, both students train against it, and the table has the teacher, BM25 and speed."""
    root = corpus["root"]
    params = stage_params(corpus, data=False) + ["TRAIN_STEPS=2", "BATCH_SIZE=8",
                                                 "LossConfig.embedding_matching_weight=1.0",
                                                 "LossConfig.score_distillation_weight=0.5",
                                                 "LossConfig.spread_out_weight=0.1"]
    (root / "distill.gin").write_text(RECIPE.format(
        pairs=corpus["pairs"], prefinetune=stage_params(corpus) + ["TRAIN_STEPS=1", "BATCH_SIZE=8"],
        finetune=params) + f"Recipe.teacher = '{corpus['a']}'\nRecipe.speed_texts = 16\n")
    run = root / "distill_run"
    capsys.readouterr()
    assert cli.main(["run", f"--gin_file={root / 'distill.gin'}", f"--workdir={run}"]) == 0
    assert "sentences/s" in capsys.readouterr().out.splitlines()[0]
    results = json.loads((run / "eval" / "results.json").read_text())
    teacher = f"teacher ({corpus['a']})"
    assert list(results)[:2] == ["bm25", teacher]
    assert "sentences/s" not in results["bm25"] and results[teacher]["sentences/s"]["main_score"] > 0
    shards = sorted((run / "teacher_vectors").glob("vectors-*.safetensors"))
    assert shards
    logged = [json.loads(line) for line in (run / "a" / "metrics.jsonl").read_text().splitlines()]
    assert {"embedding_matching", "score_distillation", "spread_out"} <= logged[-1].keys()
    assert cli.main(["run", f"--gin_file={root / 'distill.gin'}", f"--workdir={run}"]) == 0
    assert sorted((run / "teacher_vectors").glob("vectors-*.safetensors")) == shards
