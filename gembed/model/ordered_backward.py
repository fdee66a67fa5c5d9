"""Block-by-block backward passes: a transformer block's gradients are finished before the backward
pass reaches the block below it, so each block's activations are freed in turn.

A jitted train step is one graph, and XLA orders it as it likes. XLA:CPU defers each block's weight
gradients (activationsᵀ · cotangent, read only by the optimizer) to the end of the backward pass,
and under rematerialisation it recomputes every block's forward pass at the start: either way the
activations of all blocks are alive at once. Two orderings fix this:
  - a block's input cotangent waits for all its param cotangents, so the block below starts its
    backward only once they exist;
  - the block's saved forward values wait for its output cotangent, so nothing of its backward
    (nor, under rematerialisation, its recomputation) is moved earlier.
On GPU and TPU, `jax.lax.optimization_barrier` says "waits for". XLA:CPU removes barriers before
it schedules, so there the wait is a data dependency: a zero `0 * Σ max|leaf|` of the awaited
leaves added to the waiting ones (a max of absolute values cannot be folded into the matmul or sum
that makes a leaf, so the leaf is computed in full first). Values are unchanged: x + 0 = x (a
non-finite cotangent makes them NaN, and the step is then reported non-finite anyway).

The encoder calls blocks this way except with dropout on (flax's dropout keys would leak out of
the custom_vjp when the model runs inside a scan, as gradient caching does): such runs keep the
plain backward order.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gembed.model.attention import current_platform


def _is_float(leaf: jax.Array) -> bool:
    return jnp.issubdtype(leaf.dtype, jnp.floating)


def after(tree: Any, anchors: Any) -> Any:
    """`tree`, values unchanged, its float leaves computable only once every float leaf of
    `anchors` is (module docstring: a barrier, or on CPU a data dependency)."""
    if current_platform() != "cpu":
        return jax.lax.optimization_barrier((tree, anchors))[0]
    leaves = [leaf for leaf in jax.tree_util.tree_leaves(anchors) if _is_float(leaf) and leaf.size]
    zero = 0.0 * sum((jnp.max(jnp.abs(leaf)).astype(jnp.float32) for leaf in leaves),
                     jnp.zeros((), jnp.float32))
    return jax.tree_util.tree_map(
        lambda leaf: leaf + zero.astype(leaf.dtype) if _is_float(leaf) else leaf, tree)


def _call(block: nn.Module, x, visible, positions, deterministic):
    return block(x, visible, positions, deterministic)


def _forward(block: nn.Module, x, visible, positions, deterministic):
    return nn.vjp(lambda module, x: module(x, visible, positions, deterministic), block, x)


def _backward(deterministic, vjp_fn, output_cotangent):
    params_cotangent, x_cotangent = after(vjp_fn, output_cotangent)(output_cotangent)
    return params_cotangent, after(x_cotangent, params_cotangent), None, None


_call_in_order = nn.custom_vjp(_call, forward_fn=_forward, backward_fn=_backward,
                               nondiff_argnums=(4,))


def call_in_order(block: nn.Module, x: jax.Array, visible, positions: jax.Array,
                  deterministic: bool) -> jax.Array:
    """`block(x, visible, positions, deterministic)` (x: [B, L, D] → [B, L, D]) with the backward
    order of the module docstring."""
    return _call_in_order(block, x, visible, positions, deterministic)
