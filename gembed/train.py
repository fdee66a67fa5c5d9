"""The training stage: TrainState, the pure jitted train step, and the loop around it.

Restore order: the workdir's own latest checkpoint (resume), else INIT_FROM (params only), else a
fresh init from SEED. Per-step randomness is `fold_in(rng, step)`, and the data order is a function
of the step, so a resumed run repeats an uninterrupted one exactly.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import re
import sys
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
import tqdm
from jax.experimental import multihost_utils

from gembed import checkpoint, flops, gradcache, model_folder, sharding, workdir as workdir_files
from gembed.config import LossConfig, StageConfig, TrainConfig, write_operative_config
from gembed.data.batching import DataWindow, TrainBatches, pad_to_common_shape
from gembed.data.jsonl import SkippedLines
from gembed.data.mixture import TrainingDataset, load_datasets
from gembed.data.workdir_tokenizer import prepare_tokenizer
from gembed.errors import GembedUserError
from gembed.evaluation.during_training import TrainingEvaluator
from gembed.metrics import MetricsWriter, ThroughputMeter
from gembed.model import ModelConfig, init_params
from gembed.objective import batch_loss

TOKENIZER_EXAMPLES = 25_000                # examples (over all datasets) a new vocabulary sees


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
            lambda path, _: not pattern.search(jax.tree_util.keystr(path, simple=True, separator="/")),
            params)

    adamw = optax.adamw(learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2,
                        eps=config.adam_eps, weight_decay=config.weight_decay, mask=decay_mask)
    if config.grad_clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model_config: ModelConfig,
               loss_config: LossConfig, optimizer: optax.GradientTransformation,
               schedule: optax.Schedule, chunk_size: int | None = None,
               mesh: jax.sharding.Mesh | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch. Pure; jit it with the state donated.

    With `chunk_size` (and the batch's `mesh`) the gradient is computed by gradient caching
    (`gembed.gradcache`): the same gradient, with activations of one chunk per device alive.
    """
    step_rng = jax.random.fold_in(state.rng, state.step)
    if chunk_size is None:
        grad_fn = functools.partial(jax.value_and_grad(batch_loss, has_aux=True),
                                    model_config=model_config, loss_config=loss_config)
    else:
        grad_fn = functools.partial(gradcache.cached_value_and_grad, model_config=model_config,
                                    loss_config=loss_config, chunk_size=chunk_size, mesh=mesh)
    (loss, metrics), grads = grad_fn(state.params, batch, step_rng)
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


def state_shardings(stage: StageConfig, optimizer, mesh) -> TrainState:
    """The NamedSharding of every TrainState leaf, by `stage.sharding.param_rules`."""
    abstract = jax.eval_shape(functools.partial(init_state, stage.model, optimizer, stage.train.seed))
    return sharding.tree_shardings(abstract, mesh, stage.sharding.param_rules)


@dataclasses.dataclass(frozen=True)
class InitFrom:
    """What INIT_FROM gives a new run: a tokenizer folder, and its params placed on shardings."""

    tokenizer_dir: pathlib.Path
    restore_params: Callable[[Any], Any]   # abstract params (with shardings) -> params


def resolve_init_from(path: str) -> InitFrom:
    """INIT_FROM as a model folder (params read on the host, then placed) or a CKPT (restored
    by orbax straight onto the shardings)."""
    if model_folder.is_model_folder(path):
        folder = model_folder.read_model_folder(path)
        return InitFrom(folder.path, lambda abstract: sharding.put(
            folder.params, jax.tree.map(lambda leaf: leaf.sharding, abstract)))
    ref = checkpoint.resolve(path, role="INIT_FROM")
    return InitFrom(ref.workdir, functools.partial(checkpoint.restore_params, ref))


