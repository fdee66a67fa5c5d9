"""The loss library: pure functions of embeddings, no model inside.

- `gembed.losses.contrastive`: the InfoNCE family (cpt-text, Gemini Embedding): in-batch, hard and
  cross-device negatives, duplicate and false-negative masks, Matryoshka sizes, row tiling,
  hardness-weighted negatives.
- `gembed.losses.distillation`: embedding matching, score distillation and the spread-out
  regulariser (EmbeddingGemma).
"""
