"""The training stage: TrainState, the pure jitted train step, and the loop around it.

Restore order (DESIGN.md habit 9): the workdir's own latest checkpoint (resume), else INIT_FROM
(params only), else a fresh init from SEED. Per-step randomness is `fold_in(rng, step)`, and the data
order is a function of the step, so a resumed run repeats an uninterrupted one exactly.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import re
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
import tqdm

from gembed import checkpoint, model_folder, sharding
from gembed.config import LossConfig, StageConfig, TrainConfig, write_operative_config
from gembed.data import load_examples
from gembed.data.workdir_tokenizer import prepare_tokenizer
from gembed.data.batching import FIRST_NEGATIVE_SLOT, POSITIVE_SLOT, QUERY_SLOT, TrainBatches
from gembed.errors import GembedUserError
from gembed.losses import contrastive_loss
from gembed.metrics import MetricsWriter
from gembed.model import EmbeddingModel, ModelConfig, init_params


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree."""

    step: jax.Array        # int32[] optimizer steps taken
    params: Any            # the EmbeddingModel params (log_scale included)
    opt_state: Any
    rng: jax.Array         # uint32[2] base key; step keys are fold_in(rng, step)

    def items(self) -> dict[str, Any]:
        """The checkpoint items (see `checkpoint.ITEMS`)."""
        return {"params": self.params, "opt_state": self.opt_state,
                "loop": {"step": self.step, "rng": self.rng}}

    @classmethod
    def from_items(cls, items: dict[str, Any]) -> "TrainState":
        return cls(step=items["loop"]["step"], params=items["params"],
                   opt_state=items["opt_state"], rng=items["loop"]["rng"])


def param_name(path) -> str:
    """The "/"-joined name of a param from its pytree key path."""
    return "/".join(str(getattr(key, "key", key)) for key in path)


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    warmup = min(config.warmup_steps, config.train_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
        decay_steps=max(config.train_steps, warmup + 1),
        end_value=config.learning_rate * config.end_learning_rate_fraction)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW with warmup + cosine decay, global-norm clipping, no decay on matching param names."""
    pattern = re.compile(config.no_weight_decay_pattern)

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: not pattern.search(param_name(path)), params)

    adamw = optax.adamw(learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2,
                        eps=config.adam_eps, weight_decay=config.weight_decay, mask=decay_mask)
    if config.grad_clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw)


def embed_slots(params, model_config: ModelConfig, token_ids, token_mask, rng) -> jax.Array:
    """f32[B, S, D] unnormalised embeddings of int32[B, S, L] token slots (query, positive, ...)."""
    batch, slots, length = token_ids.shape
    deterministic = model_config.dropout_rate == 0.0
    flat = EmbeddingModel(model_config).apply(
        {"params": params}, token_ids.reshape(batch * slots, length),
        token_mask.reshape(batch * slots, length), deterministic=deterministic,
        rngs=None if deterministic else {"dropout": rng})
    return flat.reshape(batch, slots, -1)


def batch_loss(params, batch, rng, model_config: ModelConfig, loss_config: LossConfig):
    """(loss, metrics) of a global batch (see `TrainBatches` for its fields)."""
    embeddings = embed_slots(params, model_config, batch["token_ids"], batch["token_mask"], rng)
    keys = batch["text_keys"] if loss_config.mask_duplicates else None
    has_negatives = embeddings.shape[1] > FIRST_NEGATIVE_SLOT
    return contrastive_loss(
        embeddings[:, QUERY_SLOT], embeddings[:, POSITIVE_SLOT], params["log_scale"],
        negatives=embeddings[:, FIRST_NEGATIVE_SLOT:] if has_negatives else None,
        negatives_valid=batch["text_valid"][:, FIRST_NEGATIVE_SLOT:] if has_negatives else None,
        query_keys=None if keys is None else keys[:, QUERY_SLOT],
        positive_keys=None if keys is None else keys[:, POSITIVE_SLOT],
        negative_keys=None if keys is None or not has_negatives else keys[:, FIRST_NEGATIVE_SLOT:],
        symmetric=loss_config.symmetric, same_tower=loss_config.same_tower,
        output_sizes=model_config.output_sizes, max_scale=loss_config.max_scale)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model_config: ModelConfig,
               loss_config: LossConfig, optimizer: optax.GradientTransformation,
               schedule: optax.Schedule) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch. Pure; jit it with the state donated."""
    step_rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(batch_loss, has_aux=True)
    (loss, metrics), grads = grad_fn(state.params, batch, step_rng, model_config, loss_config)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state.step)}
    return dataclasses.replace(state, step=state.step + 1, params=params, opt_state=opt_state), metrics


def init_state(model_config: ModelConfig, optimizer, seed: int) -> TrainState:
    rng = jax.random.PRNGKey(seed)
    params = init_params(model_config, jax.random.fold_in(rng, 0))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), rng=jax.random.fold_in(rng, 1))


