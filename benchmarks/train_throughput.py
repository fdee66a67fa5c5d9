"""Training examples/s: gembed against sentence-transformers, all-MiniLM-L6-v2, same batches.

Both train on the same --steps batches of --batch_size (query, positive) pairs of the stdlib
docstring/code corpora, texts truncated at --max_length tokens, with the same objective and
optimizer, each in its own process (`_common.Worker`). A timed pass runs the --steps optimizer
steps (batch preparation, forward, backward, update) from the first batch's preparation to the
last update's completion; after a warm-up pass (gembed compiles its shapes there) the two take
turns, --repeats rounds. Prints one JSON line:

  examples_per_second   median over the rounds (pairs per second), and every round's figure
  ratio                 gembed median / peer median
  padding_fraction      share of the computed tokens that are padding
  mfu                   model FLOPs (gembed.flops.train_flops of the real tokens) per second
                        over the device peak (a measured float32 matmul rate on CPU)
  warmup_seconds, compiled_shapes, peak_rss_mb, machine (load average at the end)

What each side runs (like with like):
  gembed  `gembed.train.train_step` (jitted, state donated) on `TrainBatches` with packing
          (queries and documents packed into max_length rows, segment-aware attention), the
          prefetching `iterate()` loader; float32; one-way InfoNCE query -> all in-batch
          documents (LossConfig(symmetric=False, mask_duplicates=False)), learnable scale
          starting at 20.
  peer    MultipleNegativesRankingLoss (query -> all in-batch documents, scale 20) over
          `model.preprocess` batches (queries and documents each padded to their longest),
          float32, as SentenceTransformerTrainer runs it.
  both    AdamW (lr 2e-5, weight decay 0.01; the peer's fused kernel, the Trainer's default),
          gradient clipping at norm 1, no dropout (gembed's MiniLM import has none; the
          peer's dropout modules are set to p=0).

    HF_HUB_OFFLINE=1 python benchmarks/train_throughput.py    # about 8 minutes on 2 CPU cores
"""
from __future__ import annotations

import json
import os
import pathlib
import tempfile
import time

import _common
from _common import log

LEARNING_RATE = 2e-5
WEIGHT_DECAY = 0.01
GRAD_CLIP_NORM = 1.0


def gembed_worker(args) -> None:
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from gembed.config import LossConfig, TrainConfig
    from gembed.data.batching import TrainBatches
    from gembed.data.examples import Example
    from gembed.data.mixture import DatasetSpec, TrainingDataset
    from gembed.flops import measured_matmul_peak, text_lengths, train_flops
    from gembed.model_folder import read_model_folder
    from gembed.train import TrainState, learning_rate_schedule, make_optimizer, train_step

    folder = read_model_folder(args.model)
    pairs = json.loads(pathlib.Path(args.data).read_text())
    dataset = TrainingDataset(DatasetSpec(name="stdlib", data="benchmark"),
                              [Example(query, positive) for query, positive in pairs])
    config = TrainConfig(train_data="benchmark", batch_size=args.batch_size,
                         max_length=args.max_length, learning_rate=LEARNING_RATE,
                         warmup_steps=0, train_steps=10**6, weight_decay=WEIGHT_DECAY,
                         grad_clip_norm=GRAD_CLIP_NORM, packing=True)
    batches = TrainBatches([dataset], folder.tokenizer, batch_size=args.batch_size,
                           max_length=args.max_length, num_hard_negatives=0, seed=0,
                           add_eos=False, rows=slice(0, args.batch_size), packing=config.packing)
    optimizer = make_optimizer(config)
    step_fn = jax.jit(functools.partial(
        train_step, model_config=folder.model_config,
        loss_config=LossConfig(symmetric=False, mask_duplicates=False), optimizer=optimizer,
        schedule=learning_rate_schedule(config)), donate_argnums=0)
    params = jax.device_put(folder.params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=optimizer.init(params), rng=jax.random.PRNGKey(0))

    def handle(request: dict) -> dict:
        nonlocal state
        if request["op"] == "batches":
            return {"batches": [batches.example_indices(step).tolist() for step in range(args.steps)]}
        if request["op"] == "peak_flops":
            return {"peak_flops": measured_matmul_peak()}
        if request["op"] == "peak_rss":
            return {"peak_rss_mb": _common.peak_rss_mb()}
        if request["op"] == "model_flops":
            host = [batches[step] for step in range(args.steps)]
            lengths = np.concatenate([text_lengths(batch) for batch in host])
            return {"model_flops": train_flops(folder.model_config, lengths),
                    "padding_fraction": 1 - sum(lengths) / sum(b["token_ids"].size for b in host),
                    "compiled_shapes": len({b["token_ids"].shape for b in host})}
        start = time.perf_counter()
        host_batches = batches.iterate(0, num_steps=args.steps)
        for _ in range(args.steps):
            state, metrics = step_fn(state, next(host_batches))
        loss = float(metrics["loss"])   # waits for the last step
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "examples_per_second": args.steps * args.batch_size / seconds,
                "loss": loss}

    _common.serve(handle)


