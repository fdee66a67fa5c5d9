"""Training examples/s of `gembed train` as users run it, against sentence-transformers.

gembed side: the CLI itself, in a worker process, `gembed train --gin_file=finetune.gin
--gin_param=INIT_FROM=<all-MiniLM-L6-v2 imported> BATCH_SIZE=... MAX_LENGTH=...` plus only
TRAIN_STEPS, LOG_EVERY (windows of --window steps) and CHECKPOINT_EVERY (no checkpoint inside the
timed steps), each round in a fresh workdir; `--chunk_size=N` adds CHUNK_SIZE=N; `--lora` adds
`--gin_file=lora.gin` and the main job's LoraConfig bindings (read from
experiments/recipes/quickstart.gin's Recipe.finetune_params). Every other setting is the stage
file's default, printed in the result as `gembed_flags`.
Peer side: sentence-transformers all-MiniLM-L6-v2 with MultipleNegativesRankingLoss (or, with
--chunk_size, CachedMultipleNegativesRankingLoss with that mini-batch size), on the same
(query, positive) pairs in the same batches (the finetune stage's default TRAIN_DATA,
builtin:stdlib_code, in gembed's step order), same batch size, max length, learning rate and
warm-up, AdamW, clipping at 1, no dropout, in a loop equivalent to SentenceTransformerTrainer's.
With --lora it trains a peft LoRA adapter of the same rank and alpha on the BERT modules that
the gembed targets name (`SentenceTransformer.add_adapter`; needs `pip install peft`).

After one warm-up round each (gembed compiles there; its persistent compilation cache then serves
later rounds), the two take turns for --repeats rounds. A round's figure is the median examples/s
of its windows after the first. Prints one JSON line: each framework's median and rounds, the ratio,
gembed's compiled shapes, padding share of computed tokens, MFU, peak RSS per pair.

    python benchmarks/train_throughput.py                                # batch 32, length 128
    python benchmarks/train_throughput.py --batch_size=256 --chunk_size=32   # vs CachedMNRL
    python benchmarks/train_throughput.py --lora                         # the main job's LoRA
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import statistics
import tempfile
import time

import _common
from _common import log

WARMUP_STEPS = 10   # finetune.gin's TrainConfig.warmup_steps is 20; both sides use this one
GRAD_CLIP_NORM = 1.0
MAIN_JOB = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "recipes" / "quickstart.gin"
# gembed's MiniLM kernel names (under encoder/layer_N/) -> the BERT module peft adapts.
BERT_MODULES = {"attention/query/kernel": "attention.self.query",
                "attention/key/kernel": "attention.self.key",
                "attention/value/kernel": "attention.self.value",
                "attention/output/kernel": "attention.output.dense",
                "mlp/up/kernel": "intermediate.dense",
                "mlp/down/kernel": "output.dense"}


def main_job_lora() -> dict:
    """The main job's LoRA: its LoraConfig bindings, and the rank, alpha and targets they give."""
    import gin

    from gembed import config, lora, recipe

    config.parse_gin([str(MAIN_JOB)], [])
    try:
        bindings = [p for p in recipe.Recipe().finetune_params if p.startswith("LoraConfig.")]
    finally:
        gin.clear_config()
    config.parse_gin(["lora.gin"], bindings)
    try:
        settings = lora.LoraConfig()
    finally:
        gin.clear_config()
    return {"bindings": bindings, "rank": settings.rank, "alpha": settings.alpha,
            "targets": list(settings.targets)}


def peer_lora_modules(targets: list[str]) -> str:
    """peft's target_modules regex for the BERT modules whose gembed kernels `targets` match."""
    modules = [bert for kernel, bert in BERT_MODULES.items()
               if any(re.search(target, f"encoder/layer_0/{kernel}") for target in targets)]
    if not modules:
        raise ValueError(f"no MiniLM kernel matches the LoRA targets {targets}")
    return rf"encoder\.layer\.\d+\.({'|'.join(re.escape(m) for m in modules)})$"


def gembed_flags(args) -> list[str]:
    """The --gin_param bindings of the benchmarked command, besides INIT_FROM and the workdir."""
    flags = [f"BATCH_SIZE={args.batch_size}", f"MAX_LENGTH={args.max_length}",
             f"TRAIN_STEPS={args.steps}", f"LOG_EVERY={args.window}",
             f"CHECKPOINT_EVERY={args.steps}", f"TrainConfig.warmup_steps={WARMUP_STEPS}"]
    if args.chunk_size:
        flags.append(f"CHUNK_SIZE={args.chunk_size}")
    if args.lora_spec:
        flags += json.loads(args.lora_spec)["bindings"]
    return flags


