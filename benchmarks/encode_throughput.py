"""Sentences/s of `encode()`: gembed against sentence-transformers, all-MiniLM-L6-v2, same texts.

Both embed the same --texts texts (the queries and documents of shuffled stdlib docstring/code
pairs), --batch_size texts per call, truncated at --max_length tokens: gembed through
`gembed.load(imported MiniLM).encode` (sorted by token length, padded to four buckets per
octave), the peer through `SentenceTransformer.encode` (sorted by characters, padded to the
batch's longest). Each runs in its own process (`_common.Worker`); after a warm-up pass (gembed
compiles its shapes there), they encode all texts in turn, --repeats rounds, alternating. Prints
one JSON line:

  sentences_per_second  median over the rounds, and every round's figure, per framework
  ratio                 gembed median / peer median
  cosine_min/mean       of gembed's embeddings against the peer's, text by text
  padding_fraction      share of the computed tokens that are padding, as each library pads
  mfu                   model FLOPs (gembed.flops.forward_flops of the real tokens) per second
                        over the device peak (a measured float32 matmul rate on CPU)
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
    from gembed.flops import forward_flops, measured_matmul_peak

    embedder = gembed.load(args.model)
    texts = json.loads(pathlib.Path(args.data).read_text())

    def handle(request: dict) -> dict:
        if request["op"] == "peak_flops":
            return {"peak_flops": measured_matmul_peak()}
        if request["op"] == "model_flops":
            lengths = [len(ids) for ids in embedder.tokenizer.encode(texts, embedder.max_length)]
            return {"model_flops": forward_flops(embedder.model_config, lengths), "lengths": lengths}
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
    model.max_seq_length = args.max_length
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


def padded_tokens(texts: list[str], lengths: list[int], batch_size: int,
                  max_length: int) -> dict[str, int]:
    """Tokens each library computes on: gembed pads token-length-sorted batches to buckets and
    to batch_size rows; sentence-transformers pads character-length-sorted batches to their
    longest text."""
    from gembed.data.batching import bucket_length
    from gembed.embedder import BUCKETS_PER_OCTAVE

    by_tokens = sorted(lengths)
    by_characters = [lengths[i] for i in sorted(range(len(texts)), key=lambda i: -len(texts[i]))]
    starts = range(0, len(texts), batch_size)
    return {
        "gembed": sum(batch_size * bucket_length(max(by_tokens[s:s + batch_size]), max_length,
                                                 BUCKETS_PER_OCTAVE) for s in starts),
        "peer": sum(len(by_characters[s:s + batch_size]) * max(by_characters[s:s + batch_size])
                    for s in starts),
    }


def main() -> None:
    parser = _common.argument_parser(__doc__, batch_size=_common.BATCH_SIZE)
    parser.add_argument("--texts", type=int, default=1024)
    args = _common.parse_or_serve(parser, gembed_worker, peer_worker)
    if args is None:
        return

    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        pairs = _common.stdlib_pairs()[: args.texts // 2]
        texts = [text for pair in pairs for text in pair]
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
    computed = padded_tokens(texts, flops["lengths"], args.batch_size, args.max_length)
    result = {"benchmark": "encode_throughput", "model": "all-MiniLM-L6-v2", "texts": len(texts),
              "batch_size": args.batch_size, "max_length": args.max_length,
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
    result["ratio"] = result["gembed"]["sentences_per_second"] / result["peer"]["sentences_per_second"]
    result["round_ratios"] = [round(g["sentences_per_second"] / p["sentences_per_second"], 3)
                              for g, p in zip(runs["gembed"], runs["peer"])]
    result.update(cosine_min=float(cosines.min()), cosine_mean=float(statistics.fmean(cosines)),
                  machine=_common.machine())
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
