"""Which attention kernel runs (`ModelConfig.attention`), and the call into it.

Implementations, all with the same values (tests/test_attention.py checks them against one
NumPy reference):
  "xla"     `jax.nn.dot_product_attention(implementation="xla")` under autodiff; grouped-query
            attention by grouping the queries, K/V never repeated.
  "cpu"     `gembed.model.softmax_attention`: the same forward, a hand-written backward.
  "cudnn"   `jax.nn.dot_product_attention(implementation="cudnn")` (GPU; bfloat16/float16, head
            dims ≤ 128 in multiples of 8; other shapes and dtypes run "xla").
  "splash"  the Pallas TPU splash-attention kernel (`jax.experimental.pallas.ops.tpu`): blockwise
            online softmax, [L, L] never materialised; packed rows and padding via segment ids,
            causal masks as a static block mask, grouped-query attention as its MQA form per
            key/value head. Under a mesh (`jax.sharding.use_abstract_mesh`) it runs per shard in
            `jax.shard_map` (rows over "data", heads over "model" when they divide). Lengths that
            are not a multiple of 128 and rectangular (KV-cache) masks run "xla". Off TPU it runs
            in the Pallas interpreter (slow; for tests).
  "auto"    splash on TPU, cudnn on GPU, cpu on CPU.
The platform is the current abstract mesh's (so a train step compiled for a TPU topology from a
CPU host picks the TPU kernel), else `jax.default_backend()`.

Shapes: B batch, L (T queries, S keys) sequence length, N query heads, K key/value heads (N a
multiple of K), H head_dim.
"""
from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec

from gembed.model.softmax_attention import softmax_attention

IMPLEMENTATIONS = ("auto", "xla", "cpu", "cudnn", "splash")
AUTO = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn", "rocm": "xla", "cpu": "cpu"}
SPLASH_BLOCK = 128           # splash's block length; L must be a multiple of it
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


@flax.struct.dataclass
class Visibility:
    """Which keys each query sees, in the compact form kernels take: the real keys (`token_mask`
    bool[B, L]) of the query's own text (`segment_ids` int32[B, L], None: one text per row)."""

    token_mask: jax.Array
    segment_ids: jax.Array | None = None

    def dense(self) -> jax.Array:
        """bool[B, 1, 1, L] (one text per row) or bool[B, 1, L, L] (packed rows)."""
        keys = self.token_mask[:, None, None, :]
        if self.segment_ids is None:
            return keys
        return keys & (self.segment_ids[:, None, :, None] == self.segment_ids[:, None, None, :])

    def kernel_segment_ids(self) -> jax.Array:
        """int32[B, L]: the segment id of real tokens, -1 for padding (padding queries see padding
        keys only, so no query row is empty and no real query sees padding)."""
        segments = (jnp.zeros_like(self.token_mask, jnp.int32) if self.segment_ids is None
                    else self.segment_ids.astype(jnp.int32))
        return jnp.where(self.token_mask, segments, -1)


