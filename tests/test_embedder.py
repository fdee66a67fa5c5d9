"""Embedder.encode: token-budget calls give each text the embedding it gets alone, and misuse is
refused before any work."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from gembed.data.batching import bucket_length
from gembed.data.builtin import load_builtin
from gembed.embedder import BUCKETS_PER_OCTAVE, Embedder, plan_calls
from gembed.model import EmbeddingModel, ModelConfig, init_params

MAX_LENGTH = 96


class CharTokenizer:
    """One id per character; stands in for a real tokenizer."""

    pad_id = 0

    def encode(self, texts, max_length, add_eos=False):
        return [[1 + ord(c) % 250 for c in text[:max_length]] for text in texts]


@pytest.fixture(scope="module")
def embedder():
    config = ModelConfig(vocab_size=256, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64,
                         max_position_embeddings=MAX_LENGTH, projection_dim=16,
                         output_sizes=(8, 16))
    return Embedder(config, init_params(config, jax.random.PRNGKey(0)), CharTokenizer(), MAX_LENGTH)


@pytest.mark.parametrize("tokens_per_call", [1, 200, 96 * 8, 10**6])
def test_plan_covers_every_text_once_within_the_budget(tokens_per_call):
    lengths = np.random.default_rng(0).integers(1, MAX_LENGTH + 1, size=300)
    calls = plan_calls(lengths, MAX_LENGTH, tokens_per_call)
    assert sorted(i for call in calls for i in call.texts) == list(range(300))
    for call in calls:
        assert call.length == bucket_length(max(lengths[call.texts]), MAX_LENGTH, BUCKETS_PER_OCTAVE)
        capacity = max(1, tokens_per_call // call.length)
        assert len(call.texts) <= call.rows <= capacity
        assert call.rows == capacity or call.rows == 1 << (len(call.texts) - 1).bit_length()
    longest = [max(lengths[call.texts]) for call in calls]
    assert longest == sorted(longest)   # calls go up in length


@pytest.mark.slow
def test_encode_gives_each_text_its_alone_embedding(embedder):
    texts = [e.positive[:200] for e in load_builtin("stdlib_code", "test")[:40]] + ["x", "a b"]
    apply = jax.jit(EmbeddingModel(embedder.model_config).apply)   # one unpadded text per call
    alone = []
    for ids in embedder.tokenizer.encode(texts, MAX_LENGTH):
        ids = np.asarray(ids, np.int32)[None]
        alone.append(np.asarray(apply({"params": embedder.params}, ids, np.ones_like(ids, bool)))[0])
    alone = np.stack(alone) / np.linalg.norm(alone, axis=1, keepdims=True)
    for batch_size in (1, 3, 64):   # token budgets of 1, 3 and 64 max-length texts
        np.testing.assert_allclose(embedder.encode(texts, batch_size=batch_size), alone, atol=2e-6)
    # dim cuts before normalising: the prefix of the embedding, renormalised
    prefix = alone[:, :8] / np.linalg.norm(alone[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(embedder.encode(texts, dim=8), prefix, atol=2e-6)


def test_misuse_is_refused(embedder):
    with pytest.raises(TypeError, match="sequence of texts"):
        embedder.encode("one text")
    with pytest.raises(ValueError, match="dim=0"):
        embedder.encode(["a"], dim=0)
    with pytest.raises(ValueError, match="batch_size=-1"):
        embedder.encode(["a"], batch_size=-1)
    with pytest.warns(UserWarning, match="dim=12 is not one of the trained Matryoshka sizes"):
        assert embedder.encode(["a", "b"], dim=12).shape == (2, 12)
