"""Wall time of `scifact` end to end with gembed's own JAX encoder in the MiniLM-L6 shape.

The params are random (timing only: the score is meaningless); the tokenizer is MiniLM's
WordPiece `tokenizer.json` (any HF tokenizer.json works), max length 256 as all-MiniLM-L6-v2.

    python benchmarks/time_scifact_gembed.py --tokenizer=PATH/tokenizer.json --data_dir=../shared/data
"""
from __future__ import annotations

import argparse
import time

import jax


class HFTokenizer:
    """The tokenizer interface Embedder uses, over a Hugging Face tokenizer.json."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(path)
        self.pad_id = self._tokenizer.token_to_id("[PAD]") or 0
        self.vocab_size = self._tokenizer.get_vocab_size()

    def encode(self, texts, max_length, add_eos=False):
        self._tokenizer.enable_truncation(max_length)
        return [e.ids for e in self._tokenizer.encode_batch(list(texts))]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--tasks", default="scifact")
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args()
    from gembed.embedder import Embedder
    from gembed.evaluation import tasks
    from gembed.model import ModelConfig, init_params

    tokenizer = HFTokenizer(args.tokenizer)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=384, num_layers=6, num_heads=12,
                         mlp_dim=1536, norm_eps=1e-12, norm_position="post", final_norm=False,
                         type_vocab_size=2, embedding_norm=True, pooling="mean", output_sizes=(384,))
    embedder = Embedder(config, init_params(config, jax.random.PRNGKey(0)), tokenizer, args.max_length)
    start = time.perf_counter()
    results = tasks.evaluate(embedder, args.tasks, data_dir=args.data_dir, batch_size=args.batch_size)
    print(tasks.format_table(results))
    print(f"wall {time.perf_counter() - start:.1f} s (random params: the scores mean nothing)")


if __name__ == "__main__":
    main()
