"""Which dtype the inputs of the model's matmuls take (`ModelConfig.matmul_precision`).

  "float32"   float32 inputs.
  "bfloat16"  the dense layers' inputs and weights, and attention's queries, keys and values,
              rounded to bfloat16; products summed and returned in float32, and in training the
              gradients flowing into those matmuls rounded the same way (mixed precision). Params,
              optimizer state, norms, softmax statistics, residuals and losses stay float32.
  "auto"      "bfloat16" on CPUs where bfloat16-input matmuls run clearly faster than float32
              ones, as measured once per machine (`gembed.cpu_matmul_speed`; only CPUs with
              bfloat16 dot-product instructions, AVX512-BF16 or AMX-BF16, qualify); "float32" on
              other CPUs, and on GPU and TPU, whose default matmul precision is reduced
              already (TF32 on recent NVIDIA GPUs, bfloat16 passes on TPU). "float32" too where
              JAX's default matmul precision asks for more than the fastest
              (`jax_default_matmul_precision`, JAX_DEFAULT_MATMUL_PRECISION=float32 or "highest";
              the test suite runs so).
With `dtype="bfloat16"` everything computes in bfloat16 and this setting has no effect. Embeddings
at "bfloat16" stay within cosine 0.9999 of "float32" ones (tests/test_matmul_precision.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gembed.model.attention import current_platform
from gembed.cpu_matmul_speed import bfloat16_is_faster

PRECISIONS = ("auto", "float32", "bfloat16")
FASTEST_JAX_PRECISIONS = (None, "default", "fastest", "bfloat16")   # jax_default_matmul_precision


def matmul_input_dtype(config):
    """jnp.bfloat16 when a `ModelConfig`'s float32 matmuls take bfloat16 inputs on the platform
    being compiled for (`attention.current_platform`), else None (inputs keep their dtype)."""
    if config.compute_dtype != jnp.float32:
        return None
    precision = config.matmul_precision
    if precision == "auto":
        fastest = jax.config.jax_default_matmul_precision in FASTEST_JAX_PRECISIONS
        precision = ("bfloat16" if fastest and current_platform() == "cpu"
                     and bfloat16_is_faster() else "float32")
    return jnp.bfloat16 if precision == "bfloat16" else None


def dot_general_with_inputs(input_dtype):
    """A `dot_general` for `nn.Dense(dot_general=...)`: None gives plain `lax.dot_general`; a dtype
    gives `matmul_in` with inputs of that dtype (Dense contracts the input's last axis with the
    kernel's first; no other form is taken)."""
    if input_dtype is None:
        return jax.lax.dot_general

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        if tuple(map(tuple, dimension_numbers[0])) != ((lhs.ndim - 1,), (0,)) or any(
                dimension_numbers[1]) or rhs.ndim != 2:
            raise ValueError(f"matmul_in takes x[..., K] . w[K, N], not {dimension_numbers}")
        return matmul_in(input_dtype, lhs, rhs)
    return dot_general


def matmul_in(input_dtype, x: jax.Array, w: jax.Array) -> jax.Array:
    """float32[..., N] = x[..., K] . w[K, N] with both cast to `input_dtype` and float32 sums; the
    backward casts the output gradient to `input_dtype` too, so all three matmuls of a layer take
    the fast inputs (mixed-precision training); gradients come back in x's and w's dtypes."""
    return _matmul_in(jnp.dtype(input_dtype), x.dtype, w.dtype, x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _matmul_in(input_dtype, x_dtype, w_dtype, x, w):
    return _matmul_in_forward(input_dtype, x_dtype, w_dtype, x, w)[0]


def _matmul_in_forward(input_dtype, x_dtype, w_dtype, x, w):
    narrow_x, narrow_w = x.astype(input_dtype), w.astype(input_dtype)
    return jnp.matmul(narrow_x, narrow_w, preferred_element_type=jnp.float32), (narrow_x, narrow_w)


def _matmul_in_backward(input_dtype, x_dtype, w_dtype, residuals, output_gradient):
    narrow_x, narrow_w = residuals
    gradient = output_gradient.astype(input_dtype)
    batch_axes = tuple(range(narrow_x.ndim - 1))
    x_gradient = jnp.matmul(gradient, narrow_w.T, preferred_element_type=jnp.float32)
    w_gradient = jnp.tensordot(narrow_x, gradient, axes=(batch_axes, batch_axes),
                               preferred_element_type=jnp.float32)
    return x_gradient.astype(x_dtype), w_gradient.astype(w_dtype)


_matmul_in.defvjp(_matmul_in_forward, _matmul_in_backward)
