"""ModelConfig.matmul_precision: bfloat16 matmul inputs with float32 sums, forward and backward,
against NumPy on the same rounded inputs, and the encoder's embeddings against float32 ones."""
import dataclasses
import json

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from gembed import cpu_matmul_speed, xla_cpu_flags
from gembed.model import EmbeddingModel, ModelConfig, init_params
from gembed.model import matmul_precision
from gembed.model.matmul_precision import matmul_in, matmul_input_dtype

CONFIG = ModelConfig(vocab_size=300, hidden_size=64, num_layers=3, num_heads=4, mlp_dim=128,
                     max_position_embeddings=64)


def rounded(x) -> np.ndarray:
    """float64 values of x rounded to bfloat16."""
    return np.asarray(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16), np.float64)


def test_matmul_in_and_its_gradients_are_float64_sums_of_bfloat16_rounded_operands():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 48)).astype(np.float32)
    w = rng.normal(size=(48, 24)).astype(np.float32)
    g = rng.normal(size=(3, 5, 24)).astype(np.float32)
    output, pullback = jax.vjp(lambda x, w: matmul_in(jnp.bfloat16, x, w), x, w)
    x_gradient, w_gradient = pullback(jnp.asarray(g))
    assert output.dtype == x_gradient.dtype == w_gradient.dtype == jnp.float32
    np.testing.assert_allclose(output, rounded(x) @ rounded(w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_gradient, rounded(g) @ rounded(w).T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(w_gradient, np.einsum("bli,blo->io", rounded(x), rounded(g)),
                               rtol=1e-5, atol=1e-4)
    # the float32 products differ from these by more than float32 rounding
    assert np.abs(np.asarray(x, np.float64) @ w - rounded(x) @ rounded(w)).max() > 1e-3


def encode(config: ModelConfig, params, ids, mask) -> np.ndarray:
    embeddings = np.asarray(EmbeddingModel(config).apply({"params": params}, ids, mask))
    return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)


def test_bfloat16_embeddings_stay_within_cosine_0_9999_of_float32_ones():
    params = init_params(CONFIG, jax.random.key(0))
    rng = np.random.default_rng(1)
    ids = rng.integers(1, CONFIG.vocab_size, (16, 48)).astype(np.int32)
    mask = np.arange(48)[None] < rng.integers(4, 49, (16, 1))
    exact = encode(dataclasses.replace(CONFIG, matmul_precision="float32"), params, ids, mask)
    fast = encode(dataclasses.replace(CONFIG, matmul_precision="bfloat16"), params, ids, mask)
    cosines = np.sum(exact * fast, axis=1)
    assert cosines.min() >= 0.9999
    assert np.abs(exact - fast).max() > 1e-6   # the setting changed the computation


def matmul_input_dtypes(function, *args) -> set:
    """The operand dtypes of every matmul in the jaxpr of function(*args): dot_generals whose
    operands both keep a free axis (not the row-wise dot products of attention's backward)."""
    found = set()

    def is_matmul(equation) -> bool:
        contracted, batch = equation.params["dimension_numbers"]   # each an (lhs, rhs) pair
        return all(var.aval.ndim > len(c) + len(b)
                   for var, c, b in zip(equation.invars, contracted, batch))

    def walk(jaxpr):
        for equation in jaxpr.eqns:
            if equation.primitive.name == "dot_general" and is_matmul(equation):
                found.update(str(var.aval.dtype) for var in equation.invars)
            for value in equation.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)
    walk(jax.make_jaxpr(function)(*args).jaxpr)
    return found


@pytest.mark.parametrize("precision, dtypes", [("bfloat16", {"bfloat16"}),
                                               ("float32", {"float32"})])
def test_every_matmul_of_a_training_gradient_takes_the_chosen_inputs(precision, dtypes):
    config = dataclasses.replace(CONFIG, matmul_precision=precision)
    params = init_params(config, jax.random.key(0))
    ids = np.ones((2, 8), np.int32)
    mask = np.ones((2, 8), bool)

    def loss(params):
        return jnp.sum(EmbeddingModel(config).apply({"params": params}, ids, mask) ** 2)
    assert matmul_input_dtypes(jax.grad(loss), params) == dtypes


