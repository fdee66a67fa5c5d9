"""Gradient caching (Gao et al., 2021): the exact full-batch gradient in the memory of one chunk.

A contrastive batch cannot be split into independent micro-batches (every query needs every
document as a negative), so gradient accumulation does not apply. Instead:
  1. embed the global batch chunk by chunk without keeping activations: f32[B, S, D] embeddings;
  2. the loss on those embeddings (logits tiled by rows) and its gradient w.r.t. the embeddings
     and log_scale;
  3. re-embed each chunk under `jax.vjp` and pull its rows of that gradient back to the params,
     summed over chunks and then, once, over devices.
Chunks are per device: inside `shard_map` over the "data" axis each device embeds its own rows
`chunk_size` examples at a time (in a packed batch each chunk is one pack group of those examples'
texts, `TrainBatches(pack_groups=...)`), so activation memory per device depends on neither B nor
the device count;
negatives stay global because step 2 runs on the globally sharded embeddings. Dropout keys are a
function of (device, chunk), identical in steps 1 and 3, so the gradient is exact with dropout too.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from gembed import lora
from gembed.config import LossConfig
from gembed.errors import GembedUserError
from gembed.lora import LoraConfig
from gembed.model import ModelConfig
from gembed.objective import embed_packed_group, embed_slots, embeddings_loss
from gembed.sharding import DATA_AXIS


def check_chunk_size(batch_size: int, chunk_size: int, num_shards: int) -> None:
    """Each data-parallel shard's rows of the global batch must split into whole chunks."""
    per_shard = batch_size // num_shards
    if per_shard % chunk_size:
        raise GembedUserError(
            f"CHUNK_SIZE={chunk_size} does not divide the {per_shard} examples per device "
            f"(BATCH_SIZE={batch_size} over {num_shards} data-parallel devices); use a divisor "
            f"of {per_shard}.")


