"""Hard-negative mining: the positive and near-duplicates of it never become negatives."""
from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from gembed import cli, mining
from gembed.data import Example, load_builtin, read_jsonl, train_sentencepiece
from gembed.data.tokenizer import SentencePieceTokenizer
from gembed.errors import GembedUserError
from gembed.mining import mine_hard_negatives
from gembed.model import ModelConfig, init_params
from gembed.model_folder import write_model_folder


class TableEmbedder:
    """Embeds each text as a fixed unit vector from a table (an exact, hand-checkable model)."""

    def __init__(self, table):
        self.table = {text: np.asarray(v, np.float32) / np.linalg.norm(v) for text, v in table.items()}
        self.encoded = []

    def encode(self, texts, task=None, batch_size=64, show_progress=False):
        self.encoded.extend(texts)
        return np.stack([self.table[text] for text in texts])


def _at_cosine(score, side):
    """A unit vector at cosine `score` to [1, 0, 0], on one side of it."""
    return [score, side * np.sqrt(1 - score ** 2), 0]


# Query q, positive P at cosine 0.8. Other documents by cosine to q: F 0.9 (above the positive: a
# false negative), N1 0.79, N2 0.7, N3 0.6, N4 0.5, N5 0.4. Q2 / P2 a second, unrelated pair.
SCORES = {"P": 0.8, "F": 0.9, "N1": 0.79, "N2": 0.7, "N3": 0.6, "N4": 0.5, "N5": 0.4}
VECTORS = {"q": [1, 0, 0], "Q2": [0, 0, 1], "P2": [0, 0.1, 1],
           **{name: _at_cosine(score, (-1) ** i) for i, (name, score) in enumerate(SCORES.items())}}
POOL = ["P", "F", "N1", "N2", "N3", "N4", "N5", "P2"]
PAIRS = [Example("q", "P"), Example("Q2", "P2")]


def _mine(**kwargs):
    arguments = dict(num_negatives=2, relative_margin=None, documents=POOL) | kwargs
    return mine_hard_negatives(TableEmbedder(VECTORS), PAIRS, **arguments)


def test_default_mining_drops_the_positive_and_documents_within_the_relative_margin():
    # Ranks without P: F 0, N1 1, N2 2, ...; 0.95 * 0.8 = 0.76 drops F and N1.
    mined, stats = mine_hard_negatives(TableEmbedder(VECTORS), PAIRS, num_negatives=2, documents=POOL)
    assert mined[0].negatives == ("N2", "N3")
    assert stats.dropped_positive == 2 and stats.skipped_above_window == 0
    assert stats.dropped_by_margin == 2 + 0   # q: F, N1; Q2 (positive score ~0.995): none
    assert mined[1].negatives[0] != "P2" and stats.negatives == 4
    assert stats.queries_short_of_negatives == 0


def test_rank_window_skips_the_top_and_stops_at_range_max():
    assert _mine()[0][0].negatives == ("F", "N1")                         # no margin: the nearest
    assert _mine(range_min=3)[0][0].negatives == ("N3", "N4")            # ranks 3.. (P not counted)
    mined, stats = _mine(range_min=1, range_max=3, num_negatives=4)
    assert mined[0].negatives == ("N1", "N2")                            # ranks 1, 2 only
    assert stats.skipped_above_window == 2 and stats.queries_short_of_negatives == 2


def test_absolute_and_relative_margins_against_the_positive_score():
    assert _mine(absolute_margin=0.15)[0][0].negatives == ("N3", "N4")   # drops >= 0.65
    assert _mine(absolute_margin=0.0)[0][0].negatives == ("N1", "N2")    # drops >= 0.8
    assert _mine(relative_margin=1.0)[0][0].negatives == ("N1", "N2")
    both, stats = _mine(relative_margin=0.95, absolute_margin=0.15, num_negatives=5)
    assert both[0].negatives == ("N3", "N4", "N5", "P2")   # P2: cosine 0 to q
    assert stats.dropped_by_margin == 3 and stats.queries_short_of_negatives == 1


def test_random_sampling_draws_survivors_in_rank_order_deterministically():
    survivors = ["N2", "N3", "N4", "N5", "P2"]   # relative margin 0.95, window 0..30
    draws = [_mine(relative_margin=0.95, sampling="random", seed=seed)[0][0].negatives
             for seed in range(40)]
    assert draws[:5] == [_mine(relative_margin=0.95, sampling="random", seed=seed)[0][0].negatives
                         for seed in range(5)]
    assert all(len(d) == 2 and list(d) == sorted(d, key=survivors.index) for d in draws)
    assert set().union(*draws) == set(survivors) and len(set(draws)) > 3


def test_every_positive_of_a_query_is_excluded_and_each_text_is_embedded_once():
    embedder = TableEmbedder(VECTORS)
    pairs = [Example("q", "P"), Example("q", "F"), Example("Q2", "P2")]
    mined, stats = mine_hard_negatives(embedder, pairs, num_negatives=2, relative_margin=None,
                                       documents=POOL)
    assert mined[0].negatives == ("N1", "N2") and mined[1].negatives == ("N1", "N2")
    assert sorted(embedder.encoded) == sorted(POOL + ["q", "Q2"])


def test_chunked_embedding_gives_the_same_negatives(monkeypatch):
    expected = _mine(relative_margin=0.95)[0]
    monkeypatch.setattr(mining, "ENCODE_CHUNK", 3)
    assert _mine(relative_margin=0.95)[0] == expected


def test_bad_mining_arguments_are_user_errors():
    for arguments, message in [(dict(range_min=5, range_max=5), "range_min=5, range_max=5"),
                               (dict(sampling="best"), "sampling='best'"),
                               (dict(num_negatives=0), "num_negatives=0")]:
        with pytest.raises(GembedUserError, match=re.escape(message)):
            _mine(**arguments)


def test_gembed_mine_on_stdlib_code_never_returns_the_positive(tmp_path):
    pairs = load_builtin("stdlib_code", "test")
    train_sentencepiece([t for e in pairs for t in (e.query, e.positive)], 400, tmp_path / "sp.model")
    config = ModelConfig(vocab_size=400, hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64,
                         max_position_embeddings=64)
    folder = write_model_folder(tmp_path / "model", config, init_params(config, jax.random.PRNGKey(0)),
                                SentencePieceTokenizer(tmp_path / "sp.model"), max_length=64)
    output = tmp_path / "mined.jsonl"
    assert cli.main(["mine", f"--model={folder}", "--input=builtin:stdlib_code", "--split=test",
                     f"--output={output}", "--num_negatives=3", "--relative_margin=0.98"]) == 0
    mined = read_jsonl(output)
    assert [(e.query, e.positive) for e in mined] == [(e.query, e.positive) for e in pairs]
    assert all(e.positive not in e.negatives and len(e.negatives) <= 3 for e in mined)
    assert sum(len(e.negatives) for e in mined) > 0
    sampled = [tmp_path / "sampled0.jsonl", tmp_path / "sampled1.jsonl"]
    for path in sampled:
        assert cli.main(["mine", f"--model={folder}", "--input=builtin:stdlib_code", "--split=test",
                         f"--output={path}", "--num_negatives=3", "--range_min=2", "--range_max=20",
                         "--sampling=random", "--seed=7", "--relative_margin=none",
                         "--absolute_margin=-1"]) == 0
    assert sampled[0].read_bytes() == sampled[1].read_bytes()
    assert read_jsonl(sampled[0]) != mined and all(len(e.negatives) == 3 for e in read_jsonl(sampled[0]))
