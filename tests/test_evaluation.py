"""The evaluation suite: metrics against scikit-learn / scipy / hand-computed values, exact search
against numpy, every loader on tiny fixture files in the real formats, the runner and `gembed eval`
(with a stand-in encoder), evaluation inside the training loop, and, when the shared data sets are
beside the checkout, the real files. No torch, no downloads.
"""
from __future__ import annotations

import hashlib
import json
import math
import pathlib
import re

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

import gembed
from gembed import cli
from gembed.errors import GembedUserError
from gembed.data import Example, write_jsonl
from gembed.evaluation import (bitext, bm25, classification, code_search, metrics, pair_classification,
                               retrieval, search, sts, tasks)
from gembed.evaluation.data_files import DataMissing

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


class HashingEncoder:
    """A deterministic bag-of-words encoder with the encoder protocol (no model, no torch)."""

    def __init__(self, size: int = 256):
        self.size = size
        self.calls = []

    def encode(self, texts, task=None, dim=None, batch_size=64, show_progress=False):
        self.calls.append((len(texts), task))
        out = np.zeros((len(texts), self.size), np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.size] += 1.0
        out[:, 0] += 1e-3   # no all-zero rows
        out = out[:, :dim] if dim else out
        return out / np.linalg.norm(out, axis=1, keepdims=True)


# ----------------------------------------------------------------------------- metrics

def test_spearman_and_pearson_match_scipy():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(size=50)
    y[:10] = y[0]   # ties
    assert metrics.spearman(x, y) == pytest.approx(100 * stats.spearmanr(x, y).statistic)
    assert metrics.pearson(x, y) == pytest.approx(100 * stats.pearsonr(x, y).statistic)


def test_ndcg_hand_computed_graded_and_unretrieved_relevant():
    # Ranked d3 d1 d9; relevance d1=2, d2=1 (never retrieved), d3=1. pytrec_eval: linear gain.
    qrels = {"d1": 2, "d2": 1, "d3": 1, "d7": 0}
    dcg = 1 / math.log2(2) + 2 / math.log2(3)
    idcg = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert metrics.ndcg_at_k(["d3", "d1", "d9"], qrels, 10) == pytest.approx(100 * dcg / idcg)
    assert metrics.ndcg_at_k(["d9", "d7"], qrels, 10) == 0.0
    assert metrics.ndcg_at_k(["d1", "d3", "d2"], qrels, 10) == pytest.approx(100.0)
    # Cut at k=1: only d3 counts, ideal is d1's gain 2.
    assert metrics.ndcg_at_k(["d3", "d1"], qrels, 1) == pytest.approx(100 * 1 / 2)


def test_ndcg_matches_sklearn_over_a_full_ranking():
    rng = np.random.default_rng(1)
    num_queries, num_docs = 20, 60
    relevance = rng.integers(0, 3, size=(num_queries, num_docs)) * (rng.random((num_queries, num_docs)) < 0.15)
    relevance[:, 0] = np.maximum(relevance[:, 0], 1)     # every query has a relevant document
    scores = rng.normal(size=(num_queries, num_docs))    # untied
    for k in (1, 5, 10):
        ours = np.mean([metrics.ndcg_at_k(list(np.argsort(-scores[q])),
                                          {d: int(r) for d, r in enumerate(relevance[q])}, k)
                        for q in range(num_queries)])
        assert ours == pytest.approx(100 * skm.ndcg_score(relevance, scores, k=k))


def test_recall_and_mrr_hand_computed():
    qrels = {"a": 1, "b": 1, "c": 0}
    assert metrics.recall_at_k(["x", "a", "c", "b"], qrels, 2) == 50.0
    assert metrics.recall_at_k(["x", "a", "c", "b"], qrels, 4) == 100.0
    assert metrics.mrr_at_k(["c", "x", "b"], qrels, 10) == pytest.approx(100 / 3)
    assert metrics.mrr_at_k(["c", "x", "b"], qrels, 2) == 0.0
    scores = metrics.retrieval_scores({"q1": ["a", "b"], "q2": ["z", "y"]},
                                      {"q1": {"a": 1}, "q2": {"y": 1}}, ks=(1, 10))
    assert scores["main_score"] == scores["ndcg@10"]
    assert scores["recall@1"] == 50.0 and scores["mrr@10"] == pytest.approx(75.0)


def test_gold_rank_scores():
    scores = metrics.gold_rank_scores(np.array([1, 2, 20]))
    assert scores["mrr"] == pytest.approx(100 * (1 + 0.5 + 0.05) / 3)
    assert scores["mrr@10"] == pytest.approx(100 * 1.5 / 3)
    assert scores["recall@1"] == pytest.approx(100 / 3)


def test_pair_classification_matches_sklearn_and_brute_force():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, size=200)
    sims = labels * 0.3 + rng.normal(size=200) * 0.4
    sims[:20] = 0.25   # ties: a threshold may not split them
    scores = metrics.best_threshold_scores(sims, labels)
    assert scores["ap"] == pytest.approx(100 * skm.average_precision_score(labels, sims))
    thresholds = np.concatenate([np.unique(sims), [np.inf]])
    best_acc = max(skm.accuracy_score(labels, sims >= t) for t in thresholds)
    best_f1 = max(skm.f1_score(labels, sims >= t, zero_division=0) for t in thresholds)
    assert scores["accuracy"] == pytest.approx(100 * best_acc)
    assert scores["f1"] == pytest.approx(100 * best_f1)