def cached_value_and_grad(params, batch, rng, *, model_config: ModelConfig,
                          loss_config: LossConfig, chunk_size: int, mesh: Mesh, frozen=None,
                          lora_config: LoraConfig | None = None):
    """((loss, metrics), grads) equal to `jax.value_and_grad(objective.batch_loss)` on the batch.

    Args:
      params: what trains: the EmbeddingModel params, or a LoRA run's trainable tree (any
        sharding; gathered whole per "data" shard).
      frozen: a LoRA run's frozen tree (`gembed.lora`), None otherwise; not differentiated.
      batch: the global batch (`TrainBatches` fields), leading axis B sharded over "data".
      rng: the step's key.
      chunk_size: examples (rows of S slots) each device embeds at a time; divides B / devices.
      mesh: the mesh whose "data" axis shards the batch.
    """
    num_devices = mesh.shape[DATA_AXIS]
    slots = batch["text_valid"].shape[1]
    packed = "segment_ids" in batch
    tokens = {name: batch[name] for name in (
        ("token_ids", "token_mask", "segment_ids", "positions") if packed
        else ("token_ids", "token_mask"))}
    chunk_embedder = functools.partial(
        _embed_packed_chunk if packed else _embed_padded_chunk, model_config=model_config,
        chunk_size=chunk_size, slots=slots,
        model_params=functools.partial(lora.combine, config=lora_config))
    embed = functools.partial(_embed_chunks, embed_chunk=chunk_embedder, chunk_size=chunk_size,
                              packed=packed)
    embeddings = _on_each_device(embed, mesh, out_specs=PartitionSpec(DATA_AXIS))(
        params, frozen, tokens, rng)

    def loss_fn(params, embeddings):
        return embeddings_loss(lora.combine(params, frozen, None, config=lora_config), embeddings,
                               batch=batch, model_config=model_config, loss_config=loss_config,
                               row_tile=chunk_size * num_devices)

    (loss, metrics), (loss_param_grads, embedding_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(params, embeddings)
    backprop = functools.partial(_backprop_chunks, embed_chunk=chunk_embedder,
                                 chunk_size=chunk_size, packed=packed)
    encoder_grads = _on_each_device(backprop, mesh, out_specs=PartitionSpec())(
        params, frozen, (tokens, embedding_grads), rng)
    return (loss, metrics), jax.tree.map(jnp.add, encoder_grads, loss_param_grads)


def _on_each_device(fn, mesh: Mesh, out_specs):
    """fn(params, frozen, per-row arrays, rng) run per "data" shard on its rows; the rest whole.

    Only "data" is manual: sharded params are gathered over it on entry, and XLA keeps laying out
    work over the "model" axis (tensor parallelism) inside.
    """
    return jax.shard_map(fn, mesh=mesh, out_specs=out_specs, axis_names=frozenset({DATA_AXIS}),
                         in_specs=(PartitionSpec(), PartitionSpec(), PartitionSpec(DATA_AXIS),
                                   PartitionSpec()))


def _chunked(x: jax.Array, chunk_size: int) -> jax.Array:
    """[b, ...] -> [b / chunk_size, chunk_size, ...]."""
    return x.reshape(-1, chunk_size, *x.shape[1:])


def _chunk_rng(rng: jax.Array, chunk_index: jax.Array) -> jax.Array:
    """The dropout key of one chunk of this device's rows."""
    return jax.random.fold_in(jax.random.fold_in(rng, jax.lax.axis_index(DATA_AXIS)), chunk_index)


def _device_chunks(tokens: dict[str, jax.Array], chunk_size: int, packed: bool):
    """This device's token arrays as [chunks, ...]: a packed batch's groups are its chunks."""
    return tokens if packed else {name: _chunked(x, chunk_size) for name, x in tokens.items()}


def _embed_padded_chunk(params, frozen, chunk, rng, *, model_config, chunk_size, slots,
                        model_params):
    """f32[chunk_size, S, D] of one chunk of padded slots [chunk_size, S, L]."""
    return embed_slots(model_params(params, frozen, rng), model_config, chunk["token_ids"],
                       chunk["token_mask"], rng)


def _embed_packed_chunk(params, frozen, chunk, rng, *, model_config, chunk_size, slots,
                        model_params):
    """f32[chunk_size, S, D] of one pack group (rows [R, L], segment ids within the group)."""
    return embed_packed_group(model_params(params, frozen, rng), model_config, chunk,
                              chunk_size * slots, rng).reshape(chunk_size, slots, -1)


def _embed_chunks(params, frozen, tokens, rng, *, embed_chunk, chunk_size: int, packed: bool):
    """This device's f32[b, S, D] embeddings, one chunk at a time, no activations kept."""
    chunks = _device_chunks(tokens, chunk_size, packed)
    indices = jnp.arange(next(iter(chunks.values())).shape[0])
    embeddings = jax.lax.map(
        lambda item: embed_chunk(params, frozen, item[1], _chunk_rng(rng, item[0])),
        (indices, chunks))
    return embeddings.reshape(-1, *embeddings.shape[2:])


def _backprop_chunks(params, frozen, rows, rng, *, embed_chunk, chunk_size: int, packed: bool):
    """Param gradients of sum(embeddings * embedding_grads) over all devices' rows.

    rows = (token arrays, embedding_grads) of this device. The params are cast to device-varying
    first so that each chunk's VJP stays local; one psum at the end.
    """
    tokens, embedding_grads = rows
    chunks = _device_chunks(tokens, chunk_size, packed)
    cotangents = _chunked(embedding_grads, chunk_size)
    local_params = jax.lax.pcast(params, DATA_AXIS, to="varying")

    def accumulate(grads, item):
        index, chunk, cotangent = item
        _, pull_back = jax.vjp(lambda p: embed_chunk(p, frozen, chunk, _chunk_rng(rng, index)),
                               local_params)
        (chunk_grads,) = pull_back(cotangent)
        return jax.tree.map(jnp.add, grads, chunk_grads), None

    indices = jnp.arange(cotangents.shape[0])
    zeros = jax.tree.map(jnp.zeros_like, local_params)
    grads, _ = jax.lax.scan(accumulate, zeros, (indices, chunks, cotangents))
    return jax.lax.psum(grads, DATA_AXIS)