def test_auto_takes_bfloat16_only_on_a_cpu_where_it_is_faster_at_jax_default_precision(
        monkeypatch):
    auto = dataclasses.replace(CONFIG, matmul_precision="auto")
    monkeypatch.setattr(matmul_precision, "bfloat16_is_faster", lambda: True)
    assert matmul_input_dtype(auto) is None   # the suite runs at JAX precision float32 (conftest)
    with jax.default_matmul_precision("highest"):
        assert matmul_input_dtype(auto) is None
    with jax.default_matmul_precision(None):   # what a user's process has
        assert matmul_input_dtype(auto) == jnp.bfloat16
        assert matmul_input_dtype(dataclasses.replace(auto, dtype="bfloat16")) is None
        monkeypatch.setattr(matmul_precision, "current_platform", lambda: "tpu")
        assert matmul_input_dtype(auto) is None
        monkeypatch.setattr(matmul_precision, "current_platform", lambda: "cpu")
        monkeypatch.setattr(matmul_precision, "bfloat16_is_faster", lambda: False)
        assert matmul_input_dtype(auto) is None
    assert matmul_input_dtype(dataclasses.replace(auto, matmul_precision="bfloat16")) == jnp.bfloat16


def test_the_cpu_probe_reads_the_instruction_flags(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(xla_cpu_flags, "CPUINFO", cpuinfo)
    for flags, expected in (("fpu avx2 avx512f avx512_bf16 avx512_vnni", True),
                            ("fpu avx2 amx_bf16 amx_tile", True), ("fpu avx2 avx512f", False)):
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        xla_cpu_flags.cpu_multiplies_bfloat16.cache_clear()
        assert xla_cpu_flags.cpu_multiplies_bfloat16() is expected
    cpuinfo.unlink()
    xla_cpu_flags.cpu_multiplies_bfloat16.cache_clear()
    assert xla_cpu_flags.cpu_multiplies_bfloat16() is False
    xla_cpu_flags.cpu_multiplies_bfloat16.cache_clear()


@pytest.fixture
def fresh_speed_probe(monkeypatch, tmp_path):
    """cpu_matmul_speed with its cache under tmp_path, a CPU with bfloat16 instructions, and
    `measure` replaced by a counter returning the figures in `flops`."""
    monkeypatch.delenv("GEMBED_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(xla_cpu_flags, "cpu_multiplies_bfloat16", lambda: True)
    probe = {"calls": 0, "flops": {"float32": 100.0, "bfloat16": 150.0}}

    def measure():
        probe["calls"] += 1
        return dict(probe["flops"])
    monkeypatch.setattr(cpu_matmul_speed, "measure", measure)
    cpu_matmul_speed.bfloat16_is_faster.cache_clear()
    yield probe
    cpu_matmul_speed.bfloat16_is_faster.cache_clear()


def test_the_speed_probe_measures_once_per_machine_and_keeps_the_answer(fresh_speed_probe,
                                                                        monkeypatch):
    assert cpu_matmul_speed.bfloat16_is_faster() is True           # 1.5x >= MIN_SPEEDUP
    cpu_matmul_speed.bfloat16_is_faster.cache_clear()
    fresh_speed_probe["flops"] = {"float32": 100.0, "bfloat16": 50.0}
    assert cpu_matmul_speed.bfloat16_is_faster() is True           # read back, not re-measured
    assert fresh_speed_probe["calls"] == 1
    record = json.loads(cpu_matmul_speed.cache_file().read_text())
    assert record[cpu_matmul_speed.machine_key()] == {"float32": 100.0, "bfloat16": 150.0,
                                                       "bfloat16_faster": True}
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_onednn=true")   # another setup: measured anew
    cpu_matmul_speed.bfloat16_is_faster.cache_clear()
    assert cpu_matmul_speed.bfloat16_is_faster() is False
    assert fresh_speed_probe["calls"] == 2 and len(json.loads(cpu_matmul_speed.cache_file().read_text())) == 2


def test_the_speed_probe_wants_a_clear_margin_and_bfloat16_instructions(fresh_speed_probe,
                                                                        monkeypatch):
    fresh_speed_probe["flops"] = {"float32": 100.0, "bfloat16": 105.0}   # below MIN_SPEEDUP
    assert cpu_matmul_speed.bfloat16_is_faster() is False
    cpu_matmul_speed.bfloat16_is_faster.cache_clear()
    monkeypatch.setattr(xla_cpu_flags, "cpu_multiplies_bfloat16", lambda: False)
    cpu_matmul_speed.cache_file().unlink()
    assert cpu_matmul_speed.bfloat16_is_faster() is False
    assert fresh_speed_probe["calls"] == 1 and not cpu_matmul_speed.cache_file().exists()


def test_the_speed_probe_times_real_matmuls_even_while_tracing():
    seen = {}

    @jax.jit
    def traced(x):
        seen.update(cpu_matmul_speed.measure())
        return x
    traced(jnp.ones(2))
    assert set(seen) == {"float32", "bfloat16"} and all(flops > 1e8 for flops in seen.values())
