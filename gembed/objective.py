"""The training objective of a batch: embed its text slots, then the contrastive loss over them.

A batch (see `gembed.data.batching.TrainBatches`) holds per example the slots 0 = query,
1 = positive, 2.. = hard negatives. `batch_loss` is the plain full-batch objective (of padded or packed
batches); `gembed.gradcache` computes the same loss from `embed_slots` chunk by chunk and
`embeddings_loss`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from gembed.config import LossConfig
from gembed.data.batching import FIRST_NEGATIVE_SLOT, POSITIVE_SLOT, QUERY_SLOT
from gembed.losses.contrastive import contrastive_loss
from gembed.model import EmbeddingModel, ModelConfig


def _embed(params, model_config: ModelConfig, rng, token_ids, token_mask, **packed) -> jax.Array:
    """`EmbeddingModel.apply`, with dropout (keyed by rng) when the config has any."""
    deterministic = model_config.dropout_rate == 0.0
    return EmbeddingModel(model_config).apply(
        {"params": params}, token_ids, token_mask, deterministic=deterministic,
        rngs=None if deterministic else {"dropout": rng}, **packed)


def embed_slots(params, model_config: ModelConfig, token_ids, token_mask, rng) -> jax.Array:
    """f32[B, S, D] unnormalised embeddings of int32[B, S, L] token slots (query, positive, ...)."""
    batch, slots, length = token_ids.shape
    flat = _embed(params, model_config, rng, token_ids.reshape(batch * slots, length),
                  token_mask.reshape(batch * slots, length))
    return flat.reshape(batch, slots, -1)


def embed_packed_group(params, model_config: ModelConfig, rows, texts: int, rng) -> jax.Array:
    """f32[texts, D] unnormalised embeddings of one group of packed rows: `rows` holds
    token_ids, token_mask, segment_ids (0..texts-1) and positions, each int32[R, L]."""
    return _embed(params, model_config, rng, rows["token_ids"], rows["token_mask"],
                  segment_ids=rows["segment_ids"], positions=rows["positions"], num_texts=texts)


def embed_packed_slots(params, model_config: ModelConfig, batch, rng) -> jax.Array:
    """f32[B, S, D] unnormalised embeddings of a packed batch (`TrainBatches` with pack_groups):
    G groups of [R, L] rows, all embedded in one pass (segment ids made global)."""
    batch_size, slots = batch["text_valid"].shape
    groups, rows, length = batch["token_ids"].shape
    texts_per_group = batch_size * slots // groups
    offsets = (jnp.arange(groups, dtype=jnp.int32) * texts_per_group)[:, None, None]
    flat = {name: batch[name].reshape(groups * rows, length)
            for name in ("token_ids", "token_mask", "positions")}
    flat["segment_ids"] = (batch["segment_ids"] + offsets).reshape(groups * rows, length)
    return embed_packed_group(params, model_config, flat, batch_size * slots, rng).reshape(
        batch_size, slots, -1)


def embeddings_loss(params, embeddings, batch, model_config: ModelConfig,
                    loss_config: LossConfig, row_tile: int | None = None):
    """(loss, metrics) of f32[B, S, D] slot embeddings; of the params only log_scale is used.

    `row_tile` bounds the logits' memory (see `contrastive_loss`).
    """
    keys = batch["text_keys"] if loss_config.mask_duplicates else None
    has_negatives = embeddings.shape[1] > FIRST_NEGATIVE_SLOT
    return contrastive_loss(
        embeddings[:, QUERY_SLOT], embeddings[:, POSITIVE_SLOT], params["log_scale"],
        negatives=embeddings[:, FIRST_NEGATIVE_SLOT:] if has_negatives else None,
        negatives_valid=batch["text_valid"][:, FIRST_NEGATIVE_SLOT:] if has_negatives else None,
        query_keys=None if keys is None else keys[:, QUERY_SLOT],
        positive_keys=None if keys is None else keys[:, POSITIVE_SLOT],
        negative_keys=None if keys is None or not has_negatives else keys[:, FIRST_NEGATIVE_SLOT:],
        symmetric=loss_config.symmetric, same_tower=loss_config.same_tower,
        output_sizes=model_config.output_sizes, max_scale=loss_config.max_scale,
        row_tile=row_tile, false_negative_margin=loss_config.false_negative_margin)


def batch_loss(params, batch, rng, model_config: ModelConfig, loss_config: LossConfig):
    """(loss, metrics) of a global batch, all activations kept for the backward pass."""
    if "segment_ids" in batch:
        embeddings = embed_packed_slots(params, model_config, batch, rng)
    else:
        embeddings = embed_slots(params, model_config, batch["token_ids"], batch["token_mask"], rng)
    return embeddings_loss(params, embeddings, batch, model_config, loss_config)
