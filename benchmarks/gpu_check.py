"""Device check for a lent GPU (one command, well under 8 minutes): a base-size bfloat16 train step of
gembed with packing and the attention `ModelConfig.attention="auto"` picks, against the same step
in PyTorch (transformers' BERT with SDPA attention, the model sentence-transformers wraps, mean
pooling and the in-batch-negatives loss, bfloat16 autocast, padded rows as sentence-transformers
batches them).

Both sides train a BERT-base-shaped encoder (768 wide, 12 layers, 12 heads, GELU MLP 3072,
post-norm, learned positions) from random init on the same synthetic pairs: --batch_size
(query, positive) pairs of token lengths drawn uniformly from [--min_length, --length]. gembed packs
the texts into --length rows; PyTorch pads each side to its longest text. After --warmup steps,
--steps steps are timed. MFU = model FLOPs (`gembed.flops.train_flops`, real tokens only) per
second over the datasheet bf16 peak of the device (`gembed.flops.datasheet_peak`; on CPU the
measured matmul rate, `gembed.flops.measured_matmul_peak`). Prints one JSON line.

    python benchmarks/gpu_check.py                 # batch 256 x 512 tokens
    python benchmarks/gpu_check.py --smoke         # tiny sizes; checks the script on a CPU
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from gembed import flops, sharding
from gembed.config import LossConfig, StageConfig, TrainConfig
from gembed.data.packing import pack
from gembed.model import ModelConfig
from gembed.model.attention import current_platform, resolve
from gembed.train import init_state, jit_train_step, make_optimizer, state_shardings

VOCAB = 30522
BASE = dict(vocab_size=VOCAB, hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072,
            mlp_activation="gelu", norm="layernorm", norm_eps=1e-12, norm_position="post",
            final_norm=False, position_embedding="learned", max_position_embeddings=512,
            type_vocab_size=2, embedding_norm=True, pooling="mean", dtype="bfloat16")
SMOKE = dict(BASE, hidden_size=64, num_layers=2, num_heads=4, mlp_dim=256, dtype="float32")


def synthetic_lengths(args) -> np.ndarray:
    """int[batch, 2] token lengths of the (query, positive) texts."""
    rng = np.random.default_rng(0)
    return rng.integers(args.min_length, args.length + 1, (args.batch_size, 2))


def gembed_batch(lengths: np.ndarray, length: int) -> dict[str, np.ndarray]:
    """A packed `TrainBatches`-style host batch (one group) of random tokens."""
    rng = np.random.default_rng(1)
    texts = [list(rng.integers(1, VOCAB, n)) for n in lengths.reshape(-1)]
    packed = pack(texts, length, pad_id=0)
    keys = np.arange(lengths.size * 2, dtype=np.int32).reshape(*lengths.shape, 2)
    return {**{name: value[None] for name, value in packed.items()},
            "text_valid": np.ones(lengths.shape, bool), "text_keys": keys}


def time_steps(step, state, batch, warmup: int, steps: int) -> tuple[float, object]:
    for _ in range(warmup):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return time.perf_counter() - start, state


def run_gembed(model: ModelConfig, args, lengths) -> dict:
    train = TrainConfig(train_data="synthetic", batch_size=args.batch_size,
                        max_length=args.length, train_steps=1000, warmup_steps=10)
    stage = StageConfig(train=train, model=model, loss=LossConfig())
    mesh = sharding.make_mesh(1, jax.devices()[:1])
    optimizer = make_optimizer(train)
    shardings = state_shardings(stage, optimizer, mesh)
    state = jax.jit(lambda: init_state(model, optimizer, 0), out_shardings=shardings)()
    step = jit_train_step(stage, optimizer, mesh, shardings)
    batch = sharding.place_batch(gembed_batch(lengths, args.length), mesh)
    start = time.perf_counter()
    state, _ = step(state, batch)
    jax.block_until_ready(state)
    compile_seconds = time.perf_counter() - start
    seconds, _ = time_steps(step, state, batch, args.warmup, args.steps)
    return {"seconds_per_step": seconds / args.steps, "compile_seconds": compile_seconds,
            "rows": int(batch["token_ids"].shape[1])}


def run_torch(model: ModelConfig, args, lengths) -> dict:
    import torch
    from transformers import BertConfig, BertModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bert = BertModel(BertConfig(
        vocab_size=VOCAB, hidden_size=model.hidden_size, num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_heads, intermediate_size=model.mlp_dim,
        max_position_embeddings=model.max_position_embeddings, attn_implementation="sdpa",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), add_pooling_layer=False).to(device)
    optimizer = torch.optim.AdamW(bert.parameters(), lr=1e-4)
    rng = np.random.default_rng(1)

    def side(column):
        width = int(lengths[:, column].max())
        ids = np.zeros((len(lengths), width), np.int64)
        for row, n in enumerate(lengths[:, column]):
            ids[row, :n] = rng.integers(1, VOCAB, n)
        ids = torch.from_numpy(ids).to(device)
        return ids, (ids != 0).long()

    sides = [side(0), side(1)]
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=model.dtype == "bfloat16")

    def step():
        with autocast:
            embeddings = []
            for ids, mask in sides:
                hidden = bert(input_ids=ids, attention_mask=mask).last_hidden_state
                weights = mask.unsqueeze(-1).to(hidden.dtype)
                embeddings.append(torch.nn.functional.normalize(
                    (hidden * weights).sum(1) / weights.sum(1), dim=-1).float())
            scores = embeddings[0] @ embeddings[1].T * 20.0
            loss = torch.nn.functional.cross_entropy(
                scores, torch.arange(len(scores), device=device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(bert.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup + 1):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    return {"seconds_per_step": (time.perf_counter() - start) / args.steps,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=256, help="(query, positive) pairs")
    parser.add_argument("--length", type=int, default=512, help="max tokens per text, row length")
    parser.add_argument("--min_length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU check)")
    parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch side")
    args = parser.parse_args()
    if args.smoke:
        args.batch_size, args.length, args.min_length, args.steps, args.warmup = 8, 128, 16, 2, 1
    model = ModelConfig(**(SMOKE if args.smoke else BASE))
    lengths = synthetic_lengths(args)
    step_flops = flops.train_flops(model, lengths.reshape(-1))
    peak, peak_source = flops.device_peak()
    device = jax.devices()[0]
    result = {"device": device.device_kind, "peak_flops": peak, "peak_source": peak_source,
              "model": "smoke" if args.smoke else "bert-base", "dtype": model.dtype,
              "batch_size": args.batch_size, "length": args.length,
              "real_tokens_per_step": int(lengths.sum()), "model_flops_per_step": step_flops,
              "attention": resolve(model.attention, current_platform(), model.compute_dtype,
                                   model.effective_head_dim, args.length)}
    sides = {"gembed": run_gembed(model, args, lengths)}
    if not args.no_torch:
        sides["torch_sdpa"] = run_torch(model, args, lengths)
    for name, side in sides.items():
        side["tokens_per_second"] = lengths.sum() / side["seconds_per_step"]
        side["mfu"] = step_flops / side["seconds_per_step"] / peak
        result[name] = side
    if "torch_sdpa" in sides:
        result["gembed_over_torch"] = (sides["torch_sdpa"]["seconds_per_step"]
                                       / sides["gembed"]["seconds_per_step"])
    print(json.dumps(result, default=float))


if __name__ == "__main__":
    main()
