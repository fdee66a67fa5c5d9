"""Hard-negative mining: the positive and near-duplicates of it never become negatives."""
from __future__ import annotations

import jax
import numpy as np

from gembed import cli
from gembed.data import Example, load_builtin, read_jsonl, train_sentencepiece
from gembed.data.tokenizer import SentencePieceTokenizer
from gembed.mining import mine_hard_negatives
from gembed.model import ModelConfig, init_params
from gembed.model_folder import write_model_folder


class TableEmbedder:
    """Embeds each text as a fixed unit vector from a table (an exact, hand-checkable model)."""

    def __init__(self, table):
        self.table = {text: np.asarray(v, np.float32) / np.linalg.norm(v) for text, v in table.items()}

    def encode(self, texts, task=None, batch_size=64, show_progress=False):
        return np.stack([self.table[text] for text in texts])


def test_positive_and_probable_false_negatives_are_dropped_in_score_order():
    # Query q's positive P scores cos(q, P) = 0.8. Candidates by score: P itself (dropped), N1 at
    # 0.79 >= 0.95 * 0.8 (a probable false negative, dropped), then N2 0.6, N3 0.5 kept in order.
    angle = np.arccos
    vectors = {"q": [1, 0, 0]}
    for name, score, side in (("P", 0.8, 1), ("N1", 0.79, -1), ("N2", 0.6, 1), ("N3", 0.5, -1)):
        vectors[name] = [score, side * np.sin(angle(score)), 0]
    vectors["Q2"] = [0, 0, 1]
    vectors["P2"] = [0, 0.1, 1]
    embedder = TableEmbedder(vectors)
    examples = [Example("q", "P"), Example("Q2", "P2")]
    mined, stats = mine_hard_negatives(embedder, examples, num_negatives=2, candidates=10,
                                       relative_margin=0.95, documents=["P", "N1", "N2", "N3", "P2"])
    assert mined[0].negatives == ("N2", "N3")
    assert stats.dropped_by_margin >= 1 and stats.dropped_positive == 2
    everything, _ = mine_hard_negatives(embedder, examples, num_negatives=2, candidates=10,
                                        relative_margin=1.0, documents=["P", "N1", "N2", "N3", "P2"])
    assert everything[0].negatives == ("N1", "N2")


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
