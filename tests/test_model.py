"""The model against an independent float64 NumPy forward pass, plus its invariances and configs."""
import dataclasses
import functools
import math
import pathlib
import re

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from flax import traverse_util

from gembed.data.packing import pack
from gembed.errors import GembedUserError
from gembed.model import EmbeddingModel, Encoder, ModelConfig, init_params
from gembed.model.config import POOLINGS
from gembed.model.encoder import pool
from gembed.model.layers import Norm, attention_mask
from gembed.model.blocked_attention import blocked_attention
from gembed.model.softmax_attention import softmax_attention

MODEL_CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs" / "model"

SMALL = dict(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64,
             max_position_embeddings=16)
CONFIGS = {
    "prenorm_layernorm_learned_gelu_mha": ModelConfig(**SMALL),
    "prenorm_rmsnorm_rope_swiglu_gqa_causal": ModelConfig(
        **SMALL, norm="rmsnorm", position_embedding="rope", mlp_gated=True,
        mlp_activation="silu", num_kv_heads=2, attention_mask="causal", use_bias=False),
    "postnorm_bert": ModelConfig(
        **SMALL, norm_position="post", final_norm=False, embedding_norm=True,
        type_vocab_size=2, norm_eps=1e-12),
    "gemma_style_geglu_mqa_head_dim": ModelConfig(
        **SMALL, norm="rmsnorm", rmsnorm_unit_offset=True, embedding_scale=True,
        position_embedding="none", mlp_gated=True, mlp_activation="gelu_tanh", num_kv_heads=1,
        head_dim=16, use_bias=False, qkv_bias=True),
}
BIDIRECTIONAL = CONFIGS["prenorm_layernorm_learned_gelu_mha"]
CAUSAL = CONFIGS["prenorm_rmsnorm_rope_swiglu_gqa_causal"]
LENGTHS = np.array([8, 5, 1, 0])  # Real tokens per row; the last row is fully padded.


def random_params(config: ModelConfig, seed: int = 0) -> dict:
    """Params of init_params' shapes with random values (non-trivial norms and biases)."""
    shapes = traverse_util.flatten_dict(
        jax.eval_shape(lambda: init_params(config, jax.random.key(0))), sep="/")
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in shapes.items():
        values = rng.normal(0.0, 0.2, shape.shape)
        if name.endswith("/scale") and not config.rmsnorm_unit_offset:
            values = 1.0 + values
        params[name] = jnp.asarray(values, jnp.float32)
    return traverse_util.unflatten_dict(params, sep="/")


def batch(lengths=LENGTHS, length: int = 8, seed: int = 1):
    """Random token ids int32[B, length] and mask bool[B, length], right padded to `lengths`."""
    token_ids = np.random.default_rng(seed).integers(0, SMALL["vocab_size"], (len(lengths), length))
    mask = np.arange(length)[None, :] < np.asarray(lengths)[:, None]
    return jnp.asarray(token_ids, jnp.int32), jnp.asarray(mask)


@functools.lru_cache(maxsize=None)
def encoder_fn(config: ModelConfig):
    return jax.jit(lambda params, token_ids, mask: Encoder(config).apply(
        {"params": params["encoder"]}, token_ids, mask))


@functools.lru_cache(maxsize=None)
def params_for(config: ModelConfig) -> dict:
    return random_params(config)


# ---------------------------------------------------------------------------------------------
# Independent float64 NumPy reference, reading the params by their frozen names.

def ref_norm(config, params, name, x):
    if config.norm == "layernorm":
        x = x - x.mean(-1, keepdims=True)
    x = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + config.norm_eps)
    scale = params[f"{name}/scale"]
    x = x * (1.0 + scale if config.rmsnorm_unit_offset else scale)
    return x + params[f"{name}/bias"] if config.norm == "layernorm" else x