def test_bitext_and_classification_scores_use_sklearn_definitions():
    predicted = np.array([0, 1, 1, 3])
    scores = metrics.bitext_scores(predicted)
    assert scores["accuracy"] == 75.0
    assert scores["f1"] == pytest.approx(100 * skm.f1_score(np.arange(4), predicted, average="weighted",
                                                            zero_division=0))
    cls = metrics.classification_scores([0, 1, 1, 0], [0, 1, 0, 0])
    assert cls["accuracy"] == 75.0 and "ap" in cls
    assert metrics.v_measure([0, 0, 1, 1], [1, 1, 0, 0]) == pytest.approx(100.0)


# ----------------------------------------------------------------------------- exact search

def _unit(rows):
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.mark.parametrize("blocks", [(16, 16), (256, 8192)])
def test_top_k_and_gold_ranks_match_numpy(monkeypatch, blocks):
    monkeypatch.setattr(search, "QUERY_BLOCK", blocks[0])
    monkeypatch.setattr(search, "DOC_BLOCK", blocks[1])
    rng = np.random.default_rng(3)
    queries = _unit(rng.normal(size=(37, 8)).astype(np.float32))
    docs = _unit(rng.normal(size=(70, 8)).astype(np.float32))
    full = queries @ docs.T
    scores, ids = search.top_k(queries, docs, 5)
    np.testing.assert_array_equal(ids, np.argsort(-full, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(scores, np.sort(full, axis=1)[:, ::-1][:, :5], rtol=1e-5, atol=1e-6)
    gold = rng.integers(0, 70, size=37)
    expected = (full >= full[np.arange(37), gold][:, None]).sum(axis=1)
    np.testing.assert_array_equal(search.gold_ranks(queries, docs, gold), expected)
    assert search.top_k(queries, docs[:3], 10)[1].shape == (37, 3)


def test_gold_ranks_put_exact_ties_before_the_gold():
    docs = _unit(np.array([[1, 0], [1, 0], [0, 1]], np.float32))
    queries = _unit(np.array([[1, 0.1]], np.float32))
    assert list(search.gold_ranks(queries, docs, np.array([0]))) == [2]


# ----------------------------------------------------------------------------- fixtures in the real formats

def write(path: pathlib.Path, text: str, encoding="utf-8") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))


