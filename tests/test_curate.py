"""`gembed curate`: each stage end to end on built-in stdlib pairs with a tiny random decoder.

Outputs are read back as training data; scores are checked against formulas computed here from
the LLM's log-probabilities (whose parity with transformers tests/test_generation.py shows);
RRF against a hand-computed case; a run killed with SIGKILL and resumed writes the files of an
uninterrupted run, byte for byte.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import safetensors.numpy
import scipy.special

import gembed
from curate_fixtures import write_tiny_llama
from gembed import cli
from gembed.curate import filter_pairs, llm_negatives, load_prompts, synthesize
from gembed.curate.fusion import reciprocal_rank_fusion
from gembed.curate.judge import grade_token_ids, relevance_scores
from gembed.curate.negatives import lowest_fused, neighbour_candidates
from gembed.curate.synthesize import first_line
from gembed.data import load_builtin, read_jsonl, train_sentencepiece, write_jsonl
from gembed.data.tokenizer import SentencePieceTokenizer
from gembed.llm import load_language_model
from gembed.model import ModelConfig, init_params
from gembed.model_folder import write_model_folder
from gembed.recipe import MINED_FILE, Mining, Recipe, Runner

TEXT_TOKENS = 24   # --max_text_tokens: short prompts keep the tests fast


@pytest.fixture(scope="module")
def pairs():
    return load_builtin("stdlib_code", "test")


@pytest.fixture(scope="module")
def llm_folder(pairs, tmp_path_factory):
    texts = [t for e in pairs for t in (e.query, e.positive)]
    return write_tiny_llama(tmp_path_factory.mktemp("llm") / "tiny", texts)


@pytest.fixture(scope="module")
def llm(llm_folder):
    return load_language_model(str(llm_folder), batch_size=8)


@pytest.fixture(scope="module")
def embedder_folder(pairs, tmp_path_factory):
    root = tmp_path_factory.mktemp("embedder")
    train_sentencepiece([t for e in pairs for t in (e.query, e.positive)], 400, root / "sp.model")
    config = ModelConfig(vocab_size=400, hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64,
                         max_position_embeddings=64)
    return write_model_folder(root / "model", config, init_params(config, jax.random.PRNGKey(0)),
                              SentencePieceTokenizer(root / "sp.model"), max_length=64)


def read_scores(output: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in output.with_suffix(".scores.jsonl").read_text().splitlines()]


def expected_grades(llm, queries, passages) -> np.ndarray:
    """Expected grade / 3 under the renormalised next-token probabilities of "0".."3"."""
    prompts = load_prompts()
    texts = [prompts.relevance.format(query=q, passage=p) for q, p in zip(queries, passages)]
    log_probs = llm.next_token_log_probs(texts, grade_token_ids(llm, "0123"))
    probabilities = np.exp(log_probs - scipy.special.logsumexp(log_probs, axis=1, keepdims=True))
    return probabilities @ np.arange(4) / 3


def test_filter_keeps_exactly_the_pairs_scoring_at_least_the_threshold(llm, pairs, tmp_path):
    examples = pairs[:16]
    cut = lambda text: llm.truncate(text, TEXT_TOKENS)  # noqa: E731
    reference = expected_grades(llm, [cut(e.query) for e in examples],
                                [cut(e.positive) for e in examples])
    threshold = float(np.median(reference))
    counts = filter_pairs(llm, examples, tmp_path / "kept.jsonl", min_score=threshold,
                          max_text_tokens=TEXT_TOKENS, chunk_size=6)
    kept = [e for e, score in zip(examples, reference) if score >= threshold]
    assert 0 < len(kept) < len(examples)
    assert read_jsonl(tmp_path / "kept.jsonl") == kept
    assert counts == {"examples": 16, "kept": len(kept), "dropped": 16 - len(kept)}
    records = read_scores(tmp_path / "kept.jsonl")
    assert [r["index"] for r in records] == list(range(16))
    np.testing.assert_allclose([r["score"] for r in records], reference, rtol=1e-5)
    progress = json.loads((tmp_path / "kept.progress.json").read_text())
    assert progress["complete"] and progress["done"] == 16 and progress["counts"] == counts


@pytest.mark.slow
def test_synthesize_writes_rated_generated_queries_for_each_passage(llm, pairs, tmp_path):
    passages = [e.positive for e in pairs[:12]]
    output = tmp_path / "synthetic.jsonl"
    counts = synthesize(llm, passages, output, shots=pairs[12:40], num_shots=2, max_new_tokens=12,
                        temperature=0.9, top_p=0.9, seed=3, min_score=0.5,
                        max_text_tokens=TEXT_TOKENS, task="code", chunk_size=5)
    records = read_scores(output)
    assert [r["index"] for r in records] == list(range(12))
    kept = [r for r in records if r["kept"]]
    assert read_jsonl(output) == [
        type(pairs[0])(query=r["query"], positive=passages[r["index"]], task="code") for r in kept]
    rated = [r for r in records if r["query"]]
    np.testing.assert_allclose(
        [r["score"] for r in rated],
        expected_grades(llm, [r["query"] for r in rated],
                        [llm.truncate(passages[r["index"]], TEXT_TOKENS) for r in rated]), rtol=1e-5)
    assert all(r["kept"] == (r["score"] is not None and r["score"] >= 0.5) for r in records)
    assert counts["passages"] == 12 and counts["kept"] == len(kept)
    assert counts["generated"] + counts["dropped_empty"] == 12
    # The same seed draws the same queries whatever the chunking.
    again = tmp_path / "again.jsonl"
    synthesize(llm, passages, again, shots=pairs[12:40], num_shots=2, max_new_tokens=12,
               temperature=0.9, top_p=0.9, seed=3, min_score=0.5, max_text_tokens=TEXT_TOKENS,
               task="code", chunk_size=12)
    assert [r["query"] for r in read_scores(again)] == [r["query"] for r in records]


def test_first_line_takes_the_query_out_of_a_chatty_answer():
    assert first_line('\n  Query: "sort a list in place"\nBecause ...') == "sort a list in place"
    assert first_line("   \n") == ""


@pytest.mark.slow   # ranx's numba compilation: ~40 s on a loaded 2-core CPU
def test_rrf_equals_a_hand_computed_case():
    relevance = {"q": {"a": 0.9, "b": 0.5, "c": 0.1}}      # ranks a 1, b 2, c 3
    likelihood = {"q": {"a": -3.0, "b": -1.0, "c": -2.0}}  # ranks b 1, c 2, a 3
    fused = reciprocal_rank_fusion([relevance, likelihood], k=60)
    expected = {"a": 1 / 61 + 1 / 63, "b": 1 / 62 + 1 / 61, "c": 1 / 63 + 1 / 62}
    assert fused.keys() == {"q"}
    assert fused["q"] == pytest.approx(expected, abs=1e-12)
    ids = {"a": "0", "b": "1", "c": "2"}
    assert lowest_fused({ids[d]: s for d, s in fused["q"].items()}, 2) == [2, 0]   # c, then a


def numpy_rrf(candidates: list[dict], k: int) -> np.ndarray:
    fused = np.zeros(len(candidates))
    for key in ("relevance", "query_likelihood"):
        order = np.argsort([-c[key] for c in candidates], kind="stable")
        fused[order] += 1 / (k + 1 + np.arange(len(candidates)))
    return fused


@pytest.mark.slow
def test_negatives_cli_on_stdlib_pairs(llm_folder, embedder_folder, pairs, tmp_path):
    examples = pairs[:10]
    write_jsonl(tmp_path / "pairs.jsonl", examples)
    output = tmp_path / "negatives.jsonl"
    assert cli.main(["curate", "negatives", f"--llm={llm_folder}", f"--model={embedder_folder}",
                     f"--input={tmp_path / 'pairs.jsonl'}", f"--output={output}",
                     "--candidates=4", "--num_negatives=2", f"--max_text_tokens={TEXT_TOKENS}",
                     "--chunk_size=4", "--rrf_k=60"]) == 0
    mined = read_jsonl(output)
    assert [(e.query, e.positive) for e in mined] == [(e.query, e.positive) for e in examples]
    candidates = neighbour_candidates(gembed.load(embedder_folder), examples, 4)
    for example, records, expected in zip(mined, read_scores(output), candidates):
        assert example.positive not in example.negatives
        assert len(example.negatives) == 2 == len(set(example.negatives))
        assert [c["text"] for c in records["candidates"]] == expected
        fused = numpy_rrf(records["candidates"], 60)
        np.testing.assert_allclose([c["rrf"] for c in records["candidates"]], fused, rtol=1e-12)
        lowest = np.argsort(fused, kind="stable")[:2]
        assert example.negatives == tuple(expected[i] for i in lowest)
        assert [c["negative"] for c in records["candidates"]] == [i in lowest for i in range(4)]


@pytest.mark.slow   # RRF: ranx's numba compilation
def test_negatives_scores_are_the_judges(llm, pairs, tmp_path):
    """Relevance from the grade tokens, query likelihood = mean log p(query | passage prompt)."""
    class Fixed:   # the embedder: each query's neighbours in a fixed order
        def encode(self, texts, task=None, batch_size=64, show_progress=False):
            return np.eye(8, dtype=np.float32)[[hash(t) % 8 for t in texts]]

    examples = pairs[:3]
    llm_negatives(llm, Fixed(), examples, tmp_path / "n.jsonl", num_candidates=3,
                  num_negatives=1, max_text_tokens=TEXT_TOKENS)
    prompts = load_prompts()
    for example, record in zip(examples, read_scores(tmp_path / "n.jsonl")):
        texts = [llm.truncate(c["text"], TEXT_TOKENS) for c in record["candidates"]]
        query = llm.truncate(example.query, TEXT_TOKENS)
        scores, _ = relevance_scores(llm, prompts, grade_token_ids(llm, "0123"),
                                     [query] * len(texts), texts)
        np.testing.assert_allclose([c["relevance"] for c in record["candidates"]], scores)
        log_probs = llm.continuation_log_probs_of_ids(
            llm.prompt_ids([prompts.query_likelihood.format(passage=t) for t in texts]),
            llm.text_ids([query] * len(texts)))
        np.testing.assert_allclose([c["query_likelihood"] for c in record["candidates"]],
                                   [np.mean(row) for row in log_probs], rtol=1e-6)


def synthesize_args(llm_folder, data, output) -> list[str]:
    return ["curate", "synthesize", f"--llm={llm_folder}", f"--input={data}", f"--output={output}",
            "--chunk_size=2", "--batch_size=2", "--max_new_tokens=8", "--num_shots=1",
            f"--max_text_tokens={TEXT_TOKENS}", "--seed=7"]


def start_gembed(args: list[str]) -> subprocess.Popen:
    """`python -m gembed ARGS` with this checkout's package (every run of the comparison in a
    process of its own, so all run with the same XLA flags)."""
    return subprocess.Popen([sys.executable, "-m", "gembed", *args],
                            env={**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parents[1])},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(process: subprocess.Popen) -> None:
    _, stderr = process.communicate()
    assert process.returncode == 0, stderr.decode()[-3000:]


@pytest.mark.slow
def test_resume_after_sigkill_writes_the_uninterrupted_files(llm_folder, pairs, tmp_path):
    write_jsonl(tmp_path / "pairs.jsonl", pairs[:24])
    reference = tmp_path / "reference.jsonl"
    finish(start_gembed(synthesize_args(llm_folder, tmp_path / "pairs.jsonl", reference)))

    output = tmp_path / "killed.jsonl"
    progress = output.with_suffix(".progress.json")
    process = start_gembed(synthesize_args(llm_folder, tmp_path / "pairs.jsonl", output))
    record = {}
    while process.poll() is None and record.get("done", 0) < 4:
        time.sleep(0.01)
        if progress.is_file():
            try:
                record = json.loads(progress.read_text())
            except json.JSONDecodeError:   # read while being replaced
                pass
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-3000:]
    record = json.loads(progress.read_text())
    assert 0 < record["done"] < 24 and not record["complete"]
    for path in (output, output.with_suffix(".scores.jsonl")):   # a torn write after the commit
        with open(path, "ab") as file:
            file.write(b'{"query": "half a li')

    finish(start_gembed(synthesize_args(llm_folder, tmp_path / "pairs.jsonl", output)))
    assert output.read_bytes() == reference.read_bytes()
    assert (output.with_suffix(".scores.jsonl").read_bytes()
            == reference.with_suffix(".scores.jsonl").read_bytes())
    assert json.loads(progress.read_text())["counts"] == json.loads(
        reference.with_suffix(".progress.json").read_text())["counts"]


def test_resume_with_other_settings_and_foreign_outputs_are_refused(llm_folder, pairs, tmp_path,
                                                                    capsys):
    write_jsonl(tmp_path / "pairs.jsonl", pairs[:2])
    output = tmp_path / "filtered.jsonl"
    args = ["curate", "filter", f"--llm={llm_folder}", f"--input={tmp_path / 'pairs.jsonl'}",
            f"--output={output}", f"--max_text_tokens={TEXT_TOKENS}"]
    assert cli.main(args) == 0
    before = output.read_bytes()
    assert cli.main(args) == 0   # complete: nothing to do
    assert output.read_bytes() == before
    assert cli.main([*args, "--min_score=0.9"]) == 2
    assert "min_score differ" in capsys.readouterr().err
    (tmp_path / "foreign.jsonl").write_text('{"query": "q", "positive": "p"}\n')
    assert cli.main([*args[:-2], f"--output={tmp_path / 'foreign.jsonl'}"]) == 2
    assert "has no foreign.progress.json" in capsys.readouterr().err


def test_user_errors_are_one_line(llm_folder, pairs, tmp_path, capsys):
    write_jsonl(tmp_path / "pairs.jsonl", pairs[:2])
    common = [f"--input={tmp_path / 'pairs.jsonl'}", f"--output={tmp_path / 'out.jsonl'}"]
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "relevance.txt").write_text("Is {passage} relevant?")
    cases = [
        (["--llm=hf:Qwen/Qwen2.5-1.5B-Instruct"], "hf: names"),
        ([f"--llm={tmp_path}"], "config.json"),
        ([f"--llm={llm_folder}", "--grades=0,12345"], "one token each"),
        ([f"--llm={llm_folder}", f"--prompts={tmp_path / 'prompts'}"], "relevance.txt: uses"),
    ]
    for flags, message in cases:
        assert cli.main(["curate", "filter", *flags, *common]) == 2
        err = capsys.readouterr().err
        assert err.startswith("gembed: error:") and message in err and err.count("\n") == 1, err


def test_scoring_plan_counts_the_weights_and_the_batch(llm_folder, capsys):
    """`gembed curate plan` on the local CPU: the planned arguments are exactly the float32 weights
    of the folder's safetensors file plus the int32 ids and bool mask of one batch."""
    assert cli.main(["curate", "plan", f"--llm={llm_folder}", "--batch_size=4",
                     "--max_text_tokens=16", "--dtype=float32"]) == 0
    plan = json.loads(capsys.readouterr().out)
    weights = safetensors.numpy.load_file(str(llm_folder / "model.safetensors"))
    parameters = sum(w.size for w in weights.values())
    length = 2 * 16 + 64
    assert plan["parameters"] == parameters and plan["batch"] == [4, length]
    assert plan["memory_per_device_bytes"]["arguments"] == 4 * parameters + 4 * length * (4 + 1)


@pytest.mark.slow   # ranx's numba compilation, and an LLM pass
def test_recipe_mining_stage_with_an_llm_judge_writes_what_curate_negatives_writes(
        llm_folder, embedder_folder, pairs, tmp_path):
    examples = pairs[:8]
    write_jsonl(tmp_path / "pairs.jsonl", examples)
    mining = Mining(data=str(tmp_path / "pairs.jsonl"), num_negatives=2, max_length=64,
                    judge=str(llm_folder), judge_candidates=4, judge_max_text_tokens=TEXT_TOKENS)
    mined = Runner(Recipe(mining=mining), tmp_path / "run", log=lambda _: None).mine(
        str(embedder_folder)) / MINED_FILE
    assert cli.main(["curate", "negatives", f"--llm={llm_folder}", f"--model={embedder_folder}",
                     f"--input={tmp_path / 'pairs.jsonl'}", f"--output={tmp_path / 'cli.jsonl'}",
                     "--candidates=4", "--num_negatives=2", f"--max_text_tokens={TEXT_TOKENS}"]) == 0
    assert read_jsonl(mined) == read_jsonl(tmp_path / "cli.jsonl")
    assert all(e.positive not in e.negatives and len(e.negatives) == 2 for e in read_jsonl(mined))
