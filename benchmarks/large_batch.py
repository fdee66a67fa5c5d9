"""Memory and time of one training step at large contrastive batches, with and without caching.

The model is `experiments/configs/model/small.gin` (MiniLM-L6 size: 6 layers, 384 wide, vocab
30,522) at sequence length 128, symmetric InfoNCE over the global batch, AdamW with clipping: the
real `gembed.train.train_step`, with gradient caching in chunks of 32 pairs per device. Each
configuration is measured in a fresh process, which prints one JSON line:

  planned_gb     XLA's buffer plan of the compiled step (arguments + outputs + temporaries -
                 donated aliases), from compiling alone: the step's memory on the device.
  peak_rss_gb    peak resident memory of that process (Python, JAX and all), when it was run.
  step_seconds   wall time of one step after a warm-up step, when it was run.

Configurations of at most --run_up_to pairs are run (on a 2-core CPU a MiniLM step takes tens of
seconds per 64 pairs, and a plain step at 256 pairs plans 24 GB); larger ones are compiled only.
The plain and cached steps at --time_batch pairs run --repeats times each, alternating, and the
summary gives their median step-time ratio, the largest batch whose plan fits in --budget_gb
(from the plan's linear growth in B, checked by compiling it), and the planned memory of the
cached step at 8,192 pairs over that of the plain step at 256.

    python benchmarks/large_batch.py                    # about 10 minutes on 2 CPU cores
    python benchmarks/large_batch.py --run_up_to=65536  # also runs the large batches (days on CPU)
"""
from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import subprocess
import sys
import time

LENGTH = 128
PAIRS_PER_CHUNK = 32


def measure(batch: int, chunk: int | None, run: bool) -> dict:
    """One configuration, in this process: compile, then (if `run`) time one step after a warm one."""
    import jax
    import numpy as np

    from gembed import config as gin_config, sharding
    from gembed.config import LossConfig, TrainConfig
    from gembed.model import ModelConfig
    from gembed.train import init_state, learning_rate_schedule, make_optimizer, train_step

    gin_config.parse_gin(["model/small.gin"], ["VOCAB_SIZE=30522"])
    model_config = ModelConfig()
    train_config = TrainConfig(train_data="synthetic", batch_size=batch, chunk_size=chunk)
    optimizer = make_optimizer(train_config)
    mesh = sharding.make_mesh()
    replicated, rows = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    step = jax.jit(
        functools.partial(train_step, model_config=model_config, loss_config=LossConfig(),
                          optimizer=optimizer, schedule=learning_rate_schedule(train_config),
                          chunk_size=chunk, mesh=mesh),
        in_shardings=(replicated, rows), out_shardings=(replicated, replicated),
        donate_argnums=0)
    abstract_state = jax.eval_shape(lambda: init_state(model_config, optimizer, seed=0))
    abstract_batch = {
        "token_ids": jax.ShapeDtypeStruct((batch, 2, LENGTH), np.int32),
        "token_mask": jax.ShapeDtypeStruct((batch, 2, LENGTH), np.bool_),
        "text_valid": jax.ShapeDtypeStruct((batch, 2), np.bool_),
        "text_keys": jax.ShapeDtypeStruct((batch, 2, 2), np.int32),
    }
    start = time.perf_counter()
    compiled = step.lower(abstract_state, abstract_batch).compile()
    memory = compiled.memory_analysis()
    planned = (memory.argument_size_in_bytes + memory.output_size_in_bytes
               + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
    result = {"batch": batch, "chunk": chunk, "planned_gb": planned / 2**30,
              "compile_seconds": time.perf_counter() - start}
    if run:
        rng = np.random.default_rng(0)
        host_batch = {
            "token_ids": rng.integers(1000, 30522, size=(batch, 2, LENGTH), dtype=np.int32),
            "token_mask": np.ones((batch, 2, LENGTH), bool),
            "text_valid": np.ones((batch, 2), bool),
            "text_keys": rng.integers(-2**31, 2**31 - 1, size=(batch, 2, 2), dtype=np.int32),
        }
        state = jax.jit(functools.partial(init_state, model_config, optimizer, 0),
                        out_shardings=replicated)()
        placed = sharding.place_batch(host_batch, mesh)
        times = []
        for _ in range(2):
            start = time.perf_counter()
            state, metrics = compiled(state, placed)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        result.update(step_seconds=times[-1],
                      loss=float(metrics["loss"]),
                      peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return result


def in_fresh_process(batch: int, chunk: int | None, run: bool) -> dict:
    """`measure` in a child process, so that its peak RSS is its own."""
    command = [sys.executable, __file__, "--_one", json.dumps([batch, chunk, run])]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result = json.loads(output.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def largest_batch_within(budget_gb: float, small: dict, large: dict) -> dict:
    """The largest power-of-two batch whose cached step plan fits, from two plans, then checked."""
    per_pair = (large["planned_gb"] - small["planned_gb"]) / (large["batch"] - small["batch"])
    fixed = small["planned_gb"] - per_pair * small["batch"]
    batch = large["batch"]
    while fixed + per_pair * batch * 2 <= budget_gb:
        batch *= 2
    checked = in_fresh_process(batch, PAIRS_PER_CHUNK, run=False)
    while checked["planned_gb"] > budget_gb:
        batch //= 2
        checked = in_fresh_process(batch, PAIRS_PER_CHUNK, run=False)
    return checked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_up_to", type=int, default=128,
                        help="run (not only compile) configurations of at most this many pairs")
    parser.add_argument("--time_batch", type=int, default=128,
                        help="batch at which plain and cached step times are compared")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each")
    parser.add_argument("--budget_gb", type=float, default=16.0)
    parser.add_argument("--_one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:
        print(json.dumps(measure(*json.loads(args._one))))
        return

    times = {"plain": [], "cached": []}
    for _ in range(args.repeats):
        times["plain"].append(in_fresh_process(args.time_batch, None, True)["step_seconds"])
        times["cached"].append(
            in_fresh_process(args.time_batch, PAIRS_PER_CHUNK, True)["step_seconds"])
    plain_256 = in_fresh_process(256, None, 256 <= args.run_up_to)
    cached = {batch: in_fresh_process(batch, PAIRS_PER_CHUNK, batch <= args.run_up_to)
              for batch in (1024, 8192, 65536)}
    largest = largest_batch_within(args.budget_gb, cached[8192], cached[65536])
    summary = {
        "time_batch": args.time_batch,
        "cached_over_plain_step_time": statistics.median(times["cached"])
        / statistics.median(times["plain"]),
        "plain_step_seconds": times["plain"], "cached_step_seconds": times["cached"],
        "planned_gb_plain_256": plain_256["planned_gb"],
        "planned_gb_cached": {batch: result["planned_gb"] for batch, result in cached.items()},
        "cached_8192_over_plain_256_planned": cached[8192]["planned_gb"] / plain_256["planned_gb"],
        "largest_batch_within_budget": largest["batch"], "budget_gb": args.budget_gb,
    }
    print(json.dumps({"summary": summary}), flush=True)


if __name__ == "__main__":
    main()
