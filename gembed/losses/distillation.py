"""Distillation losses over embeddings (EmbeddingGemma, 2025): embedding matching, score
distillation and the spread-out regulariser (global orthogonal regularisation, Zhang et al. 2017).

Pure functions of student and teacher embeddings: no model, jittable, float32 math. Teacher
vectors are constants (no gradient flows into them). Like `gembed.losses.contrastive`, they take
the whole global batch, so they compose with gradient caching (`gembed.gradcache`) unchanged.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

MATCHING_KINDS = ("cosine", "mse")
_NORM_EPS = 1e-12
_MASKED_LOGIT = -1e9


def _l2_normalise(x: Array) -> Array:
    squared_norm = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared_norm, _NORM_EPS**2))


def _masked_mean(values: Array, valid: Array) -> Array:
    valid = valid.astype(jnp.float32)
    return jnp.sum(values * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def embedding_matching_loss(student: Array, teacher: Array, valid: Array, *, kind: str = "cosine",
                            projection: Array | None = None) -> Array:
    """Distance between the student's and the teacher's vectors of the same texts.

    Args:
      student: f32[..., Ds] unnormalised student embeddings (any leading shape, e.g. [B, S]).
      teacher: f32[..., Dt] teacher embeddings (constants).
      valid: bool[...]; False rows (padding slots) do not count.
      kind: "cosine": mean of 1 - cos(W s, t); "mse": mean over rows of the mean over Dt of
        (W s - t)^2 (raw, unnormalised vectors).
      projection: f32[Ds, Dt] the learned linear map W (s @ W); required when Ds != Dt.

    Returns f32[] averaged over valid rows.
    """
    if kind not in MATCHING_KINDS:
        raise ValueError(f"kind={kind!r} must be one of {MATCHING_KINDS}")
    student = student.astype(jnp.float32)
    if projection is not None:
        student = jnp.matmul(student, projection, precision=jax.lax.Precision.HIGHEST)
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(f"student size {student.shape[-1]} != teacher size {teacher.shape[-1]}; "
                         f"give a projection [Ds, Dt]")
    teacher = jax.lax.stop_gradient(teacher.astype(jnp.float32))
    if kind == "cosine":
        per_row = 1.0 - jnp.sum(_l2_normalise(student) * _l2_normalise(teacher), axis=-1)
    else:
        per_row = jnp.mean(jnp.square(student - teacher), axis=-1)
    return _masked_mean(per_row, valid)


def score_distillation_loss(student_query: Array, student_documents: Array, teacher_query: Array,
                            teacher_documents: Array, documents_valid: Array, *,
                            student_temperature: float, teacher_temperature: float) -> Array:
    """KL(teacher || student) of the softmax over each query's candidate documents.

    Args:
      student_query: f32[B, Ds]; student_documents: f32[C, Ds], every candidate of the batch (the
        B positives, then the hard negatives, flattened).
      teacher_query: f32[B, Dt]; teacher_documents: f32[C, Dt] the same texts' teacher vectors.
      documents_valid: bool[C]; invalid candidates (padding slots) are left out of every row.
      student_temperature, teacher_temperature: each side's logits are cosine / temperature.

    Returns f32[] mean over the B rows of sum_c p_t(c) (log p_t(c) - log p_s(c)).
    """
    def log_probs(query, documents, temperature):
        cosines = jnp.matmul(_l2_normalise(query.astype(jnp.float32)),
                             _l2_normalise(documents.astype(jnp.float32)).T,
                             precision=jax.lax.Precision.HIGHEST)
        logits = jnp.where(documents_valid[None, :], cosines / temperature, _MASKED_LOGIT)
        return jax.nn.log_softmax(logits, axis=-1)

    student = log_probs(student_query, student_documents, student_temperature)
    teacher = jax.lax.stop_gradient(
        log_probs(teacher_query, teacher_documents, teacher_temperature))
    terms = jnp.where(documents_valid[None, :], jnp.exp(teacher) * (teacher - student), 0.0)
    return jnp.mean(jnp.sum(terms, axis=-1))


def spread_out_loss(embeddings: Array, valid: Array | None = None) -> Array:
    """Global orthogonal regularisation of one set of texts (e.g. the batch's queries).

    With x_i the L2-normalised rows and s_ij = x_i . x_j over non-matching pairs i != j (both
    valid), M1 = mean s_ij and M2 = mean s_ij^2: loss = M1^2 + max(0, M2 - 1/D). Random unit
    vectors in D dimensions have M1 = 0 and M2 = 1/D, so the loss pushes the set to spread like
    them.

    Args:
      embeddings: f32[N, D] unnormalised; valid: bool[N] (default: all).
    """
    count, dim = embeddings.shape
    valid = jnp.ones((count,), bool) if valid is None else valid
    unit = _l2_normalise(embeddings.astype(jnp.float32))
    similarities = jnp.matmul(unit, unit.T, precision=jax.lax.Precision.HIGHEST)
    pairs = valid[:, None] & valid[None, :] & ~jnp.eye(count, dtype=bool)
    first_moment = _masked_mean(similarities, pairs)
    second_moment = _masked_mean(jnp.square(similarities), pairs)
    return jnp.square(first_moment) + jax.nn.relu(second_moment - 1.0 / dim)