SENTENCES = ["a man is playing a guitar", "a woman is slicing an onion", "the cat sleeps on the mat",
             "children play football in the park", "a dog runs along the beach", "the stock market fell today",
             "a chef cooks pasta in the kitchen", "two birds sit on a wire"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("data")
    pairs = [(s, s.replace("a ", "the ", 1), 5.0 - i * 0.6) for i, s in enumerate(SENTENCES)]
    write(root / "stsb_original/sts-test.csv", "".join(
        f"main-captions\tMSRvid\t2012test\t{i:04d}\t{g:.3f}\t{a}\t{b}" + ("\textra\tcols" if i % 2 else "") + "\n"
        for i, (a, b, g) in enumerate(pairs)))
    write(root / "stsb_multi_mt/stsb-de-test.csv", "".join(f'"{a}, ja",{b},{g}\n' for a, b, g in pairs))
    write(root / "sick/SICK.txt", "pair_ID\tsentence_A\tsentence_B\tentailment_label\trelatedness_score\t"
          "entailment_AB\tentailment_BA\tsentence_A_original\tsentence_B_original\tsentence_A_dataset\t"
          "sentence_B_dataset\tSemEval_set\n" + "".join(
              f"{i}\t{a}\t{b}\tNEUTRAL\t{g}\tx\tx\t{a}\t{b}\tFLICKR\tFLICKR\tTEST\n" for i, (a, b, g) in enumerate(pairs)))
    write(root / "sts12_16/STS12/STS.input.MSRvid.txt", "".join(f"{a}\t{b}\n" for a, b, _ in pairs))
    write(root / "sts12_16/STS12/STS.gs.MSRvid.txt", "".join(f"{g}\n" if i != 3 else "\n"
                                                              for i, (_, _, g) in enumerate(pairs)))
    write(root / "sts12_16/STS12/STS.gs.ALL.txt", "1\n")            # no input file: ignored
    write(root / "sts12_16/STS16/STS2016.input.headlines.txt",
          "".join(f"{a}\t{b}\tsrc1\tsrc2\n" for a, b, _ in pairs))
    write(root / "sts12_16/STS16/STS2016.gs.headlines.txt", "".join(f"{g}\n" for _, _, g in pairs))
    # BEIR: four docs, three queries (q3 unjudged in test), graded qrels with a header.
    docs = [("d1", "Guitars", "a man is playing a guitar"), ("d2", "", "onion slicing in the kitchen"),
            ("d3", "Cats", "the cat sleeps on the mat"), ("d4", "Markets", "the stock market fell")]
    write(root / "beir_scifact/corpus.jsonl", "".join(
        json.dumps({"_id": i, "title": t, "text": x, "metadata": {}}) + "\n" for i, t, x in docs))
    write(root / "beir_scifact/queries.jsonl", "".join(
        json.dumps({"_id": q, "text": x, "metadata": {}}) + "\n"
        for q, x in [("1", "who plays guitar"), ("2", "cat on a mat"), ("3", "unjudged")]))
    write(root / "beir_scifact/qrels/test.tsv", "query-id\tcorpus-id\tscore\n1\td1\t1\n2\td3\t2\n2\td2\t1\n")
    codes = [f"def f{i}(x):\n    return '{s}'" for i, s in enumerate(SENTENCES)]
    write(root / "cosqa/code_idx_map.txt", json.dumps({c: i for i, c in enumerate(codes)}))
    write(root / "cosqa/cosqa-retrieval-test-500.json", json.dumps(
        [{"idx": f"q{i}", "doc": s, "code": codes[i], "retrieval_idx": i, "label": 1}
         for i, s in enumerate(SENTENCES[:5])]))
    write(root / "cosqa/cosqa-dev.json", json.dumps(
        [{"idx": f"d{i}", "doc": s, "code": codes[(i + (i % 2)) % len(codes)], "label": 1 - i % 2}
         for i, s in enumerate(SENTENCES)]))
    write(root / "codexglue_csn_ruby/test.jsonl", "".join(
        json.dumps({"docstring": s, "code": f"def m{i}\n  '{s}'\nend", "language": "ruby"}) + "\n"
        for i, s in enumerate(SENTENCES)))
    write(root / "tatoeba_laser/tatoeba.deu-eng.deu", "".join(s.upper() + "\n" for s in SENTENCES))
    write(root / "tatoeba_laser/tatoeba.deu-eng.eng", "".join(s + "\n" for s in SENTENCES))
    intents = {"card_arrival": "when will my card arrive", "lost_card": "i lost my card",
               "top_up": "how do i top up my account"}
    write(root / "banking77/train.csv", "text,category\n" + "".join(
        f'"{x} please, {n}",{label}\n' for label, x in intents.items() for n in range(12)))
    write(root / "banking77/test.csv", "text,category\n" + "".join(
        f"{x} now,{label}\n" for label, x in intents.items()))
    write(root / "senteval_cls/MR/rt-polarity.pos", "".join(f"great fun {i} caf\xe9\n" for i in range(10)), "latin-1")
    write(root / "senteval_cls/MR/rt-polarity.neg", "".join(f"awful bore {i}\n" for i in range(10)), "latin-1")
    write(root / "senteval_cls/TREC/train_5500.label",
          "".join(f"NUM:dist How far is {i} ?\nLOC:city Where is {i} ?\n" for i in range(6)), "latin-1")
    write(root / "senteval_cls/TREC/TREC_10.label", "NUM:count How far is it ?\nLOC:other Where is it ?\n")
    write(root / "senteval_cls/SST/Binary/sentiment-train",
          "".join(f"good movie {i} \t1\nbad movie {i} \t0\n" for i in range(5)))
    write(root / "senteval_cls/SST/Binary/sentiment-test", "good film \t1\nbad film \t0\n")
    write(root / "senteval_cls/SST/Fine-Grained/sentiment-train",
          "".join(f"4 great movie {i}\n0 terrible movie {i}\n2 ok movie {i}\n" for i in range(4)))
    write(root / "senteval_cls/SST/Fine-Grained/sentiment-test", "4 great film\n0 terrible film\n")
    return root


def test_sts_loaders(data_dir):
    stsb = sts.load_stsb(data_dir)
    assert len(stsb.first) == 8 and stsb.gold[0] == 5.0 and stsb.second[1].startswith("the woman")
    multi = sts.load_stsb_multi(data_dir, "de")
    assert multi.first[0] == "a man is playing a guitar, ja" and len(multi.gold) == 8
    assert sts.load_sick(data_dir).gold[1] == pytest.approx(4.4)
    sts12 = sts.load_sts_year(data_dir, "sts12")
    assert len(sts12.first) == 7   # the unscored line is skipped
    assert len(sts.load_sts_year(data_dir, "sts16").first) == 8
    with pytest.raises(DataMissing):
        sts.load_sts_year(data_dir, "sts13")
    with pytest.raises(DataMissing):
        sts.load_stsb(None)


def test_retrieval_code_bitext_and_classification_loaders(data_dir):
    beir = retrieval.load_beir(data_dir, "beir_scifact")
    assert beir.doc_texts[:2] == ["Guitars a man is playing a guitar", "onion slicing in the kitchen"]
    assert list(beir.queries) == ["1", "2"] and beir.qrels["2"] == {"d3": 2, "d2": 1}
    cosqa = code_search.load_cosqa(data_dir)
    assert len(cosqa.codes) == 8 and cosqa.gold == [0, 1, 2, 3, 4]
    assert code_search.load_csn(data_dir).gold == list(range(8))
    assert bitext.load_tatoeba(data_dir, "deu").source[0] == SENTENCES[0].upper()
    assert pair_classification.load_cosqa_pairs(data_dir).labels[:2] == [1, 0]
    bank = classification.load_banking77(data_dir)
    assert len(bank.train.texts) == 36 and bank.train.texts[0] == "when will my card arrive please, 0"
    mr = classification.load_senteval_binary(data_dir, "mr")
    assert mr.test is None and mr.train.texts[0] == "great fun 0 caf\xe9" and sum(mr.train.labels) == 10
    trec = classification.load_trec(data_dir)
    assert trec.train.labels[:2] == ["NUM", "LOC"] and trec.test.texts[0] == "How far is it ?"
    assert classification.load_sst(data_dir, 2).test.labels == [1, 0]
    assert classification.load_sst(data_dir, 5).train.labels[:3] == [4, 0, 2]


def test_malformed_files_are_user_errors_naming_file_and_line(tmp_path):
    write(tmp_path / "stsb_original/sts-test.csv", "genre\tfile\tyear\tid\tnot-a-score\ta\tb\n")
    with pytest.raises(GembedUserError, match=r"sts-test.csv:1: score 'not-a-score'"):
        sts.load_stsb(tmp_path)
    write(tmp_path / "beir_scifact/corpus.jsonl", '{"_id": "d1", "text": "x"}\n{broken\n')
    write(tmp_path / "beir_scifact/queries.jsonl", '{"_id": "1", "text": "q"}\n')
    write(tmp_path / "beir_scifact/qrels/test.tsv", "1\td1\t1\n")
    with pytest.raises(GembedUserError, match=r"corpus.jsonl:2: not valid JSON"):
        retrieval.load_beir(tmp_path, "beir_scifact")


def test_mteb_undersampling_is_reproducible_and_balanced():
    labels = ["a"] * 30 + ["b"] * 5 + ["c"] * 20
    order = list(range(len(labels)))
    first = classification.undersample(labels, 8, order, seed=42)
    second = classification.undersample(labels, 8, order, seed=42)   # same order list, reshuffled
    again = classification.undersample(labels, 8, list(range(len(labels))), seed=42)
    assert first == again and first != second
    for chosen in (first, second):
        counts = {label: sum(labels[i] == label for i in chosen) for label in "abc"}
        assert counts == {"a": 8, "b": 5, "c": 8}


# ----------------------------------------------------------------------------- runner, CLI

def test_every_task_runs_on_fixtures_and_missing_data_is_skipped(data_dir, monkeypatch):
    monkeypatch.setattr(code_search, "load_stdlib_code", lambda split: code_search.CodeSearchSet(
        SENTENCES, [f"def f():\n    '{s}'" for s in SENTENCES], list(range(8))))
    encoder, messages = HashingEncoder(), []
    names = ["stsb", "sickr", "sts12", "sts16", "stsb_multi:de", "scifact", "cosqa", "csn_ruby",
             "tatoeba:deu", "mr", "trec", "sst2", "sst5", "banking77", "banking77_clustering",
             "cosqa_pairs", "stdlib_code", "sts13", "tatoeba:xho", "cr"]
    results = tasks.evaluate(encoder, ",".join(names), data_dir=data_dir, log=messages.append)
    assert set(results) == set(names) - {"sts13", "tatoeba:xho", "cr"}
    assert len(messages) == 3 and all(m.startswith("gembed eval: skipping ") for m in messages)
    # Bag-of-words matches near-identical texts: these must be (near) perfect.
    assert results["csn_ruby"]["main_score"] == pytest.approx(100.0)
    assert results["tatoeba:deu"]["accuracy"] == 100.0
    assert results["scifact"]["recall@10"] == 100.0
    assert results["banking77"]["main_score"] == 100.0
    assert results["stdlib_code"]["mrr"] == pytest.approx(100.0)
    assert {task for _, task in encoder.calls} >= {"sts", "retrieval", "code_search", "bitext",
                                                  "classification", "clustering", None}
    table = tasks.format_table(results)
    assert table.splitlines()[0].split()[:3] == ["task", "family", "main"] and "scifact" in table


def test_unknown_and_malformed_task_names_are_user_errors():
    with pytest.raises(GembedUserError, match="unknown task 'stsbb'"):
        tasks.parse_task_list("stsb,stsbb")
    with pytest.raises(GembedUserError, match="after 'tatoeba:'"):
        tasks.get_task("tatoeba:")
    with pytest.raises(GembedUserError, match="no task given"):
        tasks.parse_task_list(" , ")
    assert [t.name for t in tasks.parse_task_list("stsb_multi:fr,stsb,stsb")] == ["stsb_multi:fr", "stsb"]


def test_gembed_eval_prints_table_and_writes_json(data_dir, tmp_path, monkeypatch, capsys):
    loaded = []
    monkeypatch.setattr(gembed, "load", lambda path: loaded.append(path) or HashingEncoder(), raising=False)
    output = tmp_path / "out" / "results.json"
    code = cli.main(["eval", f"--model={tmp_path / 'model'}", "--tasks=stsb,tatoeba:deu,sts14",
                     f"--data_dir={data_dir}", f"--output={output}"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert loaded == [str(tmp_path / "model")]
    assert "gembed eval: skipping sts14: " in captured.err
    results = json.loads(output.read_text())
    assert set(results) == {"stsb", "tatoeba:deu"}
    assert results["tatoeba:deu"]["main_score"] == results["tatoeba:deu"]["f1"]
    assert "stsb" in captured.out and "tatoeba:deu" in captured.out


def _eval_error(argv, capsys) -> str:
    """The stderr of a `gembed eval` that must exit 2 with one `gembed: error:` line last."""
    assert cli.main(["eval", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("gembed: error: ") == 1 and err.splitlines()[-1].startswith("gembed: error: ")
    assert "Traceback" not in err
    return err.splitlines()[-1]


def test_gembed_eval_exits_2_when_nothing_ran(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gembed, "load", lambda path: HashingEncoder(), raising=False)
    output = tmp_path / "results.json"
    line = _eval_error([f"--model={tmp_path}", "--tasks=stsb,scifact", f"--data_dir={tmp_path / 'typo'}",
                        f"--output={output}"], capsys)
    assert line.startswith("gembed: error: no task ran: all 2 skipped (first, stsb: ")
    assert not output.exists()
    line = _eval_error(["--model=bm25", "--tasks=stsb"], capsys)
    assert "stsb: bm25 only ranks documents" in line


def test_gembed_eval_reports_a_non_finite_score_as_a_failure(data_dir, tmp_path, monkeypatch, capsys):
    class NaNEncoder(HashingEncoder):
        def encode(self, texts, **kwargs):
            return np.full((len(texts), 8), np.nan, np.float32)

    monkeypatch.setattr(gembed, "load", lambda path: NaNEncoder(), raising=False)
    output = tmp_path / "results.json"
    line = _eval_error([f"--model={tmp_path}", "--tasks=stsb", f"--data_dir={data_dir}",
                        f"--output={output}"], capsys)
    assert line.startswith("gembed: error: 1 task(s) failed: stsb: non-finite score (main_score=nan")
    assert not output.exists()
    with pytest.raises(GembedUserError, match="task stsb: non-finite score"):
        tasks.evaluate(NaNEncoder(), "stsb", data_dir=data_dir)


def test_gembed_eval_bad_inputs_are_one_line_errors(data_dir, tmp_path, monkeypatch, capsys):
    from gembed.model import ModelConfig

    class Model(HashingEncoder):
        embedding_size = 256
        model_config = ModelConfig(vocab_size=8, hidden_size=256, num_layers=1, num_heads=2, mlp_dim=8,
                                   output_sizes=(64, 256))

    monkeypatch.setattr(gembed, "load", lambda path: Model(), raising=False)
    model = f"--model={tmp_path}"
    assert _eval_error([model, "--tasks=stsb", "--dim=999"], capsys) == (
        f"gembed: error: --dim=999: {tmp_path} embeds into 256 dims (trained Matryoshka sizes: 64, 256); "
        f"pick 1..256.")
    assert "--dim applies to embedding models" in _eval_error(["--model=bm25", "--tasks=scifact", "--dim=8"], capsys)
    empty, one = tmp_path / "empty.jsonl", tmp_path / "one.jsonl"
    empty.write_text("\n")
    write_jsonl(one, [Example("q", "p")])
    assert f"{empty}: no examples found" in _eval_error([model, f"--tasks=pairs:{empty}"], capsys)
    assert f"{one}: 1 distinct positive; retrieval needs at least 2" in _eval_error(
        [model, f"--tasks=pairs:{one}"], capsys)
    assert f"{tmp_path} is a folder" in _eval_error([model, f"--tasks=pairs:{tmp_path}"], capsys)
    assert "file not found" in _eval_error([model, f"--tasks=pairs:{tmp_path / 'nope.jsonl'}"], capsys)
    broken = tmp_path / "broken"
    write(broken / "stsb_original/sts-test.csv", "g\tf\ty\t0\t4.0\ta man\ta woman\n")
    assert "sts-test.csv: 1 scored pairs; this task needs at least 2" in _eval_error(
        [model, "--tasks=stsb", f"--data_dir={broken}"], capsys)
    (broken / "codexglue_csn_ruby" / "test.jsonl").mkdir(parents=True)
    assert "test.jsonl: is a folder where a file belongs" in _eval_error(
        [model, "--tasks=csn_ruby", f"--data_dir={broken}"], capsys)


def test_gembed_eval_bm25_on_pairs_writes_the_table(tmp_path, capsys):
    path, output = tmp_path / "pairs.jsonl", tmp_path / "bm25.json"
    documents = [BM25_DOCS[5], BM25_DOCS[1], BM25_DOCS[3]]   # each query's best BM25 match
    write_jsonl(path, [Example(q, d) for q, d in zip(BM25_QUERIES[:3], documents)])
    assert cli.main(["eval", "--model=bm25", f"--tasks=pairs:{path}", f"--output={output}"]) == 0
    results = json.loads(output.read_text())[f"pairs:{path}"]
    assert results["main_score"] == results["mrr@10"] == pytest.approx(100.0)
    assert f"pairs:{path}" in capsys.readouterr().out


def test_gembed_eval_unknown_task_exits_2_before_loading(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(gembed, "load", lambda path: pytest.fail("must not load"), raising=False)
    assert cli.main(["eval", f"--model={tmp_path}", "--tasks=nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gembed: error: unknown task 'nope'") and len(err.splitlines()) == 1


def test_flatten_names_metrics_for_the_training_log():
    flat = tasks.flatten({"stsb": {"main_score": 80.0, "cosine_pearson": 81.0, "seconds": 2.0}})
    assert flat == {"eval/stsb/main_score": 80.0, "eval/stsb/cosine_pearson": 81.0}


def test_matryoshka_dim_reaches_the_encoder(data_dir):
    seen = []

    class Recording(HashingEncoder):
        def encode(self, texts, task=None, dim=None, **kwargs):
            seen.append(dim)
            return super().encode(texts, task=task, dim=dim, **kwargs)

    tasks.evaluate(Recording(), "stsb", data_dir=data_dir, dim=200)
    assert seen and set(seen) == {200}


# ----------------------------------------------------------------------------- pairs:FILE, stdlib tasks

class TableEncoder:
    """Embeds each text as a fixed vector from a table (L2-normalised); records the query tasks."""

    def __init__(self, table):
        self.table = {text: np.asarray(v, np.float32) / np.linalg.norm(v) for text, v in table.items()}
        self.tasks = []

    def encode(self, texts, task=None, dim=None, batch_size=64, show_progress=False):
        self.tasks.append(task)
        return np.stack([self.table[text] for text in texts])


def test_pairs_task_scores_a_hand_computed_case(tmp_path):
    # Pool of distinct positives A, B, C, D (unit axes). q1 has two positives (A, D); A is also q4's.
    pairs = [("q1", "A"), ("q2", "B"), ("q3", "C"), ("q1", "D"), ("q4", "A")]
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [Example(q, p) for q, p in pairs])
    encoder = TableEncoder({"A": [1, 0, 0, 0], "B": [0, 1, 0, 0], "C": [0, 0, 1, 0], "D": [0, 0, 0, 1],
                            "q1": [0.2, 0.9, 0.1, 0.5],    # B D A C: first relevant at 2, D and A at 2, 3
                            "q2": [0.1, 0.9, 0.0, 0.2],    # B first
                            "q3": [0.3, 0.2, 0.1, 0.4],    # D A B C: C at 4
                            "q4": [0.5, 0.6, 0.0, 0.0]})   # B A ...: A at 2
    scores = tasks.evaluate(encoder, [f"pairs:{path}"], log=pytest.fail)[f"pairs:{path}"]
    log2 = math.log2
    assert scores["main_score"] == scores["mrr@10"] == pytest.approx(100 * (1 / 2 + 1 + 1 / 4 + 1 / 2) / 4)
    ndcg = [(1 / log2(3) + 1 / log2(4)) / (1 + 1 / log2(3)), 1.0, 1 / log2(5), 1 / log2(3)]
    assert scores["ndcg@10"] == pytest.approx(100 * np.mean(ndcg))
    assert scores["recall@1"] == pytest.approx(25.0) and scores["recall@3"] == pytest.approx(75.0)
    assert set(encoder.tasks) == {"retrieval", None}
    write_jsonl(path, [Example(q, p, task="code_search") for q, p in pairs])
    tasks.evaluate(encoder, [f"pairs:{path}"], log=pytest.fail)
    assert encoder.tasks[-2:] == ["code_search", None]


def test_stdlib_tasks_read_their_splits(monkeypatch):
    seen = []

    def load_builtin(name, split):
        seen.append((name, split))
        return [Example(f"{name} {split} query {i}", f"{name} {split} passage {i}") for i in range(4)]

    for module in (code_search, tasks):   # the modules that read built-in corpora for tasks
        monkeypatch.setattr(module, "load_builtin", load_builtin)
    results = tasks.evaluate(bm25.BM25(), "stdlib_code,stdlib_code:validation,stdlib_docs,stdlib_docs:validation",
                             log=pytest.fail)
    assert seen == [("stdlib_code", "test"), ("stdlib_code", "validation"), ("stdlib_docs", "test"),
                    ("stdlib_docs", "validation")]
    assert [tasks.get_task(name).family for name in results] == ["code_search"] * 2 + ["retrieval"] * 2
    assert results["stdlib_docs"]["main_score"] == results["stdlib_docs"]["mrr@10"]


# ----------------------------------------------------------------------------- BM25

BM25_DOCS = ["def get_file_name(path):\n    return os.path.basename(path)",
             "Read the whole file and return its lines.",
             "class FileReader:\n    def readLines(self): return self.handle.readlines()",
             "The cat sat on the mat; the cats are running.",
             "the of and",                      # only stopwords: no terms
             "Return the file name of a path, as a string name."]
BM25_QUERIES = ["file name of a path", "read lines from a file", "running cat", "the", "getFileName"]


def _numpy_bm25(queries, documents, k1=1.2, b=0.75):
    """Lucene BM25 from its formula, over gembed's BM25 terms: float64[Q, D]."""
    terms = [bm25.tokenize(d) for d in documents]
    lengths = np.array([len(t) for t in terms], np.float64)
    df = {}
    for doc_terms in terms:
        for term in set(doc_terms):
            df[term] = df.get(term, 0) + 1
    n = len(documents)
    out = np.zeros((len(queries), n))
    for qi, query in enumerate(queries):
        for term in bm25.tokenize(query):
            if term not in df:
                continue
            idf = math.log(1 + (n - df[term] + 0.5) / (df[term] + 0.5))
            tf = np.array([t.count(term) for t in terms], np.float64)
            out[qi] += idf * tf / (tf + k1 * (1 - b + b * lengths / lengths.mean()))
    return out


def test_bm25_terms_split_identifiers():
    assert bm25.tokenize("getHTTPResponse parse_file the a x2 Running") == [
        "get", "http", "respons", "gethttprespons", "pars", "file", "parse_fil", "x2", "run"]


def test_bm25_scores_and_rankings_match_the_formula():
    reference = _numpy_bm25(BM25_QUERIES, BM25_DOCS)
    model = bm25.BM25()
    np.testing.assert_allclose(np.stack(list(model.scores(BM25_QUERIES, BM25_DOCS))), reference,
                               rtol=1e-5, atol=1e-6)
    assert reference[0].max() > 0 and not reference[3].any()    # "the": no terms, all zero
    np.testing.assert_array_equal(model.top_k(BM25_QUERIES, BM25_DOCS, 3),
                                  np.argsort(-reference, axis=1, kind="stable")[:, :3])
    gold = np.array([5, 1, 3, 0, 0])
    expected = (reference >= reference[np.arange(5), gold][:, None] - 1e-6).sum(axis=1)
    np.testing.assert_array_equal(model.gold_ranks(BM25_QUERIES, BM25_DOCS, gold), expected)


def test_bm25_runs_ranking_tasks_with_an_embedders_keys_and_skips_the_rest(data_dir):
    names = "stsb,scifact,cosqa,csn_ruby,tatoeba:deu,banking77,cosqa_pairs"
    messages = []
    lexical = tasks.evaluate(bm25.BM25(), names, data_dir=data_dir, log=messages.append)
    embedded = tasks.evaluate(HashingEncoder(), names, data_dir=data_dir, log=pytest.fail)
    assert list(lexical) == ["scifact", "cosqa", "csn_ruby"]
    assert all(list(lexical[n]) == list(embedded[n]) for n in lexical)
    assert messages == [f"gembed eval: skipping {n}: bm25 only ranks documents (retrieval and code-search "
                        f"tasks); {tasks.get_task(n).family} needs embeddings"
                        for n in ("stsb", "tatoeba:deu", "banking77", "cosqa_pairs")]
    assert lexical["csn_ruby"]["main_score"] == pytest.approx(100.0)


# ----------------------------------------------------------------------------- the shared data sets

@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} absent (public sets live beside the checkout)")
def test_real_data_sets_parse_with_published_sizes_and_run():
    d = SHARED_DATA
    assert len(sts.load_stsb(d).gold) == 1379
    assert len(sts.load_sick(d).gold) == 9840
    assert [len(sts.load_sts_year(d, f"sts1{y}").gold) for y in range(2, 7)] == [3108, 1500, 3750, 3000, 1186]
    assert len(sts.load_stsb_multi(d, "de").gold) == 1379
    scifact = retrieval.load_beir(d, "beir_scifact")
    assert (len(scifact.doc_ids), len(scifact.queries), sum(map(len, scifact.qrels.values()))) == (5183, 300, 339)
    cosqa = code_search.load_cosqa(d)
    assert (len(cosqa.queries), len(cosqa.codes)) == (500, 6267)
    assert len(code_search.load_csn(d, "ruby").codes) == 1261
    assert len(bitext.load_tatoeba(d, "deu").source) == 1000
    bank = classification.load_banking77(d)
    assert (len(bank.train.texts), len(bank.test.texts), len(set(bank.test.labels))) == (10003, 3080, 77)
    expected = {"mr": 10662, "cr": 3775, "subj": 10000, "mpqa": 10606}
    assert {n: len(classification.load_senteval_binary(d, n).train.texts) for n in expected} == expected
    trec = classification.load_trec(d)
    assert (len(trec.train.texts), len(trec.test.texts), len(set(trec.train.labels))) == (5452, 500, 6)
    sst2, sst5 = classification.load_sst(d, 2), classification.load_sst(d, 5)
    assert (len(sst2.train.texts), len(sst2.test.texts)) == (67349, 1821)
    assert (len(sst5.train.texts), len(sst5.test.texts)) == (8544, 2210)
    assert len(pair_classification.load_cosqa_pairs(d).labels) == 604
    # A cheap real run: bag-of-words scores STS-B test far above chance but below real encoders.
    encoder = HashingEncoder(1024)
    stsb_score = tasks.evaluate(encoder, "stsb", data_dir=d)["stsb"]["main_score"]
    pairs = sts.load_stsb(d)
    first, second = encoder.encode(list(pairs.first)), encoder.encode(list(pairs.second))
    expected = stats.spearmanr(np.einsum("nd,nd->n", first, second), pairs.gold).statistic
    assert stsb_score == pytest.approx(100 * expected, abs=1e-4)


@pytest.mark.skipif(not (SHARED_DATA / "beir_scifact").is_dir(), reason="SciFact absent from the shared data")
def test_bm25_on_scifact_is_near_the_published_baseline():
    # BEIR's Elasticsearch BM25: 66.5 nDCG@10; Pyserini's flat-index BM25: 67.9. gembed's terms
    # split identifiers (no effect on most words) and keep the Snowball stems: 68.15 measured.
    score = tasks.evaluate(bm25.BM25(), "scifact", data_dir=SHARED_DATA)["scifact"]["main_score"]
    assert score == pytest.approx(68.15, abs=0.01)
    assert abs(score - 66.5) < 2.0


# ----------------------------------------------------------------------------- during training

def test_training_logs_evaluation_scores_at_the_configured_steps(data_dir, tmp_path, capsys):
    from gembed.data import Example, train_sentencepiece, write_jsonl

    import keyword
    words = keyword.kwlist + " ".join(SENTENCES).split()
    rng = np.random.default_rng(0)
    examples = [Example(query=" ".join(rng.choice(words, 6)) + f" {i}", positive=" ".join(rng.choice(words, 12)))
                for i in range(400)]
    write_jsonl(tmp_path / "pairs.jsonl", examples)
    train_sentencepiece([t for e in examples for t in (e.query, e.positive)], 320, tmp_path / "sp.model")
    params = [f"TRAIN_DATA='{tmp_path / 'pairs.jsonl'}'", "TRAIN_STEPS=3", "BATCH_SIZE=8", "MAX_LENGTH=16",
              "CHECKPOINT_EVERY=3", "LOG_EVERY=2", "VOCAB_SIZE=320", "TrainConfig.warmup_steps=1",
              f"TrainConfig.tokenizer='{tmp_path / 'sp.model'}'", "EvalConfig.tasks=['stsb', 'sts13']",
              f"EvalConfig.data_dir='{data_dir}'", "EvalConfig.every_steps=1"]
    workdir = tmp_path / "run"
    code = cli.main(["train", "--gin_file=model/tiny.gin", "--gin_file=prefinetune.gin", f"--workdir={workdir}",
                     *(f"--gin_param={p}" for p in params)])
    err = capsys.readouterr().err
    assert code == 0, err
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]   # LOG_EVERY=2, evaluation every step
    assert all("loss" in line and "eval/stsb/main_score" in line for line in lines)
    final = tasks.evaluate(gembed.load(workdir), "stsb", data_dir=data_dir)["stsb"]["main_score"]
    assert lines[-1]["eval/stsb/main_score"] == pytest.approx(final, abs=1e-3)
    assert err.count("skipping sts13") == 1
    assert "EvalConfig.every_steps = 1" in (workdir / "config.gin").read_text()


def test_eval_config_rejects_unknown_task_before_training(tmp_path, capsys):
    code = cli.main(["train", "--gin_file=model/tiny.gin", "--gin_file=prefinetune.gin",
                     f"--workdir={tmp_path}", "--gin_param=EvalConfig.tasks=['stsbb']"])
    assert code == 2
    assert "unknown task 'stsbb'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- MTEB adapter (no mteb needed)

def test_mteb_protocol_encode_reads_dataloader_batches_and_picks_the_task():
    from types import SimpleNamespace

    from gembed.mteb_protocol import MtebEncoder

    inner = HashingEncoder()
    model = MtebEncoder(inner, dim=128, batch_size=8)
    batches = [{"text": ["a cat", "a dog"]}, {"text": ["a bird"]}]
    out = model.encode(batches, task_metadata=SimpleNamespace(type="Retrieval"), hf_split="test",
                       hf_subset="default", prompt_type=SimpleNamespace(value="query"))
    assert out.shape == (3, 128)
    np.testing.assert_allclose(out, HashingEncoder().encode(["a cat", "a dog", "a bird"], dim=128), rtol=1e-6)
    model.encode(batches, task_metadata=SimpleNamespace(type="Retrieval"), hf_split="test",
                 hf_subset="default", prompt_type=SimpleNamespace(value="document"))
    model.encode(batches, task_metadata=SimpleNamespace(type="STS"), hf_split="test", hf_subset="default")
    assert [task for _, task in inner.calls] == ["retrieval", None, "sts"]
    assert model.encode(["plain"], task="sts").shape == (1, 128)   # the gembed protocol still works


def test_retrieval_scores_match_pytrec_eval_when_installed():
    pytrec_eval = pytest.importorskip("pytrec_eval")   # in the [mteb] extra, not in CI
    rng = np.random.default_rng(5)
    qrels, rankings, run = {}, {}, {}
    for q in range(30):
        docs = [f"d{i}" for i in rng.permutation(200)[:120]]
        qrels[f"q{q}"] = {d: int(rng.integers(1, 3)) for d in rng.choice(docs, 4, replace=False)}
        rankings[f"q{q}"] = docs[:100]
        run[f"q{q}"] = {d: float(100 - i) for i, d in enumerate(docs[:100])}
    ours = metrics.retrieval_scores(rankings, qrels, ks=(1, 10, 100))
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.1,10,100", "recall.10,100", "recip_rank"})
    theirs = evaluator.evaluate(run)
    for ours_key, their_key in [("ndcg@1", "ndcg_cut_1"), ("ndcg@10", "ndcg_cut_10"),
                                ("ndcg@100", "ndcg_cut_100"), ("recall@10", "recall_10"),
                                ("recall@100", "recall_100")]:
        assert ours[ours_key] == pytest.approx(100 * np.mean([s[their_key] for s in theirs.values()]))
