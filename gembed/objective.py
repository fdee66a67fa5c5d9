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
from gembed.losses.distillation import (embedding_matching_loss, score_distillation_loss,
                                        spread_out_loss)
from gembed.model import EmbeddingModel, ModelConfig

# The params entry of the student->teacher linear map (embedding matching when sizes differ);
# training-only: inference, soups and export read the model's params without it.
DISTILL_PROJECTION = "distill_projection"


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
    """(loss, metrics) of f32[B, S, D] slot embeddings; of the params only log_scale (and
    DISTILL_PROJECTION, when present) are used.

    The loss is contrastive_weight * InfoNCE plus the distillation terms `loss_config` weights:
    those with a teacher read batch["teacher_vectors"] f32[B, S, Dt] (the slots' teacher vectors).
    `row_tile` bounds the logits' memory (see `contrastive_loss`).
    """
    loss, metrics = _contrastive(params, embeddings, batch, model_config, loss_config, row_tile)
    loss = loss_config.contrastive_weight * loss
    valid = batch["text_valid"]
    terms = {}
    if loss_config.embedding_matching_weight:
        terms["embedding_matching"] = (loss_config.embedding_matching_weight, embedding_matching_loss(
            embeddings, batch["teacher_vectors"], valid, kind=loss_config.embedding_matching,
            projection=params.get(DISTILL_PROJECTION)))
    if loss_config.score_distillation_weight:
        teacher = batch["teacher_vectors"]
        dim, teacher_dim = embeddings.shape[-1], teacher.shape[-1]
        terms["score_distillation"] = (loss_config.score_distillation_weight, score_distillation_loss(
            embeddings[:, QUERY_SLOT], _documents(embeddings).reshape(-1, dim),
            teacher[:, QUERY_SLOT], _documents(teacher).reshape(-1, teacher_dim),
            _documents(valid).reshape(-1), student_temperature=loss_config.student_temperature,
            teacher_temperature=loss_config.teacher_temperature))
    if loss_config.spread_out_weight:
        terms["spread_out"] = (loss_config.spread_out_weight,
                               spread_out_loss(embeddings[:, QUERY_SLOT])
                               + spread_out_loss(embeddings[:, POSITIVE_SLOT]))
    for name, (weight, value) in terms.items():
        loss = loss + weight * value
        metrics[name] = value
    return loss, {**metrics, "loss": loss}


def _documents(slots: jax.Array) -> jax.Array:
    """[B, S, ...] -> [S-1, B, ...]: positives first (rows 0..B-1), then each negative slot."""
    return jnp.moveaxis(slots[:, POSITIVE_SLOT:], 1, 0)


def init_distill_projection(model_config: ModelConfig, teacher_size: int) -> jax.Array:
    """f32[E, Dt]: the learned map from student to teacher vectors, initialised to the identity
    on the first min(E, Dt) coordinates."""
    return jnp.eye(model_config.embedding_size, teacher_size, dtype=jnp.float32)


def _contrastive(params, embeddings, batch, model_config: ModelConfig, loss_config: LossConfig,
                 row_tile: int | None):
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
        row_tile=row_tile, false_negative_margin=loss_config.false_negative_margin,
        hardness_alpha=loss_config.hardness_alpha)


def batch_loss(params, batch, rng, model_config: ModelConfig, loss_config: LossConfig):
    """(loss, metrics) of a global batch, all activations kept for the backward pass."""
    if "segment_ids" in batch:
        embeddings = embed_packed_slots(params, model_config, batch, rng)
    else:
        embeddings = embed_slots(params, model_config, batch["token_ids"], batch["token_mask"], rng)
    return embeddings_loss(params, embeddings, batch, model_config, loss_config)