def current_platform() -> str:
    """The platform attention compiles for: the abstract mesh's devices', else the default
    backend's ("cpu", "gpu", "tpu")."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    return device.platform if device is not None else jax.default_backend()


def resolve(implementation: str, platform: str, dtype, head_dim: int, length: int | None = None,
            dense_mask: bool = False) -> str:
    """The implementation that runs for `implementation` ("auto" or a name) on `platform`, after
    the fallbacks to "xla" for shapes/dtypes a kernel cannot take."""
    name = AUTO.get(platform, "xla") if implementation == "auto" else implementation
    if name == "cudnn" and (jnp.dtype(dtype) not in CUDNN_DTYPES or head_dim > 128
                            or head_dim % 8 or platform not in ("gpu", "cuda")):
        return "xla"
    if name == "splash" and (dense_mask or (length is not None and length % SPLASH_BLOCK)):
        return "xla"
    return name


def attend(query: jax.Array, key: jax.Array, value: jax.Array, visible: Visibility | jax.Array,
           *, is_causal: bool, implementation: str = "auto", scale: float | None = None,
           logit_softcap: float | None = None) -> jax.Array:
    """Softmax attention: query [B, T, N, H]; key, value [B, S, K, H]; visible a `Visibility`
    (T = S) or bool[B, 1, 1 or T, S] → [B, T, N, H] in query's dtype. Logits are scaled by `scale`
    (None: 1/sqrt(H)); soft-capped logits (Gemma 2) always take the "cpu" formula.

    Outputs at padding queries are unspecified (kernels differ there); real queries never see
    padding keys.
    """
    dense_mask = not isinstance(visible, Visibility)
    platform = current_platform()
    name = resolve(implementation, platform, query.dtype, query.shape[-1], query.shape[1],
                   dense_mask)
    if logit_softcap is not None:
        name = "cpu"
    if name == "splash":
        return _splash(query, key, value, visible.kernel_segment_ids(), is_causal,
                       interpret=platform != "tpu", scale=scale)
    mask = visible if dense_mask else visible.dense()
    if name == "cpu":
        return softmax_attention(query, key, value, mask, is_causal=is_causal, scale=scale,
                                 logit_softcap=logit_softcap)
    return jax.nn.dot_product_attention(query, key, value, mask=mask, is_causal=is_causal,
                                        scale=scale, implementation=name)


def _splash(query, key, value, segment_ids, is_causal: bool, interpret: bool,
            scale: float | None = None) -> jax.Array:
    """Splash attention per example and key/value head: query [B, L, N, H], key/value
    [B, L, K, H], segment_ids int32[B, L]; run per shard under an abstract mesh of auto axes."""
    mesh = jax.sharding.get_abstract_mesh()
    batch_axis = "data" if not mesh.empty and "data" in mesh.axis_names else None
    if (batch_axis is None or mesh.manual_axes or query.shape[0] % mesh.shape[batch_axis]):
        # no mesh, or already per device (inside gradient caching's shard_map): call directly
        return _splash_local(query, key, value, segment_ids, is_causal=is_causal,
                             interpret=interpret, scale=scale)
    kv_heads = key.shape[2]
    head_axis = ("model" if "model" in mesh.axis_names and kv_heads % mesh.shape["model"] == 0
                 else None)
    heads = PartitionSpec(batch_axis, None, head_axis, None)
    local = functools.partial(_splash_local, is_causal=is_causal, interpret=interpret, scale=scale)
    return jax.shard_map(local, mesh=mesh, in_specs=(heads, heads, heads, PartitionSpec(batch_axis)),
                         out_specs=heads, check_vma=False)(query, key, value, segment_ids)


def _splash_local(query, key, value, segment_ids, *, is_causal: bool, interpret: bool,
                  scale: float | None = None):
    batch, length, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    group = heads // kv_heads
    shape = (length, length)
    head_mask = splash_mask.CausalMask(shape) if is_causal else splash_mask.FullMask(shape)
    kernel = splash.make_splash_mqa_single_device(
        splash_mask.MultiHeadMask([head_mask] * group), interpret=interpret,
        block_sizes=_block_sizes(length))
    # [B, L, N, H] -> [B, K, G, L, H]: query head n uses key/value head n // G
    scale = head_dim ** -0.5 if scale is None else scale
    grouped = (query * jnp.asarray(scale, query.dtype)).reshape(
        batch, length, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    key, value = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)   # [B, K, L, H]

    def one_row(q, k, v, segments):
        ids = splash.SegmentIds(segments, segments)
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids))(q, k, v)

    out = jax.vmap(one_row)(grouped, key, value, segment_ids)   # [B, K, G, L, H]
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, head_dim)


def _block_sizes(length: int) -> splash.BlockSizes:
    """Query/key blocks of up to 512 tokens (a divisor of L that is a multiple of 128)."""
    block = next(size for size in (512, 256, SPLASH_BLOCK) if length % size == 0)
    return splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                             block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                             block_q_dq=block, block_kv_dq=block)
