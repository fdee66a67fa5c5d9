"""Importers of pretrained checkpoints (BERT-family encoders, Llama/Qwen2/Gemma decoders)."""
