"""Peak RSS and step time of the plain MiniLM train step under each `ModelConfig.remat` policy.

all-MiniLM-L6-v2's architecture (model/small.gin at BERT's 30,522-token vocabulary, float32) and
the train step `gembed train` jits (no gradient caching, packing on), on --batch_size (query,
positive) pairs of --length tokens each (every text fills its row: the largest batch of that
shape). Each policy runs in a fresh worker process: compile, --warmup steps, --steps timed steps,
then its peak RSS (`resource.getrusage`, which includes compilation). Prints one JSON line.

    nice python benchmarks/train_memory.py                   # batch 128 x 128 tokens
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import numpy as np

POLICIES = ("none", "dots_saveable", "full")
MINILM = dict(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, mlp_dim=1536,
              mlp_activation="gelu", norm="layernorm", norm_eps=1e-12, norm_position="post",
              final_norm=False, position_embedding="learned", max_position_embeddings=512,
              type_vocab_size=2, embedding_norm=True, pooling="mean", dtype="float32")


def worker(args) -> None:
    from gembed import xla_cpu_flags

    xla_cpu_flags.apply()   # the XLA:CPU settings the gembed command runs with
    from gpu_check import run_gembed

    from gembed.model import ModelConfig

    model = ModelConfig(**MINILM, remat=args.policy)
    lengths = np.full((args.batch_size, 2), args.length)
    result = run_gembed(model, args, lengths)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["examples_per_second"] = args.batch_size / result["seconds_per_step"]
    print(json.dumps({"policy": args.policy, **result}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--policy", help=argparse.SUPPRESS)   # worker process
    args = parser.parse_args()
    if args.policy:
        return worker(args)
    results = {}
    for policy in args.policies.split(","):
        command = [sys.executable, __file__, f"--policy={policy}", f"--batch_size={args.batch_size}",
                   f"--length={args.length}", f"--steps={args.steps}", f"--warmup={args.warmup}"]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[policy] = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps({"batch_size": args.batch_size, "length": args.length, "policies": results}))


if __name__ == "__main__":
    main()