def _restore_or_init(stage: StageConfig, optimizer, manager, init_ref, mesh) -> TrainState:
    """The start state by the fixed restore order: own checkpoint, INIT_FROM params, scratch.

    `init_ref`: a checkpoint (CheckpointRef), a read model folder (ModelFolder), or None.
    """
    replicated = sharding.replicated(mesh)
    make = functools.partial(init_state, stage.model, optimizer, stage.train.seed)
    abstract = jax.eval_shape(make)
    latest = manager.latest_step()
    if latest is not None:
        items = checkpoint.restore(manager, latest, checkpoint.abstract_like(abstract.items(), replicated))
        return TrainState.from_items(items)
    state = jax.jit(make, out_shardings=replicated)()
    if init_ref is not None:
        params = (jax.device_put(init_ref.params, replicated)
                  if isinstance(init_ref, model_folder.ModelFolder) else
                  checkpoint.restore_params(init_ref, checkpoint.abstract_like(abstract.params, replicated)))
        state = dataclasses.replace(state, params=params,
                                    opt_state=jax.jit(optimizer.init, out_shardings=replicated)(params))
    return state


def train(workdir: str | pathlib.Path, stage: StageConfig, show_progress: bool | None = None) -> dict:
    """Runs (or resumes) one training stage in `workdir`; returns the last logged metrics."""
    workdir = pathlib.Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = stage.train
    mesh = sharding.make_mesh()
    sharding.check_global_batch(config.batch_size, mesh)
    if config.chunk_size is not None:
        raise GembedUserError(
            f"CHUNK_SIZE={config.chunk_size}: gradient caching is not available yet; "
            f"set CHUNK_SIZE=None.")
    examples = load_examples(config.train_data, split="train")
    manager = checkpoint.open_manager(workdir, keep=config.keep_checkpoints)
    resuming = manager.latest_step() is not None
    init_ref = None
    if config.init_from and not resuming:
        init_ref = (model_folder.read_model_folder(config.init_from)
                    if model_folder.is_model_folder(config.init_from)
                    else checkpoint.resolve(config.init_from, role="INIT_FROM"))
    tokenizer = prepare_tokenizer(
        workdir, tokenizer=config.tokenizer, vocab_size=stage.model.vocab_size, examples=examples,
        init_from_dir=getattr(init_ref, "workdir", getattr(init_ref, "path", None)))
    if tokenizer.vocab_size > stage.model.vocab_size:
        raise GembedUserError(
            f"{tokenizer.path}: tokenizer has {tokenizer.vocab_size} pieces but the model's "
            f"vocab_size is {stage.model.vocab_size}; set VOCAB_SIZE to at least the former.")
    batches = TrainBatches(
        examples, tokenizer, batch_size=config.batch_size, max_length=config.max_length,
        num_hard_negatives=config.num_hard_negatives, seed=config.seed,
        add_eos=stage.model.pooling == "last", rows=sharding.host_slice(config.batch_size))

    optimizer = make_optimizer(config)
    schedule = learning_rate_schedule(config)
    state = _restore_or_init(stage, optimizer, manager, init_ref, mesh)
    start_step = int(state.step)
    if jax.process_index() == 0:
        write_operative_config(workdir / "config.gin")
        (workdir / "model_config.json").write_text(json.dumps(dataclasses.asdict(stage.model)))
    step_fn = jax.jit(
        functools.partial(train_step, model_config=stage.model, loss_config=stage.loss,
                          optimizer=optimizer, schedule=schedule),
        in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
        out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)),
        donate_argnums=0)

    writer = MetricsWriter(workdir, resume_step=start_step)
    progress = tqdm.tqdm(total=config.train_steps, initial=start_step, desc="train",
                         disable=(not show_progress) if show_progress is not None else None,
                         dynamic_ncols=True)
    last: dict = {}
    window_start, window_steps = time.perf_counter(), 0
    try:
        host_batches = batches.iterate(start_step)
        for step in range(start_step, config.train_steps):
            state, metrics = step_fn(state, sharding.place_batch(next(host_batches), mesh))
            done, window_steps = step + 1, window_steps + 1
            if done % config.log_every == 0 or done == config.train_steps:
                values = {name: float(value) for name, value in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - window_start
                values["examples_per_second"] = window_steps * config.batch_size / elapsed
                writer.write(done, values)
                progress.set_postfix(loss=f"{values['loss']:.4f}",
                                     temperature=f"{values['temperature']:.4f}")
                last = {"step": done, **values}
                window_start, window_steps = time.perf_counter(), 0
            if done % config.checkpoint_every == 0 or done == config.train_steps:
                checkpoint.save(manager, done, state.items())
            progress.update(1)
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()
        progress.close()
    if not math.isfinite(last.get("loss", 0.0)):
        raise FloatingPointError(f"training diverged: loss {last['loss']} at step {last['step']}")
    return last