def gembed_gin_files(args) -> list[str]:
    return ["finetune.gin", "lora.gin"] if args.lora_spec else ["finetune.gin"]


def gembed_worker(args) -> None:
    import numpy as np

    from gembed import cli, flops
    from gembed.config import TrainConfig, parse_gin
    from gembed.data.batching import TrainBatches
    from gembed.data.mixture import load_datasets
    from gembed.model_folder import read_model_folder

    folder = read_model_folder(args.model)
    parse_gin(gembed_gin_files(args), [f"INIT_FROM='{args.model}'", *gembed_flags(args)])
    config = TrainConfig()
    datasets = load_datasets(config.dataset_specs, "train", max_text_chars=config.max_text_chars,
                             skipped=None)
    batches = TrainBatches(datasets, folder.tokenizer, batch_size=config.batch_size,
                           max_length=config.max_length, num_hard_negatives=0, seed=config.seed,
                           add_eos=False, rows=slice(0, config.batch_size),
                           pack_groups=1 if config.packing else 0)
    rounds = 0

    def handle(request: dict) -> dict:
        nonlocal rounds
        if request["op"] == "batches":
            examples = datasets[0].examples
            return {"batches": [[[examples[i].query, examples[i].positive]
                                 for i in batches.example_indices(step)]
                                for step in range(args.steps)]}
        if request["op"] == "peak_flops":
            return {"peak_flops": flops.system_peak()[0]}
        if request["op"] == "peak_rss":
            return {"peak_rss_mb": _common.peak_rss_mb()}
        if request["op"] == "model_flops":
            host = [batches[step] for step in range(args.steps)]
            lengths = np.concatenate([flops.text_lengths(batch) for batch in host])
            return {"model_flops_per_step": flops.train_flops(folder.model_config, lengths) / args.steps,
                    "padding_fraction": 1 - lengths.sum() / sum(b["token_ids"].size for b in host)}
        rounds += 1
        workdir = pathlib.Path(args.tmp) / f"gembed_round{rounds}"
        code = cli.main(["train", *[f"--gin_file={g}" for g in gembed_gin_files(args)],
                         f"--workdir={workdir}",
                         f"--gin_param=INIT_FROM='{args.model}'",
                         *[f"--gin_param={flag}" for flag in gembed_flags(args)]])
        if code != 0:
            raise RuntimeError(f"gembed train exited {code}")
        lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        return {"window_examples_per_second": [line["examples_per_second"] for line in lines],
                "compiled_shapes": lines[-1]["compiled_shapes"], "loss": lines[-1]["loss"]}

    _common.serve(handle)


def peer_worker(args) -> None:
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses
    from transformers import get_linear_schedule_with_warmup

    torch.set_num_threads(os.cpu_count())
    batches: list[list[list[str]]] = []

    def handle(request: dict) -> dict:
        if request["op"] == "batches":
            batches[:] = request["batches"]
            return {}
        if request["op"] == "peak_rss":
            return {"peak_rss_mb": _common.peak_rss_mb()}
        model = SentenceTransformer(str(_common.minilm_source()), device="cpu")
        model.max_seq_length = args.max_length
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        if args.lora_spec:
            from peft import LoraConfig

            spec = json.loads(args.lora_spec)
            model.add_adapter(LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=0.0,
                                         target_modules=peer_lora_modules(spec["targets"])))
        model.train()
        trained = [param for param in model.parameters() if param.requires_grad]
        loss_fn = (losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=args.chunk_size)
                   if args.chunk_size else losses.MultipleNegativesRankingLoss(model))
        optimizer = torch.optim.AdamW(trained, lr=args.learning_rate, weight_decay=0.01,
                                      fused=True)
        schedule = get_linear_schedule_with_warmup(optimizer, WARMUP_STEPS, args.steps)
        if request["op"] == "padding_fraction":
            masks = [model.preprocess([pair[column] for pair in batch])["attention_mask"]
                     for batch in batches for column in (0, 1)]
            return {"padding_fraction": 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)}
        rates, start = [], time.perf_counter()
        for step, batch in enumerate(batches, start=1):
            queries = model.preprocess([pair[0] for pair in batch])
            documents = model.preprocess([pair[1] for pair in batch])
            loss = loss_fn([queries, documents], None)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, GRAD_CLIP_NORM)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if step % args.window == 0:
                now = time.perf_counter()
                rates.append(args.window * len(batch) / (now - start))
                start = now
        return {"window_examples_per_second": rates, "loss": loss.item()}

    _common.serve(handle)