def restore_or_init(stage: StageConfig, optimizer, manager, init_from: InitFrom | None,
                    shardings) -> TrainState:
    """The start state by the fixed restore order: own checkpoint, INIT_FROM params, scratch.

    `shardings`: the TrainState of NamedShardings every leaf is placed with.
    """
    make = functools.partial(init_state, stage.model, optimizer, stage.train.seed)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            jax.eval_shape(make), shardings)
    latest = manager.latest_step()
    if latest is not None:
        return TrainState.from_items(checkpoint.restore(manager, latest, abstract.items()))
    state = jax.jit(make, out_shardings=shardings)()
    if init_from is not None:
        params = init_from.restore_params(abstract.params)
        state = dataclasses.replace(state, params=params, opt_state=jax.jit(
            optimizer.init, out_shardings=shardings.opt_state)(params))
    return state


def load_training_data(config: TrainConfig) -> tuple[list[TrainingDataset], SkippedLines | None]:
    """The mixture's datasets, and the bad lines skipped (when skip_bad_examples)."""
    skipped = SkippedLines() if config.skip_bad_examples else None
    datasets = load_datasets(config.dataset_specs, "train", max_text_chars=config.max_text_chars,
                             skipped=skipped)
    if skipped and skipped.count and jax.process_index() == 0:
        print(f"gembed: skipped {skipped.count} bad training lines (skip_bad_examples=True); "
              f"first: {skipped.first_error}", file=sys.stderr)
    return datasets, skipped


