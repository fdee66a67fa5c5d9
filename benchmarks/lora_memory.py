"""Memory of LoRA against full fine-tuning: all-MiniLM-L6-v2 imported, `gembed train` as users run it.

Both runs: `gembed train --gin_file=finetune.gin` from the imported model (INIT_FROM), the same
batch size, max length and steps (packing on, the default); the LoRA run adds `--gin_file=lora.gin`
(rank 8 on the attention query and value kernels; log_scale trains whole; MiniLM has no
projection). Each run is its own process; its peak RSS comes from `os.wait4`. Optimizer-state,
trained-param and frozen-param bytes are those of the TrainState `gembed.train` builds for the
same gin (computed with `jax.eval_shape`). Prints one JSON line per run and a Markdown table.

    nice -n 10 python benchmarks/lora_memory.py [--batch_size=32 --max_length=128 --steps=20]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import _common
from _common import log

MODES = {"full": [], "lora": ["--gin_file=lora.gin"]}


def bindings(args, model_dir: pathlib.Path) -> list[str]:
    return [f"INIT_FROM='{model_dir}'", f"BATCH_SIZE={args.batch_size}",
            f"MAX_LENGTH={args.max_length}", f"TRAIN_STEPS={args.steps}",
            f"CHECKPOINT_EVERY={args.steps}", f"LOG_EVERY={args.steps}"]


def state_bytes(gin_files: list[str], params: list[str]) -> dict[str, int]:
    """Bytes of the trained params, the frozen base and the optimizer state of the run's state."""
    import jax
    from gembed import config, train

    config.parse_gin(gin_files, params)
    stage = config.build_stage_config()
    optimizer = train.make_optimizer(stage.train)
    state = jax.eval_shape(lambda: train.init_state(stage.model, optimizer, 0, stage.lora))

    def size(tree) -> int:
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))

    return {"trained_param_bytes": size(state.params), "frozen_param_bytes": size(state.frozen),
            "optimizer_state_bytes": size(state.opt_state)}


def run(args, mode: str, model_dir: pathlib.Path, root: pathlib.Path) -> dict:
    gin_files = ["finetune.gin", *(flag.split("=", 1)[1] for flag in MODES[mode])]
    params = bindings(args, model_dir)
    command = [sys.executable, "-m", "gembed", "train", f"--workdir={root / mode}",
               *(f"--gin_file={name}" for name in gin_files),
               *(f"--gin_param={binding}" for binding in params)]
    log(f"{mode}: {' '.join(command[2:])}")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{mode} run failed")
    last = json.loads((root / mode / "metrics.jsonl").read_text().splitlines()[-1])
    return {"mode": mode, "peak_rss_bytes": usage.ru_maxrss * 1024,
            **state_bytes(gin_files, params), "loss": last["loss"],
            "examples_per_second": last["examples_per_second"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        subprocess.run([sys.executable, "-m", "gembed", "import",
                        f"--source={_common.minilm_source()}", f"--output={root / 'minilm'}"],
                       check=True, stdout=subprocess.DEVNULL)
        results = [run(args, mode, root / "minilm", root) for mode in MODES]
    for result in results:
        print(json.dumps({**result, "batch_size": args.batch_size, "max_length": args.max_length,
                          "steps": args.steps}))
    mib = 1 << 20
    print("| run | trained params | frozen params | optimizer state | peak RSS | examples/s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['trained_param_bytes'] / mib:.2f} MiB | "
              f"{r['frozen_param_bytes'] / mib:.1f} MiB | {r['optimizer_state_bytes'] / mib:.2f} MiB"
              f" | {r['peak_rss_bytes'] / mib:.0f} MiB | {r['examples_per_second']:.1f} |")


if __name__ == "__main__":
    main()
