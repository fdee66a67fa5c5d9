"""Decoder inputs that are right by construction: a text's embedding does not depend on where its
row's padding is (right, left) or on packing, for last-token (and mean) pooling, causal or
bidirectional; and `Embedder.encode(task=...)` feeds the model the very tokens training gave a query
(the dataset's instruction prompt first, the end token last).
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

from gembed.data.batching import POSITIVE_SLOT, QUERY_SLOT, TrainBatches
from gembed.data.examples import Example
from gembed.data.mixture import DatasetSpec, TrainingDataset
from gembed.data.packing import pack
from gembed.embedder import Embedder
from gembed.model import EmbeddingModel, ModelConfig, init_params

LENGTH, VOCAB, PAD = 16, 97, 0


def decoder(attention: str, pooling: str, position_embedding: str = "rope") -> ModelConfig:
    """A tiny Llama-shaped decoder (RMSNorm, gated SiLU, grouped-query attention)."""
    return ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       mlp_dim=64, mlp_gated=True, mlp_activation="silu", norm="rmsnorm",
                       position_embedding=position_embedding, max_position_embeddings=LENGTH,
                       use_bias=False, attention_mask=attention, pooling=pooling)


def texts(seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(rng.integers(1, VOCAB, size=n)) for n in (1, 3, 7, 16, 5, 11, 2, 9)]


def padded(token_lists, side: str):
    ids = np.full((len(token_lists), LENGTH), PAD, np.int32)
    mask = np.zeros((len(token_lists), LENGTH), bool)
    for row, tokens in enumerate(token_lists):
        span = slice(0, len(tokens)) if side == "right" else slice(LENGTH - len(tokens), LENGTH)
        ids[row, span], mask[row, span] = tokens, True
    return ids, mask


@pytest.mark.parametrize("attention,pooling,position_embedding", [
    ("causal", "last", "rope"), ("bidirectional", "last", "rope"),
    ("causal", "mean", "rope"), ("bidirectional", "last", "learned")])
def test_embeddings_are_identical_right_padded_left_padded_and_packed(attention, pooling,
                                                                      position_embedding):
    config = decoder(attention, pooling, position_embedding)
    model = EmbeddingModel(config)
    params = init_params(config, jax.random.PRNGKey(0))
    token_lists = texts()
    right = model.apply({"params": params}, *padded(token_lists, "right"))
    left = model.apply({"params": params}, *padded(token_lists, "left"))
    rows = pack(token_lists, LENGTH, PAD)
    packed = model.apply({"params": params}, rows["token_ids"], rows["token_mask"],
                         segment_ids=rows["segment_ids"], positions=rows["positions"],
                         num_texts=len(token_lists))
    scale = np.abs(np.asarray(right)).max()
    for name, other in (("left", left), ("packed", packed)):
        error = np.abs(np.asarray(other) - np.asarray(right)).max()
        print(f"{attention} {pooling} {position_embedding}: max |{name} - right| = {error:.2e}")
        assert error <= 1e-5 * scale, name


class CharTokenizer:
    """One id per character; eos appended as the gembed tokenizers do."""

    kind, pad_id, eos_id, vocab_size = "test", 0, 1, 300

    def encode(self, texts, max_length, add_eos=False):
        ids = [[2 + ord(c) % 290 for c in text] for text in texts]
        if add_eos:
            return [row[:max_length - 1] + [self.eos_id] for row in ids]
        return [row[:max_length] for row in ids]


def test_encode_feeds_the_tokens_training_gave_queries_and_documents(monkeypatch):
    """Instruction prompt on the query side only, eos last, for a last-token model."""
    prompt = "Instruct: Given a docstring, retrieve the code\nQuery: "
    spec = DatasetSpec(name="code", data="x", query_prompt=prompt)
    examples = [Example(query=f"sort the list {i}", positive=f"def f{i}(x): return sorted(x)")
                for i in range(4)]
    tokenizer = CharTokenizer()
    batches = TrainBatches([TrainingDataset(spec, examples)], tokenizer, batch_size=4,
                           max_length=96, num_hard_negatives=0, seed=0, add_eos=True,
                           rows=slice(0, 4))
    batch, order = batches[0], batches.example_indices(0)
    trained = {}
    for row in range(4):
        for slot in (QUERY_SLOT, POSITIVE_SLOT):
            ids, mask = batch["token_ids"][row, slot], batch["token_mask"][row, slot]
            trained[(row, slot)] = list(ids[mask])
    config = decoder("causal", "last")
    embedder = Embedder(config, init_params(config, jax.random.PRNGKey(0)), tokenizer, 96,
                        {"code": prompt})
    fed: list[list[int]] = []

    def capture(params, ids, mask):
        fed.extend(list(i[m]) for i, m in zip(ids, mask) if m.any())
        return np.zeros((len(ids), config.embedding_size), np.float32)

    monkeypatch.setattr(embedder, "_embed", capture)
    embedder.encode([examples[i].query for i in order], task="code")
    embedder.encode([examples[i].positive for i in order])
    expected = [trained[(row, QUERY_SLOT)] for row in range(4)] + [
        trained[(row, POSITIVE_SLOT)] for row in range(4)]
    assert sorted(map(tuple, fed)) == sorted(map(tuple, expected))
    assert all(tokens[-1] == tokenizer.eos_id for tokens in expected)
    assert expected[0][:len(prompt)] == tokenizer.encode([prompt], 96)[0]
