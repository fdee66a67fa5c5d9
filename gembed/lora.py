"""LoRA (Hu et al., 2021) as a params transform: the model code is unchanged.

A LoRA run keeps two trees instead of one params tree (names are "/"-joined, as everywhere):
  trainable  float32: for every base leaf K f32[in, out] whose name a `targets` regex finds, the
             adapters NAME/lora_a f32[in, r] and NAME/lora_b f32[r, out]; plus every base leaf a
             `trainable` regex finds (the temperature log_scale, the projection, ...), whole.
  frozen     every other base leaf, in `base_dtype`.
`merge` gives the model's params: K + (alpha / r) · lora_a @ lora_b for each target (float32), the
trainable leaves, and the frozen ones. lora_b starts at zero, so a new run starts as its base
exactly. Only the trainable tree is differentiated, updated, given optimizer state and checkpointed;
the frozen base is re-read from the run's INIT_FROM (recorded in the workdir's lora.json).

Dropout (`dropout` > 0) zeroes input rows of lora_a, one mask per step (per gradient-cache chunk)
shared by every token: the adapter path sees dropped input features as in LoRA's dropout, but the
mask is not drawn per token, so the merged form stays one matrix.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import gin
import jax
import jax.numpy as jnp
from flax import traverse_util

from gembed.errors import GembedUserError

ADAPTER_A, ADAPTER_B = "lora_a", "lora_b"
BASE_DTYPES = ("float32", "bfloat16")
DROPOUT_STREAM = 0x10A   # fold_in constant: adapter dropout keys differ from the model's


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA fine-tuning (experiments/configs/lora.gin); rank 0 trains every param (the default).

    `targets`, `trainable`: regexes searched (`re.search`) in "/"-joined param names, the rule
    style of `ShardingConfig.param_rules`.
    """

    rank: int = 0                   # adapter rank r; 0 = off (full fine-tuning)
    alpha: float = 16.0             # the update is (alpha / r) · lora_a @ lora_b
    dropout: float = 0.0            # drop rate of lora_a's input rows (module docstring)
    targets: tuple[str, ...] = (r"attention/(query|value)/kernel$",)   # 2-D leaves to adapt
    trainable: tuple[str, ...] = (r"^log_scale$", r"^projection/")     # also trained, whole
    base_dtype: str = "float32"     # the frozen base's dtype: 'float32' | 'bfloat16'

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "trainable", tuple(self.trainable))
        checks = [(self.rank >= 0, f"LoraConfig.rank={self.rank} must be >= 0"),
                  (self.alpha > 0, f"LoraConfig.alpha={self.alpha} must be > 0"),
                  (0 <= self.dropout < 1, f"LoraConfig.dropout={self.dropout} must be in [0, 1)"),
                  (self.base_dtype in BASE_DTYPES,
                   f"LoraConfig.base_dtype={self.base_dtype!r} must be one of {BASE_DTYPES}")]
        for ok, message in checks:
            if not ok:
                raise GembedUserError(f"{message}; fix the binding in your gin file or --gin_param.")
        for field in ("targets", "trainable"):
            for pattern in getattr(self, field):
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise GembedUserError(f"LoraConfig.{field}: {pattern!r} is not a valid regex "
                                          f"({e}); fix the binding.") from None

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        """alpha / rank, the factor of lora_a @ lora_b."""
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict) -> "LoraConfig":
        return cls(**fields)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(re.search(pattern, name) for pattern in patterns)


def target_names(flat_base: dict[str, Any], config: LoraConfig) -> list[str]:
    """The sorted names of the base leaves that get adapters (checked: some, all 2-D, untrained)."""
    names = sorted(name for name in flat_base if _matches(name, config.targets))
    if not names:
        raise GembedUserError(f"LoraConfig.targets={config.targets!r} match no param of the model; "
                              f"fix the regexes (names look like encoder/layer_0/attention/query/kernel).")
    for name in names:
        if len(flat_base[name].shape) != 2:
            raise GembedUserError(f"LoraConfig.targets: {name} has shape {flat_base[name].shape}; "
                                  f"only 2-D kernels take adapters; narrow the regexes.")
        if _matches(name, config.trainable):
            raise GembedUserError(f"LoraConfig: {name} is both a target and trainable; drop it "
                                  f"from one of targets and trainable.")
    return names


def split(base: dict, rng: jax.Array, *, config: LoraConfig) -> tuple[dict, dict]:
    """(trainable, frozen) of base params (module docstring); lora_a ~ U(±1/sqrt(in)) (Kaiming
    uniform as in PEFT), lora_b = 0."""
    flat = traverse_util.flatten_dict(base, sep="/")
    targets = target_names(flat, config)
    trainable = {name: value.astype(jnp.float32) for name, value in flat.items()
                 if _matches(name, config.trainable)}
    for index, name in enumerate(targets):
        fan_in, fan_out = flat[name].shape
        bound = 1.0 / fan_in ** 0.5
        trainable[f"{name}/{ADAPTER_A}"] = jax.random.uniform(
            jax.random.fold_in(rng, index), (fan_in, config.rank), jnp.float32, -bound, bound)
        trainable[f"{name}/{ADAPTER_B}"] = jnp.zeros((config.rank, fan_out), jnp.float32)
    return (traverse_util.unflatten_dict(trainable, sep="/"), frozen_of(base, config=config))


def frozen_of(base: dict, *, config: LoraConfig) -> dict:
    """The frozen tree of base params: the leaves no `trainable` regex finds, in base_dtype."""
    flat = traverse_util.flatten_dict(base, sep="/")
    return traverse_util.unflatten_dict(
        {name: value.astype(config.base_dtype) for name, value in flat.items()
         if not _matches(name, config.trainable)}, sep="/")


def merge(trainable: dict, frozen: dict, rng: jax.Array | None = None, *,
          config: LoraConfig) -> dict:
    """The model params of a LoRA run: targets K + scale · lora_a @ lora_b (float32), trainable and
    frozen leaves as they are. With `rng` and dropout > 0, lora_a's input rows are dropped."""
    params = traverse_util.flatten_dict(frozen, sep="/")
    adapters = {}
    for name, value in traverse_util.flatten_dict(trainable, sep="/").items():
        target, _, leaf = name.rpartition("/")
        if leaf in (ADAPTER_A, ADAPTER_B):
            adapters.setdefault(target, {})[leaf] = value
        else:
            params[name] = value
    for index, (name, pair) in enumerate(sorted(adapters.items())):
        lora_a = pair[ADAPTER_A]
        if rng is not None and config.dropout > 0:
            key = jax.random.fold_in(jax.random.fold_in(rng, DROPOUT_STREAM), index)
            keep = jax.random.bernoulli(key, 1.0 - config.dropout, (lora_a.shape[0], 1))
            lora_a = jnp.where(keep, lora_a / (1.0 - config.dropout), 0.0)
        params[name] = params[name].astype(jnp.float32) + config.scale * (lora_a @ pair[ADAPTER_B])
    return traverse_util.unflatten_dict(params, sep="/")


def combine(params: Any, frozen: Any, rng: jax.Array | None, *, config: LoraConfig | None) -> Any:
    """The model params of what trains (`params`) and the `frozen` tree: `merge` for a LoRA run,
    `params` itself otherwise (frozen is None)."""
    if config is None or not config.enabled:
        return params
    return merge(params, frozen, rng, config=config)
