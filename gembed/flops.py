"""Model FLOPs of the embedding model and model FLOPs utilisation (MFU).

Model FLOPs count the matmuls of the useful work only, 2 per multiply-add: the dense layers at
every real token, and attention (QK^T and PV) over each text's own tokens. Padding, packing's
masked attention, norms, activations and the embedding lookups are not counted. A training step
is 3x its forward pass (the backward pass takes two matmuls per forward matmul).

The peak is the datasheet dense bfloat16 peak for accelerators, and on CPU a measured matmul rate
(the best of a few timed 1536x1536 matmuls; bfloat16 inputs with float32 sums on CPUs with
bfloat16 dot instructions, else float32), since CPU datasheets rarely state one.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gembed.model import ModelConfig
from gembed.cpu_matmul_speed import bfloat16_is_faster, matmul_flops

# Dense bfloat16 FLOP/s per device, from the vendors' datasheets: the first key that is a
# substring of `device_kind` wins (JAX calls v5e "TPU v5 lite" and v5p "TPU v5").
DATASHEET_PEAKS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6": 918e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
}


def dense_flops_per_token(config: ModelConfig) -> float:
    """FLOPs of the dense layers of all blocks at one token (attention scores excluded)."""
    width, heads, kv_heads, head_dim = (config.hidden_size, config.num_heads,
                                        config.effective_num_kv_heads, config.effective_head_dim)
    attention = width * (heads + 2 * kv_heads) * head_dim + heads * head_dim * width
    mlp = width * config.mlp_dim * (3 if config.mlp_gated else 2)
    return 2.0 * config.num_layers * (attention + mlp)


def forward_flops(config: ModelConfig, lengths: Sequence[int] | np.ndarray) -> float:
    """Model FLOPs of embedding texts of these token lengths (one forward pass); texts of length
    0 (absent hard-negative slots) cost nothing."""
    lengths = np.asarray(lengths, np.float64)
    attention = 2.0 * 2.0 * config.num_layers * config.num_heads * config.effective_head_dim
    flops = dense_flops_per_token(config) * lengths.sum() + attention * np.square(lengths).sum()
    if config.projection_dim is not None:
        flops += 2.0 * config.hidden_size * config.projection_dim * np.count_nonzero(lengths)
    return float(flops)


def text_lengths(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Real tokens of every text slot of a host batch (`TrainBatches`, padded or packed), int[b*(2+k)]."""
    mask = batch["token_mask"]
    if "segment_ids" in batch:   # [G, R, L], segment ids within each group
        groups = mask.shape[0]
        texts_per_group = batch["text_valid"].size // groups
        texts = batch["segment_ids"] + (np.arange(groups) * texts_per_group)[:, None, None]
        return np.bincount(texts[mask], minlength=batch["text_valid"].size)
    return mask.sum(axis=-1).reshape(-1)


def train_flops(config: ModelConfig, lengths: Sequence[int] | np.ndarray) -> float:
    """Model FLOPs of a training step (forward and backward) over texts of these lengths."""
    return 3.0 * forward_flops(config, lengths)


def cpu_peak_input_dtype() -> jnp.dtype:
    """The matmul input dtype of the CPU's peak: bfloat16 where it is the faster one (what
    ModelConfig.matmul_precision="auto" takes)."""
    return jnp.dtype(jnp.bfloat16 if bfloat16_is_faster() else jnp.float32)


def measured_matmul_peak(size: int = 1536, repeats: int = 4) -> float:
    """FLOP/s of the fastest of `repeats` [size, size] matmuls on the default device, inputs of
    `cpu_peak_input_dtype()`, float32 sums."""
    return matmul_flops(cpu_peak_input_dtype(), (size, size, size), repeats)


def datasheet_peak(device_kind: str) -> float | None:
    """Dense bf16 FLOP/s of a device of this `device_kind`, or None when the table lacks it."""
    return next((peak for name, peak in DATASHEET_PEAKS.items()
                 if name.lower() in device_kind.lower()), None)


def device_peak() -> tuple[float, str]:
    """(FLOP/s, where it comes from) for the default device: datasheet, else measured."""
    kind = jax.devices()[0].device_kind
    peak = datasheet_peak(kind)
    if peak is not None:
        return peak, f"datasheet bf16 dense ({kind})"
    return (measured_matmul_peak(),
            f"measured {cpu_peak_input_dtype().name} 1536x1536 matmul ({kind})")


@functools.cache
def system_peak() -> tuple[float, str]:
    """(FLOP/s, where it comes from) of all devices of all processes together: on GPU/TPU the
    datasheet peak times the device count; on CPU the measured rate times the process count (one
    machine per process; a process's CPU devices share its cores). Measured once per process."""
    peak, source = device_peak()
    if jax.devices()[0].platform == "cpu":
        return peak * jax.process_count(), source
    return peak * jax.device_count(), source
