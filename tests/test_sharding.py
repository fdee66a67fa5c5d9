"""Sharding rules (experiments/configs/sharding/fsdp.gin) checked on abstract shapes only.

`jax.eval_shape` gives every TrainState leaf of the model configs without allocating them; the
rules must divide each leaf on the meshes a user is likely to run, and shard most of the bytes.
"""
import math

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from gembed.config import TrainConfig, parse_gin
from gembed.errors import GembedUserError
from gembed.model import ModelConfig
from gembed.sharding import ShardingConfig, leaf_spec, tree_specs
from gembed.train import init_state, make_optimizer


def abstract_state(model_gin: str):
    parse_gin([model_gin, "prefinetune.gin", "sharding/fsdp.gin"], ["TRAIN_DATA='unused.jsonl'"])
    model = ModelConfig()
    state = jax.eval_shape(lambda: init_state(model, make_optimizer(TrainConfig()), seed=0))
    return state, ShardingConfig().param_rules


def parts(spec: PartitionSpec, axis_sizes: dict[str, int]) -> int:
    """Into how many pieces a leaf with `spec` is split."""
    return math.prod(axis_sizes[name] for entry in spec if entry is not None
                     for name in (entry if isinstance(entry, tuple) else (entry,)))


@pytest.mark.parametrize("model_gin", ["model/small.gin", "model/base.gin", "model/large.gin"])
@pytest.mark.parametrize("data, model", [(8, 1), (4, 2), (16, 4), (32, 4)])
def test_fsdp_rules_divide_every_leaf_and_split_every_matrix_over_all_devices(model_gin, data, model):
    state, rules = abstract_state(model_gin)
    axis_sizes = {"data": data, "model": model}
    specs = tree_specs(state, rules, axis_sizes)   # raises on any rule that does not divide
    leaves = jax.tree_util.tree_leaves_with_path(state)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    matrices = [(path, spec) for (path, leaf), spec in zip(leaves, spec_leaves, strict=True)
                if leaf.ndim >= 2]
    assert len(matrices) >= 3 * 6 * ModelConfig().num_layers   # q k v o up down: params, mu, nu
    for path, spec in matrices:   # params and both Adam moments; only vectors stay whole
        assert parts(spec, axis_sizes) == data * model, jax.tree_util.keystr(path)


def test_rules_name_the_leaf_they_cannot_split():
    with pytest.raises(GembedUserError, match=r"mlp/up/kernel.*\(64, 256\).*3 parts"):
        leaf_spec("params/encoder/layer_0/mlp/up/kernel", (64, 256), (("up/kernel", ("data",)),),
                  {"data": 3, "model": 1})
    with pytest.raises(GembedUserError, match="rank-2"):
        leaf_spec("params/projection/bias", (64,), (("projection", ("data", None)),),
                  {"data": 1, "model": 1})
    with pytest.raises(GembedUserError, match="'modle'"):
        ShardingConfig(param_rules=(("kernel", ("modle",)),))


def test_first_matching_rule_wins_and_unmatched_leaves_are_replicated():
    rules = (("attention/.*/kernel$", ("data", "model")), ("kernel$", (None, "data")))
    sizes = {"data": 2, "model": 2}
    assert leaf_spec("opt_state/1/0/mu/encoder/layer_0/attention/query/kernel", (8, 8), rules,
                     sizes) == PartitionSpec("data", "model")
    assert leaf_spec("params/projection/kernel", (8, 8), rules, sizes) == PartitionSpec(None, "data")
    assert leaf_spec("params/log_scale", (), rules, sizes) == PartitionSpec()
    assert np.all([leaf_spec("rng", (2,), rules, sizes) == PartitionSpec()])
