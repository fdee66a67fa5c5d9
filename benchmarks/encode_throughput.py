"""Sentences/s of `encode()`: gembed against sentence-transformers, all-MiniLM-L6-v2, same texts.

Both embed the same --texts code texts (functions of the stdlib_code corpus) with `batch_size`
--batch_size at the model's own max length (all-MiniLM-L6-v2's sentence-transformers config: 256
tokens): gembed exactly as users call it, `gembed.load(<the model folder gembed import writes>)
.encode(texts, batch_size=...)` with nothing else set (token-length-sorted calls of a fixed token
budget), the peer through `SentenceTransformer.encode` (sorted by characters, padded to the
batch's longest). Each runs in its own process (`_common.Worker`); after a warm-up pass (gembed
compiles its shapes there), they encode all texts in turn, --repeats rounds, alternating. Prints
one JSON line:

  sentences_per_second  median over the rounds, and every round's figure, per framework
  ratio                 gembed median / peer median
  cosine_min/mean       of gembed's embeddings against the peer's, text by text
  padding_fraction      share of the computed tokens that are padding, as each library pads
  compiled_shapes       distinct [rows, length] shapes of gembed's calls
  mfu                   model FLOPs (gembed.flops.forward_flops of the real tokens) per second
                        over the device peak (on CPU a measured matmul rate, gembed.flops)
  warmup_seconds, peak_rss_mb, machine (load average at the end)

    HF_HUB_OFFLINE=1 python benchmarks/encode_throughput.py    # about 5 minutes on 2 CPU cores
"""
from __future__ import annotations

import json
import os
import pathlib
import statistics
import tempfile
import time

import _common
from _common import log


def gembed_worker(args) -> None:
    import numpy as np

    import gembed
    from gembed.embedder import plan_calls
    from gembed.flops import forward_flops, measured_matmul_peak

    embedder = gembed.load(args.model)
    texts = json.loads(pathlib.Path(args.data).read_text())

    def handle(request: dict) -> dict:
        if request["op"] == "peak_flops":
            return {"peak_flops": measured_matmul_peak()}
        if request["op"] == "model_flops":
            lengths = [len(ids) for ids in embedder.tokenizer.encode(texts, embedder.max_length)]
            calls = plan_calls(lengths, embedder.max_length, args.batch_size * embedder.max_length)
            return {"model_flops": forward_flops(embedder.model_config, lengths), "lengths": lengths,
                    "max_length": embedder.max_length,
                    "computed_tokens": sum(call.rows * call.length for call in calls),
                    "compiled_shapes": len({(call.rows, call.length) for call in calls})}
        if request["op"] == "peak_rss":
            return {"peak_rss_mb": _common.peak_rss_mb()}
        start = time.perf_counter()
        embeddings = embedder.encode(texts, batch_size=args.batch_size)
        seconds = time.perf_counter() - start
        if request["op"] == "warmup":
            np.save(request["save"], embeddings)
        return {"seconds": seconds, "sentences_per_second": len(texts) / seconds}

    _common.serve(handle)


def peer_worker(args) -> None:
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(os.cpu_count())
    model = SentenceTransformer(str(_common.minilm_source()), device="cpu")
    texts = json.loads(pathlib.Path(args.data).read_text())

    def handle(request: dict) -> dict:
        if request["op"] == "peak_rss":
            return {"peak_rss_mb": _common.peak_rss_mb()}
        start = time.perf_counter()
        embeddings = model.encode(texts, batch_size=args.batch_size, normalize_embeddings=True,
                                  convert_to_numpy=True)
        seconds = time.perf_counter() - start
        if request["op"] == "warmup":
            np.save(request["save"], embeddings)
        return {"seconds": seconds, "sentences_per_second": len(texts) / seconds}

    _common.serve(handle)


def peer_padded_tokens(texts: list[str], lengths: list[int], batch_size: int) -> int:
    """Tokens sentence-transformers computes on: character-length-sorted batches padded to their
    longest text."""
    by_characters = [lengths[i] for i in sorted(range(len(texts)), key=lambda i: -len(texts[i]))]
    return sum(len(by_characters[s:s + batch_size]) * max(by_characters[s:s + batch_size])
               for s in range(0, len(texts), batch_size))


def main() -> None:
    parser = _common.argument_parser(__doc__, batch_size=_common.BATCH_SIZE)
    parser.add_argument("--texts", type=int, default=1000)
    args = _common.parse_or_serve(parser, gembed_worker, peer_worker)
    if args is None:
        return

    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        texts = _common.stdlib_code_texts(args.texts)
        (tmp / "texts.json").write_text(json.dumps(texts))
        workers = _common.start_workers(__file__, tmp, tmp / "texts.json", args)
        gembed, peer = workers
        peaks = [gembed.request(op="peak_flops")["peak_flops"]]
        warmup = {w.name: w.request(op="warmup", save=str(tmp / f"{w.name}.npy"))["seconds"]
                  for w in workers}
        log(f"warm-up seconds (gembed compiles here): {warmup}")
        runs = _common.alternate(workers, args.repeats, op="run")
        peaks.append(gembed.request(op="peak_flops")["peak_flops"])
        flops = gembed.request(op="model_flops")
        rss = {w.name: w.request(op="peak_rss")["peak_rss_mb"] for w in workers}
        for worker in workers:
            worker.close()
        cosines = np.sum(np.load(tmp / "gembed.npy") * np.load(tmp / "peer.npy"), axis=1)

    peak = max(peaks)
    real = sum(flops["lengths"])
    computed = {"gembed": flops["computed_tokens"],
                "peer": peer_padded_tokens(texts, flops["lengths"], args.batch_size)}
    result = {"benchmark": "encode_throughput", "model": "all-MiniLM-L6-v2", "texts": len(texts),
              "batch_size": args.batch_size, "max_length": flops["max_length"],
              "repeats": args.repeats, "real_tokens": real,
              "peak_flops": peak, "peak_flops_measured": peaks}
    for name in ("gembed", "peer"):
        speed = _common.median_of(runs[name], "sentences_per_second")
        result[name] = {
            "sentences_per_second": speed,
            "rounds": [round(answer["sentences_per_second"], 2) for answer in runs[name]],
            "mfu": flops["model_flops"] / (len(texts) / speed) / peak,
            "padding_fraction": 1 - real / computed[name],
            "warmup_seconds": warmup[name], "peak_rss_mb": rss[name]}
    result["gembed"]["compiled_shapes"] = flops["compiled_shapes"]
    result["ratio"] = result["gembed"]["sentences_per_second"] / result["peer"]["sentences_per_second"]
    result["round_ratios"] = [round(g["sentences_per_second"] / p["sentences_per_second"], 3)
                              for g, p in zip(runs["gembed"], runs["peer"])]
    result.update(cosine_min=float(cosines.min()), cosine_mean=float(statistics.fmean(cosines)),
                  machine=_common.machine())
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
