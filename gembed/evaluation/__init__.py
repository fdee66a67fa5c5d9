"""Evaluation: metrics and tasks over an `Embedder`."""