def peer_worker(args) -> None:
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    torch.set_num_threads(os.cpu_count())
    model = SentenceTransformer(str(_common.minilm_source()), device="cpu")
    model.max_seq_length = args.max_length
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()
    loss_fn = MultipleNegativesRankingLoss(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY,
                                  fused=True)
    pairs = json.loads(pathlib.Path(args.data).read_text())
    batches: list[list[int]] = []

    def handle(request: dict) -> dict:
        if request["op"] == "batches":
            batches[:] = request["batches"]
            return {}
        if request["op"] == "peak_rss":
            return {"peak_rss_mb": _common.peak_rss_mb()}
        if request["op"] == "padding_fraction":
            masks = [model.preprocess([pairs[i][column] for i in batch])["attention_mask"]
                     for batch in batches for column in (0, 1)]
            return {"padding_fraction": 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)}
        start = time.perf_counter()
        for batch in batches:
            queries = model.preprocess([pairs[i][0] for i in batch])
            documents = model.preprocess([pairs[i][1] for i in batch])
            loss = loss_fn([queries, documents], None)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "examples_per_second": len(batches) * len(batches[0]) / seconds,
                "loss": loss.item()}

    _common.serve(handle)


def main() -> None:
    parser = _common.argument_parser(__doc__, batch_size=32)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per timed pass")
    args = _common.parse_or_serve(parser, gembed_worker, peer_worker)
    if args is None:
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "pairs.json").write_text(json.dumps(_common.stdlib_pairs()))
        workers = _common.start_workers(__file__, tmp, tmp / "pairs.json", args,
                                        f"--steps={args.steps}")
        gembed, peer = workers
        peer.request(op="batches", batches=gembed.request(op="batches")["batches"])
        peaks = [gembed.request(op="peak_flops")["peak_flops"]]
        warmup = {w.name: w.request(op="run")["seconds"] for w in workers}
        log(f"warm-up seconds (gembed compiles here): {warmup}")
        runs = _common.alternate(workers, args.repeats, op="run")
        peaks.append(gembed.request(op="peak_flops")["peak_flops"])
        flops = gembed.request(op="model_flops")
        padding = {"gembed": flops["padding_fraction"],
                   "peer": peer.request(op="padding_fraction")["padding_fraction"]}
        rss = {w.name: w.request(op="peak_rss")["peak_rss_mb"] for w in workers}
        for worker in workers:
            worker.close()

    peak = max(peaks)
    examples = args.steps * args.batch_size
    result = {"benchmark": "train_throughput", "model": "all-MiniLM-L6-v2",
              "batch_size": args.batch_size, "max_length": args.max_length, "steps": args.steps,
              "repeats": args.repeats, "peak_flops": peak, "peak_flops_measured": peaks}
    for name in ("gembed", "peer"):
        speed = _common.median_of(runs[name], "examples_per_second")
        result[name] = {
            "examples_per_second": speed,
            "rounds": [round(answer["examples_per_second"], 3) for answer in runs[name]],
            "mfu": flops["model_flops"] / (examples / speed) / peak,
            "padding_fraction": padding[name], "warmup_seconds": warmup[name],
            "final_loss": runs[name][-1]["loss"], "peak_rss_mb": rss[name]}
    result["gembed"]["compiled_shapes"] = flops["compiled_shapes"]
    result["ratio"] = result["gembed"]["examples_per_second"] / result["peer"]["examples_per_second"]
    result["round_ratios"] = [round(g["examples_per_second"] / p["examples_per_second"], 3)
                              for g, p in zip(runs["gembed"], runs["peer"])]
    result["machine"] = _common.machine()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
