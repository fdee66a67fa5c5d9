"""The model FLOP formula against XLA's own count of the compiled forward and training passes."""
import dataclasses

import jax
import jax.numpy as jnp
import pytest

from gembed.flops import datasheet_peak, forward_flops, train_flops
from gembed.model import EmbeddingModel, ModelConfig, init_params

BATCH, LENGTH = 2, 64
# Wide layers and relu keep the uncounted elementwise work (norms, activations, softmax) < 1%.
CONFIGS = {
    "mha_projection": ModelConfig(vocab_size=100, hidden_size=256, num_layers=2, num_heads=4,
                                  mlp_dim=1024, mlp_activation="relu", projection_dim=128),
    "gqa_gated": ModelConfig(vocab_size=100, hidden_size=256, num_layers=2, num_heads=8,
                             num_kv_heads=2, head_dim=64, mlp_dim=512, mlp_gated=True,
                             mlp_activation="relu"),
}


def xla_flops(fn, *args) -> float:
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


@pytest.mark.parametrize("name", CONFIGS)
def test_flop_formula_matches_xla_cost_analysis(name):
    config = dataclasses.replace(CONFIGS[name], remat="none")   # model FLOPs: nothing recomputed
    params = init_params(config, jax.random.key(0))
    token_ids = jnp.zeros((BATCH, LENGTH), jnp.int32)
    mask = jnp.ones((BATCH, LENGTH), bool)
    model = EmbeddingModel(config)

    def embed(params):
        return model.apply({"params": params}, token_ids, mask)

    expected = forward_flops(config, [LENGTH] * BATCH)
    assert expected <= xla_flops(embed, params) <= 1.01 * expected
    grad = jax.grad(lambda params: jnp.sum(embed(params)))
    expected = train_flops(config, [LENGTH] * BATCH)
    assert expected <= xla_flops(grad, params) <= 1.02 * expected


@pytest.mark.parametrize("kind, peak", [("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12),
                                        ("TPU v6 lite", 918e12), ("NVIDIA H100 80GB HBM3", 989e12),
                                        ("NVIDIA A100-SXM4-40GB", 312e12), ("cpu", None)])
def test_datasheet_peak_by_device_kind(kind, peak):
    assert datasheet_peak(kind) == peak