def ref_dense(params, name, x):
    y = x @ params[f"{name}/kernel"]
    return y + params[f"{name}/bias"] if f"{name}/bias" in params else y


def ref_activation(name, x):
    if name == "gelu":
        return 0.5 * x * (1.0 + scipy.special.erf(x / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    if name == "relu":
        return np.maximum(x, 0.0)
    return x / (1.0 + np.exp(-x))


def ref_rope(config, x):
    """x: [B, L, heads, H]; pairs (i, i + H/2) rotate as the complex number x_i + j x_{i+H/2}."""
    half = x.shape[-1] // 2
    frequencies = config.rope_theta ** (-2.0 * np.arange(half) / x.shape[-1])
    rotation = np.exp(1j * np.arange(x.shape[1])[:, None] * frequencies[None, :])[None, :, None, :]
    rotated = (x[..., :half] + 1j * x[..., half:]) * rotation
    return np.concatenate([rotated.real, rotated.imag], axis=-1)


def ref_attention(config, params, name, x, mask):
    batch_size, length, _ = x.shape
    heads, kv_heads = config.num_heads, config.effective_num_kv_heads
    head_dim = config.effective_head_dim
    q = ref_dense(params, f"{name}/query", x).reshape(batch_size, length, heads, head_dim)
    k = ref_dense(params, f"{name}/key", x).reshape(batch_size, length, kv_heads, head_dim)
    v = ref_dense(params, f"{name}/value", x).reshape(batch_size, length, kv_heads, head_dim)
    if config.position_embedding == "rope":
        q, k = ref_rope(config, q), ref_rope(config, k)
    kv_index = np.arange(heads) // (heads // kv_heads)  # Query head n reads key/value head n // group.
    k, v = k[:, :, kv_index], v[:, :, kv_index]
    logits = np.einsum("bqnh,bknh->bnqk", q, k) / math.sqrt(head_dim)
    allowed = np.broadcast_to(mask[:, None, None, :], logits.shape)
    if config.attention_mask == "causal":
        allowed = allowed & np.tril(np.ones((length, length), bool))
    logits = np.where(allowed, logits, -1e30)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bnqk,bknh->bqnh", probs, v).reshape(batch_size, length, heads * head_dim)
    return ref_dense(params, f"{name}/output", out)


def ref_mlp(config, params, name, x):
    up = ref_dense(params, f"{name}/up", x)
    if config.mlp_gated:
        hidden = ref_activation(config.mlp_activation, ref_dense(params, f"{name}/gate", x)) * up
    else:
        hidden = ref_activation(config.mlp_activation, up)
    return ref_dense(params, f"{name}/down", hidden)


def ref_encoder(config, params, token_ids, mask):
    """float64[B, L, D] final hidden states."""
    params = {name: np.asarray(value, np.float64)
              for name, value in traverse_util.flatten_dict(params["encoder"], sep="/").items()}
    token_ids, mask = np.asarray(token_ids), np.asarray(mask)
    x = params["token_embedding/embedding"][token_ids]
    if config.embedding_scale:
        x = x * math.sqrt(config.hidden_size)
    if config.position_embedding == "learned":
        x = x + params["position_embedding/embedding"][: token_ids.shape[1]]
    if config.type_vocab_size:
        x = x + params["token_type_embedding/embedding"][0]
    if config.embedding_norm:
        x = ref_norm(config, params, "embedding_norm", x)
    for i in range(config.num_layers):
        for norm, sublayer in ((f"layer_{i}/attention_norm",
                                lambda y: ref_attention(config, params, f"layer_{i}/attention", y, mask)),
                               (f"layer_{i}/mlp_norm",
                                lambda y: ref_mlp(config, params, f"layer_{i}/mlp", y))):
            if config.norm_position == "pre":
                x = x + sublayer(ref_norm(config, params, norm, x))
            else:
                x = ref_norm(config, params, norm, x + sublayer(x))
    if config.final_norm:
        x = ref_norm(config, params, "final_norm", x)
    return x


def ref_pool(hidden, mask, pooling):
    hidden, mask = np.asarray(hidden, np.float64), np.asarray(mask)
    lengths = mask.sum(1)
    if pooling == "mean":
        return np.stack([h[:n].mean(0) if n else np.zeros(h.shape[-1]) for h, n in zip(hidden, lengths)])
    if pooling == "first":
        return hidden[:, 0]
    return np.stack([h[max(n - 1, 0)] for h, n in zip(hidden, lengths)])


# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
def test_encoder_matches_numpy_reference(name):
    config = CONFIGS[name]
    params = params_for(config)
    token_ids, mask = batch()
    hidden = encoder_fn(config)(params, token_ids, mask)
    assert hidden.shape == (4, 8, config.hidden_size) and hidden.dtype == jnp.float32
    assert np.isfinite(np.asarray(hidden)).all()
    np.testing.assert_allclose(hidden, ref_encoder(config, params, token_ids, mask), rtol=1e-5, atol=1e-5)


def test_param_names_and_shapes_are_frozen():
    config = dataclasses.replace(
        CONFIGS["postnorm_bert"], num_layers=1, projection_dim=16, num_kv_heads=2, mlp_gated=True)
    shapes = {name: leaf.shape for name, leaf in traverse_util.flatten_dict(
        jax.eval_shape(lambda: init_params(config, jax.random.key(0))), sep="/").items()}
    norm = lambda prefix: {f"{prefix}/scale": (32,), f"{prefix}/bias": (32,)}
    dense = lambda prefix, fan_in, fan_out: {f"{prefix}/kernel": (fan_in, fan_out), f"{prefix}/bias": (fan_out,)}
    expected = {
        "log_scale": (),
        "encoder/token_embedding/embedding": (50, 32),
        "encoder/position_embedding/embedding": (16, 32),
        "encoder/token_type_embedding/embedding": (2, 32),
        **norm("encoder/embedding_norm"),
        **norm("encoder/layer_0/attention_norm"),
        **dense("encoder/layer_0/attention/query", 32, 32),
        **dense("encoder/layer_0/attention/key", 32, 16),
        **dense("encoder/layer_0/attention/value", 32, 16),
        **dense("encoder/layer_0/attention/output", 32, 32),
        **norm("encoder/layer_0/mlp_norm"),
        **dense("encoder/layer_0/mlp/gate", 32, 64),
        **dense("encoder/layer_0/mlp/up", 32, 64),
        **dense("encoder/layer_0/mlp/down", 64, 32),
        **dense("projection", 32, 16),
    }
    assert shapes == expected


def test_param_names_without_optional_parts():
    config = dataclasses.replace(CAUSAL, num_layers=1, qkv_bias=True)
    names = set(traverse_util.flatten_dict(
        jax.eval_shape(lambda: init_params(config, jax.random.key(0))), sep="/"))
    layer = "encoder/layer_0"
    assert names == {
        "log_scale", "encoder/token_embedding/embedding", "encoder/final_norm/scale",
        f"{layer}/attention_norm/scale", f"{layer}/mlp_norm/scale",
        *(f"{layer}/attention/{p}/{w}" for p in ("query", "key", "value") for w in ("kernel", "bias")),
        f"{layer}/attention/output/kernel",
        *(f"{layer}/mlp/{p}/kernel" for p in ("gate", "up", "down")),
    }


def test_init_params_values():
    config = ModelConfig(**{**SMALL, "num_layers": 1}, type_vocab_size=2, projection_dim=16)
    params = traverse_util.flatten_dict(init_params(config, jax.random.key(0)), sep="/")
    assert all(value.dtype == jnp.float32 for value in params.values())
    np.testing.assert_allclose(params["log_scale"], math.log(20.0), rtol=1e-6)
    for name, value in params.items():
        if name.endswith("/scale"):
            np.testing.assert_array_equal(value, 1.0)
        elif name.endswith("/bias"):
            np.testing.assert_array_equal(value, 0.0)
    for name in ("encoder/token_embedding/embedding", "encoder/layer_0/mlp/up/kernel"):
        assert 0.017 < float(jnp.std(params[name])) < 0.023
    unit_offset = ModelConfig(**SMALL, norm="rmsnorm", rmsnorm_unit_offset=True)
    norm_params = Norm(unit_offset).init(jax.random.key(0), jnp.ones((1, 32)))["params"]
    assert set(norm_params) == {"scale"}
    np.testing.assert_array_equal(norm_params["scale"], 0.0)


@pytest.mark.parametrize("pooling", ["mean", "first", "last"])
def test_pool_matches_numpy(pooling):
    hidden = np.random.default_rng(2).normal(size=(4, 8, 6)).astype(np.float32)
    _, mask = batch()
    pooled = pool(jnp.asarray(hidden), mask, pooling)
    np.testing.assert_allclose(pooled, ref_pool(hidden, mask, pooling), rtol=1e-6, atol=1e-6)


def test_embedding_model_pools_and_projects():
    config = dataclasses.replace(BIDIRECTIONAL, pooling="last", projection_dim=16, output_sizes=(8, 16))
    params = params_for(config)
    token_ids, mask = batch()
    embeddings = jax.jit(EmbeddingModel(config).apply)({"params": params}, token_ids, mask)
    assert embeddings.shape == (4, 16) and embeddings.dtype == jnp.float32
    pooled = ref_pool(ref_encoder(config, params, token_ids, mask), mask, "last")
    projection = {name: np.asarray(value, np.float64) for name, value in params["projection"].items()}
    expected = pooled @ projection["kernel"] + projection["bias"]
    np.testing.assert_allclose(embeddings, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [BIDIRECTIONAL, CAUSAL], ids=["bidirectional", "causal"])
def test_appending_padding_leaves_embedding_unchanged(config):
    params = params_for(config)
    lengths = np.array([6, 3, 1, 2])
    token_ids, mask = batch(lengths, length=6)
    padded_ids, padded_mask = batch(lengths, length=8, seed=3)  # Different ids at the pad positions.
    padded_ids = padded_ids.at[:, :6].set(token_ids)
    for pooling in ("mean", "last"):
        short = pool(encoder_fn(config)(params, token_ids, mask), mask, pooling)
        long = pool(encoder_fn(config)(params, padded_ids, padded_mask), padded_mask, pooling)
        np.testing.assert_allclose(long, short, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["prenorm_layernorm_learned_gelu_mha",
                                  "prenorm_rmsnorm_rope_swiglu_gqa_causal"])   # learned / rotary positions
def test_packed_rows_embed_each_text_as_alone(name):
    """Texts packed several to a row (segment-aware attention, per-text positions) get the
    embeddings of the plain padded forward, for every pooling."""
    lengths = np.array([8, 5, 1, 3, 6, 2])
    token_ids, mask = batch(lengths, length=8)
    token_lists = [list(np.asarray(ids)[:n]) for ids, n in zip(token_ids, lengths)]
    packed = {k: jnp.asarray(v) for k, v in pack(token_lists, row_length=10, pad_id=0,
                                                 keep=[True] * 5 + [False], row_multiple=1).items()}
    assert packed["token_ids"].shape[0] == 3   # texts 0+2 | 4+3 | 1; text 5 left out
    for pooling in POOLINGS:
        config = dataclasses.replace(CONFIGS[name], pooling=pooling)
        model = EmbeddingModel(config)
        plain = model.apply({"params": params_for(CONFIGS[name])}, token_ids, mask)
        together = jax.jit(functools.partial(model.apply, num_texts=6))(
            {"params": params_for(CONFIGS[name])}, packed["token_ids"], packed["token_mask"],
            segment_ids=packed["segment_ids"], positions=packed["positions"])
        np.testing.assert_allclose(together[:5], plain[:5], rtol=1e-5, atol=1e-5, err_msg=pooling)
        np.testing.assert_array_equal(together[5], 0.0)


def test_causal_attention_ignores_later_tokens():
    token_ids, mask = batch(np.array([8, 8, 8, 8]))
    changed = token_ids.at[:, 5].set((token_ids[:, 5] + 1) % SMALL["vocab_size"])
    for config, later_changes_earlier in ((CAUSAL, False), (BIDIRECTIONAL, True)):
        before = encoder_fn(config)(params_for(config), token_ids, mask)
        after = encoder_fn(config)(params_for(config), changed, mask)
        earlier_diff = float(jnp.max(jnp.abs(after[:, :5] - before[:, :5])))
        assert (earlier_diff > 1e-3) == later_changes_earlier, (config.attention_mask, earlier_diff)
        assert float(jnp.max(jnp.abs(after[:, 5:] - before[:, 5:]))) > 1e-3


@pytest.mark.parametrize("is_causal", [False, True])
def test_softmax_attention_and_its_gradient_match_autodiff_of_jax_attention(is_causal):
    """The hand-written backward against autodiff of `jax.nn.dot_product_attention`: packed
    segments, padding queries that see no key (uniform attention), grouped key/value heads."""
    rng = np.random.default_rng(0)
    query, weights = (jnp.asarray(rng.standard_normal((2, 8, 4, 8)), jnp.float32) for _ in range(2))
    key, value = (jnp.asarray(rng.standard_normal((2, 8, 2, 8)), jnp.float32) for _ in range(2))
    segment_ids = jnp.asarray([[0, 0, 0, 1, 1, 2, 2, 2], [3, 3, 3, 3, 3, 4, 4, 4]])
    mask = jnp.arange(8)[None] < jnp.asarray([[8], [5]])
    visible = attention_mask(mask, segment_ids).dense()

    def weighted_sum(attend):
        return jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v) * weights),
                                  argnums=(0, 1, 2))(query, key, value)

    ours = weighted_sum(lambda q, k, v: softmax_attention(q, k, v, visible, is_causal))
    reference = weighted_sum(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, mask=visible, is_causal=is_causal))
    for name, got, want in zip(("value", "query grad", "key grad", "value grad"),
                               jax.tree.leaves(ours), jax.tree.leaves(reference)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("batch, length", [(3, 70), (1, 64), (4, 130)])
def test_blocked_attention_matches_jax_attention(batch, length):
    """The encode-time forward over key blocks (odd batch and lengths that are no multiple of the
    block pad both) against `jax.nn.dot_product_attention`: packed segments, causal masks, padding
    queries that see no key."""
    rng = np.random.default_rng(1)
    query, key, value = (jnp.asarray(rng.standard_normal((batch, length, 4, 8)), jnp.float32)
                         for _ in range(3))
    lengths = rng.integers(1, length + 1, batch)
    mask = jnp.arange(length)[None] < jnp.asarray(lengths)[:, None]
    segment_ids = jnp.asarray(np.arange(length)[None] // 37 + np.arange(batch)[:, None] * 10)
    visible = attention_mask(mask, segment_ids).dense()
    causal = visible & jnp.tril(jnp.ones((length, length), bool))
    for mask_of_keys in (visible, causal):
        np.testing.assert_allclose(
            jax.jit(blocked_attention)(query, key, value, mask_of_keys),
            jax.nn.dot_product_attention(query, key, value, mask=mask_of_keys), atol=2e-6)


def test_bfloat16_compute_is_close_to_float32_with_float32_params():
    config = dataclasses.replace(BIDIRECTIONAL, dtype="bfloat16")
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
    params = params_for(BIDIRECTIONAL)
    token_ids, mask = batch()
    low = encoder_fn(config)(params, token_ids, mask)
    high = encoder_fn(BIDIRECTIONAL)(params, token_ids, mask)
    assert low.dtype == jnp.float32 and np.isfinite(np.asarray(low)).all()
    error = float(jnp.max(jnp.abs(low - high)))
    assert 0.0 < error < 0.15, error  # Nonzero: the computation really ran in bfloat16.


def test_dropout_only_when_not_deterministic():
    config = dataclasses.replace(BIDIRECTIONAL, dropout_rate=0.5)
    params = params_for(BIDIRECTIONAL)
    token_ids, mask = batch()
    model = Encoder(config)
    apply = jax.jit(lambda rng, deterministic: model.apply(
        {"params": params["encoder"]}, token_ids, mask, deterministic=deterministic,
        rngs={"dropout": rng}), static_argnums=1)
    np.testing.assert_allclose(apply(jax.random.key(0), True),   # two compilations: rounding
                               encoder_fn(BIDIRECTIONAL)(params, token_ids, mask), atol=1e-5)
    first, second = apply(jax.random.key(0), False), apply(jax.random.key(1), False)
    assert float(jnp.max(jnp.abs(first - second))) > 1e-2


def test_learned_positions_reject_long_sequences():
    token_ids, mask = batch(np.array([17]), length=17)
    with pytest.raises(GembedUserError, match="max_position_embeddings=16"):
        jax.eval_shape(lambda: Encoder(BIDIRECTIONAL).apply(
            {"params": params_for(BIDIRECTIONAL)["encoder"]}, token_ids, mask))


def test_invalid_choice_message():
    with pytest.raises(GembedUserError) as error:
        ModelConfig(pooling="maen")
    first_line = str(error.value).splitlines()[0]  # gin appends an "In call to configurable" line.
    assert first_line == ("ModelConfig.pooling='maen' is not one of 'mean', 'first', 'last'; "
                          "fix the binding in your model gin file.")


@pytest.mark.parametrize("fields, message", [
    (dict(num_heads=4, num_kv_heads=3), "ModelConfig.num_kv_heads=3 must divide num_heads=4"),
    (dict(hidden_size=30, num_heads=4), "ModelConfig.num_heads=4 must divide hidden_size=30"),
    (dict(output_sizes=(32, 48)), "ModelConfig.output_sizes=(32, 48) must be strictly increasing"),
    (dict(projection_dim=16, output_sizes=(16, 8)), "ModelConfig.output_sizes=(16, 8)"),
    (dict(norm="batchnorm"), "ModelConfig.norm='batchnorm' is not one of 'layernorm', 'rmsnorm'"),
    (dict(dtype="float16"), "ModelConfig.dtype='float16' is not one of 'float32', 'bfloat16'"),
    (dict(rmsnorm_unit_offset=True), "ModelConfig.rmsnorm_unit_offset=True needs norm='rmsnorm'"),
    (dict(position_embedding="rope", head_dim=7), "ModelConfig.head_dim=7 must be even for RoPE"),
    (dict(dropout_rate=1.0), "ModelConfig.dropout_rate=1.0 must be in"),
])
def test_invalid_values_are_user_errors(fields, message):
    with pytest.raises(GembedUserError, match="^" + re.escape(message)):
        ModelConfig(**fields)


@pytest.mark.parametrize("name, min_params, max_params", [
    ("tiny", 0.5e6, 1.0e6),
    ("small", 10e6, 30e6),
    ("base", 80e6, 200e6),
    ("large", 250e6, 500e6),
])
def test_gin_configs_build(name, min_params, max_params):
    gin.clear_config()
    try:
        gin.parse_config_file(str(MODEL_CONFIGS / f"{name}.gin"))
        config = ModelConfig()
    finally:
        gin.clear_config()
    assert config.vocab_size == 8000 and hash(config) == hash(dataclasses.replace(config))
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))
    assert min_params < count < max_params, count
