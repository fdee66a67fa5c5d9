"""Examples/s of the training data loader alone, to compare with the train step's.

Builds the real `TrainBatches` (grain step-addressed batches, sentencepiece tokenisation, length
buckets, text keys) over a built-in corpus or a JSONL file and times `iterate()` for --steps
batches after a warm-up batch; prints one JSON line. Compare with `examples_per_second` in a run's
metrics.jsonl at the same batch size and max length.

    python benchmarks/loader_throughput.py --data=builtin:stdlib_code --batch_size=64 --max_length=128
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

from gembed.data import load_examples, train_sentencepiece
from gembed.data.batching import TrainBatches
from gembed.data.mixture import DatasetSpec, TrainingDataset
from gembed.data.tokenizer import SentencePieceTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="builtin:stdlib_code")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--hard_negatives", type=int, default=0)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--tokenizer", help="a sentencepiece .model; default: train one (8k)")
    args = parser.parse_args()

    examples = load_examples(args.data, "train")
    tokenizer_path = args.tokenizer
    if tokenizer_path is None:
        tokenizer_path = tempfile.mkdtemp() + "/sp.model"
        train_sentencepiece([t for e in examples[:20000] for t in (e.query, e.positive)], 8000,
                            tokenizer_path)
    batches = TrainBatches(
        [TrainingDataset(DatasetSpec(name="data", data=args.data), examples)],
        SentencePieceTokenizer(tokenizer_path), batch_size=args.batch_size,
        max_length=args.max_length, num_hard_negatives=args.hard_negatives, seed=0,
        add_eos=False, rows=slice(0, args.batch_size), length_buckets=True)
    iterator = batches.iterate(0)
    next(iterator)
    start = time.perf_counter()
    for _ in range(args.steps):
        next(iterator)
    seconds = time.perf_counter() - start
    print(json.dumps({"data": args.data, "batch_size": args.batch_size,
                      "max_length": args.max_length, "steps": args.steps,
                      "loader_examples_per_second": args.steps * args.batch_size / seconds}))


if __name__ == "__main__":
    main()
