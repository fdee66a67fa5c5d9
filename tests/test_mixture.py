"""Mixtures (weights, single-dataset batches, prompts) and the TFDS source, down to `gembed train`."""
from __future__ import annotations

import collections
import functools
import json

import gin
import jax
import numpy as np
import pytest

from gembed import cli
from gembed.data import load_builtin, train_sentencepiece, write_jsonl
from gembed.config import LossConfig
from gembed.data.batching import TrainBatches
from gembed.data.examples import Example
from gembed.data.mixture import DatasetSpec, TrainingDataset
from gembed.data.tfds_pairs import TfdsExamples, prepare_tfds_pairs
from gembed.errors import GembedUserError
from gembed.losses.contrastive import text_keys
from gembed.model import ModelConfig, init_params
from gembed.objective import batch_loss


class CharTokenizer:
    """Stands in for a real tokenizer: one id per character."""

    pad_id = 0

    def encode(self, texts, max_length, add_eos=False):
        return [[1 + ord(c) % 997 for c in text[:max_length]] for text in texts]


def two_datasets(**specs):
    docs, code = load_builtin("stdlib_docs", "train")[:300], load_builtin("stdlib_code", "train")[:200]
    return [TrainingDataset(DatasetSpec(name="docs", data="builtin:stdlib_docs", weight=0.8,
                                        **specs), docs),
            TrainingDataset(DatasetSpec(name="code", data="builtin:stdlib_code", weight=0.2), code)]


def test_each_batch_comes_from_one_dataset_in_proportion_to_its_weight():
    datasets = two_datasets()
    batches = TrainBatches(datasets, CharTokenizer(), batch_size=16, max_length=32,
                           num_hard_negatives=0, seed=3, add_eos=False, rows=slice(0, 16))
    counts = collections.Counter()
    for step in range(500):
        index = batches.dataset_index(step)
        counts[datasets[index].spec.name] += 1
        examples = [datasets[index].examples[i] for i in batches.example_indices(step)]
        expected_keys = text_keys([t for e in examples for t in (e.query, e.positive)])
        np.testing.assert_array_equal(batches[step]["text_keys"].reshape(-1, 2), expected_keys)
    assert abs(counts["docs"] / 500 - 0.8) <= 0.05 and abs(counts["code"] / 500 - 0.2) <= 0.05


def test_prompts_go_on_queries_and_documents_of_their_dataset_only():
    datasets = two_datasets(query_prompt="task: search | query: ", document_prompt="{")
    batches = TrainBatches(datasets, CharTokenizer(), batch_size=8, max_length=64,
                           num_hard_negatives=0, seed=0, add_eos=False, rows=slice(0, 8))
    seen = set()
    for step in range(10):
        index = batches.dataset_index(step)
        example = datasets[index].examples[batches.example_indices(step)[0]]
        spec = datasets[index].spec
        expected = CharTokenizer().encode(
            [spec.query_prompt + example.query, spec.document_prompt + example.positive], 64)
        ids = batches[step]["token_ids"][0]
        for slot in range(2):
            np.testing.assert_array_equal(ids[slot, :len(expected[slot])], expected[slot])
        seen.add(spec.name)
    assert seen == {"docs", "code"}


def test_a_dataset_smaller_than_the_batch_is_refused():
    with pytest.raises(GembedUserError, match="fewer than BATCH_SIZE=512"):
        TrainBatches(two_datasets(), CharTokenizer(), batch_size=512, max_length=8,
                     num_hard_negatives=0, seed=0, add_eos=False, rows=slice(0, 512))