def workdir_tokenizer(workdir: pathlib.Path, stage: StageConfig,
                      datasets: list[TrainingDataset], init_from: InitFrom | None):
    """The run's tokenizer (see `prepare_tokenizer`); process 0 writes it, the others wait and
    read it. Its vocabulary must fit the model's embedding table."""
    sample = [example for dataset in datasets
              for example in dataset.examples[:TOKENIZER_EXAMPLES // len(datasets)]]
    prepare = functools.partial(
        prepare_tokenizer, workdir, tokenizer=stage.train.tokenizer,
        vocab_size=stage.model.vocab_size, examples=sample,
        init_from_dir=init_from.tokenizer_dir if init_from else None)
    if jax.process_count() > 1:
        if jax.process_index() == 0:
            prepare()
        multihost_utils.sync_global_devices("gembed: workdir tokenizer written")
    tokenizer = prepare()
    if tokenizer.vocab_size > stage.model.vocab_size:
        raise GembedUserError(
            f"{tokenizer.path}: tokenizer has {tokenizer.vocab_size} pieces but the model's "
            f"vocab_size is {stage.model.vocab_size}; set VOCAB_SIZE to at least the former.")
    return tokenizer


def pack_groups(config: TrainConfig, mesh) -> int:
    """Packing groups in this process's rows: one per local data-parallel device, or one per
    gradient-cache chunk of each, so that a device (a chunk) holds its own examples' texts only."""
    shards_per_process = mesh.shape[sharding.DATA_AXIS] // jax.process_count()
    if config.chunk_size is None:
        return shards_per_process
    return shards_per_process * (config.batch_size // mesh.shape[sharding.DATA_AXIS]
                                 // config.chunk_size)


def jit_train_step(stage: StageConfig, optimizer, mesh, shardings):
    """The jitted train step of the stage: state donated, shardings explicit, traced under the
    mesh (kernels such as splash attention run per shard of it)."""
    step = functools.partial(train_step, model_config=stage.model, loss_config=stage.loss,
                             optimizer=optimizer, schedule=learning_rate_schedule(stage.train),
                             chunk_size=stage.train.chunk_size, mesh=mesh)

    def step_under_mesh(state, batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return step(state, batch)

    return jax.jit(
        step_under_mesh,
        in_shardings=(shardings, sharding.batch_sharded(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0)


def train(workdir: str | pathlib.Path, stage: StageConfig, show_progress: bool | None = None) -> dict:
    """Runs (or resumes) one training stage in `workdir`; returns the last logged metrics."""
    workdir = pathlib.Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = stage.train

    mesh = sharding.make_mesh(stage.sharding.model_parallelism)
    sharding.check_global_batch(config.batch_size, mesh)
    if config.chunk_size is not None:
        gradcache.check_chunk_size(config.batch_size, config.chunk_size,
                                   mesh.shape[sharding.DATA_AXIS])

    datasets, skipped = load_training_data(config)
    manager = checkpoint.open_manager(workdir, keep=config.keep_checkpoints)
    resuming = manager.latest_step() is not None
    init_from = resolve_init_from(config.init_from) if config.init_from and not resuming else None
    tokenizer = workdir_tokenizer(workdir, stage, datasets, init_from)
    batches = TrainBatches(
        datasets, tokenizer, batch_size=config.batch_size, max_length=config.max_length,
        num_hard_negatives=config.num_hard_negatives, seed=config.seed,
        add_eos=stage.model.pooling == "last", rows=sharding.host_slice(config.batch_size),
        pack_groups=pack_groups(config, mesh) if config.packing else 0,
        length_buckets=config.length_buckets)

    optimizer = make_optimizer(config)
    shardings = state_shardings(stage, optimizer, mesh)
    state = restore_or_init(stage, optimizer, manager, init_from, shardings)
    if jax.process_index() == 0:
        write_operative_config(workdir / workdir_files.CONFIG_GIN)
        workdir_files.write_run_metadata(
            workdir, stage.model, max_length=config.max_length,
            task_prompts={d.spec.name: d.spec.query_prompt for d in datasets if d.spec.query_prompt})
    step_fn = jit_train_step(stage, optimizer, mesh, shardings)
    evaluator = TrainingEvaluator(stage.evaluation, stage.model, tokenizer, config.max_length,
                                  config.train_steps)
    try:
        return _loop(workdir, stage, state, step_fn, batches, mesh, manager, evaluator,
                     tokenizer.pad_id, skipped, show_progress)
    finally:
        manager.wait_until_finished()
        manager.close()


def _loop(workdir, stage: StageConfig, state: TrainState, step_fn, batches: TrainBatches, mesh,
          manager, evaluator: TrainingEvaluator, pad_id: int, skipped: SkippedLines | None,
          show_progress: bool | None) -> dict:
    """Steps from the state's step to TRAIN_STEPS: log every LOG_EVERY steps (and at evaluations
    and the last step), checkpoint every CHECKPOINT_EVERY steps and at the last."""
    config = stage.train
    start_step = int(state.step)
    writer = MetricsWriter(workdir, resume_step=start_step)
    meter = ThroughputMeter(config.batch_size, flops.system_peak()[0])
    window = DataWindow(batches)
    shapes: set[tuple] = set()   # distinct batch shapes: each one is a compilation of the step
    progress = tqdm.tqdm(total=config.train_steps, initial=start_step, desc="train",
                         disable=True if jax.process_index() > 0 else (
                             None if show_progress is None else not show_progress),
                         dynamic_ncols=True)
    last: dict = {}
    try:
        host_batches = batches.iterate(start_step)
        for step in range(start_step, config.train_steps):
            host_batch = pad_to_common_shape(next(host_batches), pad_id)
            state, metrics = step_fn(state, sharding.place_batch(host_batch, mesh))
            window.add(step)
            shapes.add(tuple(value.shape for value in host_batch.values()))
            meter.add_step(flops.train_flops(stage.model, flops.text_lengths(host_batch)))
            done = step + 1
            eval_values = evaluator.maybe_run(done, state.params)   # {} unless evaluation is due
            meter.exclude(evaluator.last_seconds)   # evaluation time is not training throughput
            if eval_values or done % config.log_every == 0 or done == config.train_steps:
                values = {name: float(value) for name, value in jax.device_get(metrics).items()}
                values.update(eval_values, **meter.flush(), **window.flush(),
                              compiled_shapes=len(shapes))
                if skipped is not None:
                    values["skipped_examples"] = skipped.count
                writer.write(done, values)
                progress.set_postfix(loss=f"{values['loss']:.4f}",
                                     temperature=f"{values['temperature']:.4f}")
                last = {"step": done, **values}
            if done % config.checkpoint_every == 0 or done == config.train_steps:
                checkpoint.save(manager, done, state.items())
            progress.update(1)
    finally:
        writer.close()
        progress.close()
    if not math.isfinite(last.get("loss", 0.0)):
        raise FloatingPointError(f"training diverged: loss {last['loss']} at step {last['step']}")
    return last