def round_rate(answer: dict) -> float:
    """A round's examples/s: the median of its windows after the first (compilation, warm-up)."""
    return statistics.median(answer["window_examples_per_second"][1:])


def main() -> None:
    parser = _common.argument_parser(__doc__, batch_size=32)
    parser.add_argument("--max_length", type=int, default=128, help="MAX_LENGTH")
    parser.add_argument("--steps", type=int, default=25, help="optimizer steps per round")
    parser.add_argument("--window", type=int, default=5, help="steps per timing window")
    parser.add_argument("--chunk_size", type=int, help="gradient caching (peer: CachedMNRL)")
    parser.add_argument("--lora", action="store_true",
                        help="the main job's LoRA on both sides (peer: peft)")
    parser.add_argument("--lora_spec", help=argparse.SUPPRESS)   # main_job_lora() as JSON
    parser.add_argument("--learning_rate", type=float, default=3e-4,
                        help="the peer's; gembed's is finetune.gin's LEARNING_RATE (3e-4)")
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = _common.parse_or_serve(parser, gembed_worker, peer_worker)
    if args is None:
        return
    args.lora_spec = json.dumps(main_job_lora()) if args.lora else None   # workers get it too

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        extra = [f"--steps={args.steps}", f"--window={args.window}", f"--tmp={tmp}",
                 f"--learning_rate={args.learning_rate}", f"--max_length={args.max_length}"]
        if args.chunk_size:
            extra.append(f"--chunk_size={args.chunk_size}")
        if args.lora_spec:
            extra.append(f"--lora_spec={args.lora_spec}")
        workers = _common.start_workers(__file__, tmp, tmp / "unused.json", args, *extra)
        gembed, peer = workers
        peer.request(op="batches", batches=gembed.request(op="batches")["batches"])
        warmup = {w.name: w.request(op="run") for w in workers}
        log(f"warm-up: {warmup}")
        runs = _common.alternate(workers, args.repeats, op="run")
        model_flops = gembed.request(op="model_flops")
        padding = {"gembed": model_flops["padding_fraction"],
                   "peer": peer.request(op="padding_fraction")["padding_fraction"]}
        peak = gembed.request(op="peak_flops")["peak_flops"]
        rss = {w.name: w.request(op="peak_rss")["peak_rss_mb"] for w in workers}
        for worker in workers:
            worker.close()

    gin_files = [f"--gin_file={name}" for name in gembed_gin_files(args)]
    result = {"benchmark": "train_throughput", "model": "all-MiniLM-L6-v2",
              "gembed_command": " ".join(["gembed train", *gin_files, "--gin_param=INIT_FROM=<minilm>"]),
              "gembed_flags": gembed_flags(args),
              "lora": json.loads(args.lora_spec) if args.lora_spec else None,
              "batch_size": args.batch_size,
              "max_length": args.max_length, "chunk_size": args.chunk_size,
              "steps_per_round": args.steps, "repeats": args.repeats, "peak_flops": peak}
    for name in ("gembed", "peer"):
        rates = [round_rate(answer) for answer in runs[name]]
        speed = statistics.median(rates)
        result[name] = {"examples_per_second": speed, "rounds": [round(r, 3) for r in rates],
                        "mfu": model_flops["model_flops_per_step"] * speed / args.batch_size / peak,
                        "padding_fraction": padding[name], "final_loss": runs[name][-1]["loss"],
                        "peak_rss_mb": rss[name],
                        "peak_rss_mb_per_pair": rss[name] / args.batch_size}
    result["gembed"]["compiled_shapes"] = runs["gembed"][-1]["compiled_shapes"]
    result["ratio"] = result["gembed"]["examples_per_second"] / result["peer"]["examples_per_second"]
    result["round_ratios"] = [round(g / p, 3) for g, p in zip(result["gembed"]["rounds"],
                                                               result["peer"]["rounds"])]
    result["machine"] = _common.machine()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