@pytest.fixture(scope="module")
def prepared_tfds(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    examples = load_builtin("stdlib_code", "train")[:400]
    write_jsonl(root / "train.jsonl", examples)
    write_jsonl(root / "test.jsonl", load_builtin("stdlib_code", "test")[:50])
    prepare_tfds_pairs({"train": root / "train.jsonl", "test": root / "test.jsonl"},
                       name="stdlib_code", data_dir=root / "data")
    return root, examples


def test_tfds_builder_prepares_jsonl_and_reads_it_back_by_random_access(prepared_tfds):
    root, examples = prepared_tfds
    gin.parse_config(f"TfdsOptions.data_dir = '{root / 'data'}'")
    source = TfdsExamples("tfds:gembed_pairs/stdlib_code:train")
    assert len(source) == len(examples)
    by_text = lambda e: (e.query, e.positive)  # noqa: E731
    assert sorted(source[:], key=by_text) == sorted(examples, key=by_text)
    with pytest.raises(GembedUserError, match="cannot open this TFDS split"):
        TfdsExamples("tfds:gembed_pairs/stdlib_code:validation")


def test_gembed_train_on_a_tfds_and_builtin_mixture_logs_each_steps_dataset(prepared_tfds):
    root, examples = prepared_tfds
    train_sentencepiece([t for e in examples for t in (e.query, e.positive)], 500,
                        root / "sp.model")
    (root / "mixture.gin").write_text(f"""
include 'prefinetune.gin'
TRAIN_DATA = None
TfdsOptions.data_dir = '{root / 'data'}'
TrainConfig.datasets = [@code/DatasetSpec(), @docs/DatasetSpec()]
code/DatasetSpec.name = 'code'
code/DatasetSpec.data = 'tfds:gembed_pairs/stdlib_code:train'
code/DatasetSpec.weight = 0.8
code/DatasetSpec.query_prompt = 'task: code retrieval | query: '
docs/DatasetSpec.name = 'docs'
docs/DatasetSpec.data = 'builtin:stdlib_docs'
docs/DatasetSpec.weight = 0.2
""")
    params = ["TRAIN_STEPS=100", "BATCH_SIZE=8", "MAX_LENGTH=16", "LOG_EVERY=10",
              "CHECKPOINT_EVERY=100", "VOCAB_SIZE=500", f"TrainConfig.tokenizer='{root / 'sp.model'}'"]
    workdir = root / "run"
    assert cli.main(["train", "--gin_file=model/tiny.gin", f"--gin_file={root / 'mixture.gin'}",
                     f"--workdir={workdir}", *[f"--gin_param={p}" for p in params]]) == 0
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    totals = collections.Counter()
    for line in lines:
        totals.update(line["steps_per_dataset"])
    assert totals == {"code": 80, "docs": 20}
    assert len({line["examples_digest"] for line in lines}) == len(lines)
    assert json.loads((workdir / "task_prompts.json").read_text()) == {
        "code": "task: code retrieval | query: "}


def test_length_buckets_pad_to_the_next_power_of_two_and_keep_every_token():
    datasets = two_datasets()
    kwargs = dict(batch_size=8, max_length=512, num_hard_negatives=0, seed=0, add_eos=False,
                  rows=slice(0, 8))
    fixed = TrainBatches(datasets, CharTokenizer(), **kwargs)
    bucketed = TrainBatches(datasets, CharTokenizer(), length_buckets=True, **kwargs)
    lengths = set()
    for step in range(20):
        full, short = fixed[step], bucketed[step]
        longest = full["token_mask"].sum(-1).max()
        length = short["token_ids"].shape[-1]
        assert length == min(512, max(16, 1 << int(longest - 1).bit_length()))
        np.testing.assert_array_equal(short["token_ids"], full["token_ids"][..., :length])
        np.testing.assert_array_equal(short["token_mask"], full["token_mask"][..., :length])
        assert not full["token_mask"][..., length:].any()
        lengths.add(length)
    assert len(lengths) > 1


@pytest.mark.parametrize("groups", [1, 2])
def test_packed_batches_keep_every_text_and_give_the_padded_loss_and_gradients(groups):
    docs = load_builtin("stdlib_docs", "train")[:64]
    examples = [Example(e.query, e.positive, negatives=(docs[i - 1].positive,) if i % 3 else ())
                for i, e in enumerate(docs)]
    datasets = [TrainingDataset(DatasetSpec(name="docs", data="builtin:stdlib_docs"), examples)]
    kwargs = dict(batch_size=8, max_length=64, num_hard_negatives=1, seed=0, add_eos=False,
                  rows=slice(0, 8))
    padded = TrainBatches(datasets, CharTokenizer(), **kwargs)[0]
    packed = TrainBatches(datasets, CharTokenizer(), pack_groups=groups, **kwargs)[0]
    assert packed["token_ids"].shape[:1] == (groups,) and packed["token_ids"].shape[1] % 4 == 0
    assert packed["token_ids"].size <= padded["token_ids"].size
    flat_ids, flat_mask = padded["token_ids"].reshape(-1, 64), padded["token_mask"].reshape(-1, 64)
    texts_per_group = flat_ids.shape[0] // groups
    for text in range(flat_ids.shape[0]):   # each text whole, in its own example's group
        group, local = divmod(text, texts_per_group)
        in_text = packed["token_mask"][group] & (packed["segment_ids"][group] == local)
        np.testing.assert_array_equal(packed["token_ids"][group][in_text], flat_ids[text][flat_mask[text]])
        np.testing.assert_array_equal(packed["positions"][group][in_text], np.arange(flat_mask[text].sum()))

    config = ModelConfig(vocab_size=1000, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32,
                         max_position_embeddings=64)
    params = init_params(config, jax.random.key(0))
    loss_and_grads = jax.jit(jax.value_and_grad(
        functools.partial(batch_loss, rng=None, model_config=config, loss_config=LossConfig()),
        has_aux=True))
    (padded_loss, _), padded_grads = loss_and_grads(params, padded)
    (packed_loss, _), packed_grads = loss_and_grads(params, packed)
    np.testing.assert_allclose(packed_loss, padded_loss, rtol=1e-5)
    for packed_grad, padded_grad in zip(jax.tree.leaves(packed_grads), jax.tree.leaves(padded_grads)):
        # float32 sums in another order: errors scale with the leaf's largest entry.
        np.testing.assert_allclose(packed_grad, padded_grad, rtol=1e-4,
                                   atol=max(1e-6, 1e-5 * float(np.max(np.abs(padded_grad)))))
