"""The training stage: TrainState, the pure jitted train step, and the loop around it.

Restore order: the workdir's own latest checkpoint (resume), else INIT_FROM (params only), else a
fresh init from SEED. A LoRA run (`gembed.lora`, LoraConfig.rank > 0) trains and checkpoints only its
trainable tree; its frozen base is read from INIT_FROM at every start, resumes included. Per-step randomness is `fold_in(rng, step)`, and the data order is a function
of the step, so a resumed run repeats an uninterrupted one exactly.

Faults never reach disk: each step reports a `finite` flag (loss, gradient norm and new params),
read whenever metrics are fetched and always before a checkpoint is written, and a divergence stops
the run (exit 2) with the last finite checkpoint kept; a resume skips damaged or non-finite
checkpoints for the newest good one; one run at a time holds the workdir (`workdir_lock`).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
import re
import sys
import threading
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from jax.experimental import multihost_utils

from gembed import (checkpoint, flops, gradcache, layer_subset, lora, model_folder, preemption,
                    sharding, teacher_cache, workdir as workdir_files, workdir_lock)
from gembed.config import LossConfig, StageConfig, TrainConfig, write_operative_config
from gembed.data.batching import DataWindow, TrainBatches, pad_to_common_shape
from gembed.data.jsonl import SkippedLines
from gembed.data.mixture import TrainingDataset, load_datasets
from gembed.data.workdir_tokenizer import prepare_tokenizer
from gembed.errors import GembedUserError
from gembed.evaluation.during_training import TrainingEvaluator
from gembed.metrics import MetricsWriter, ThroughputMeter
from gembed.model import ModelConfig, init_params
from gembed.objective import DISTILL_PROJECTION, batch_loss, init_distill_projection

TOKENIZER_EXAMPLES = 25_000                # examples (over all datasets) a new vocabulary sees
FINITE = "finite"   # the step metric: bool[], loss, gradient norm and the new params all finite


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree."""

    step: jax.Array        # int32[] optimizer steps taken
    params: Any            # what trains: the EmbeddingModel params (log_scale included), or a
                           # LoRA run's trainable tree
    opt_state: Any
    rng: jax.Array         # uint32[2] base key; step keys are fold_in(rng, step)
    frozen: Any = None     # a LoRA run's frozen base (not checkpointed); None otherwise

    def items(self) -> dict[str, Any]:
        """The checkpoint items (see `checkpoint.ITEMS`)."""
        return {"params": self.params, "opt_state": self.opt_state,
                "loop": {"step": self.step, "rng": self.rng}}

    @classmethod
    def from_items(cls, items: dict[str, Any], frozen: Any = None) -> "TrainState":
        return cls(step=items["loop"]["step"], params=items["params"],
                   opt_state=items["opt_state"], rng=items["loop"]["rng"], frozen=frozen)


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
               mesh: jax.sharding.Mesh | None = None, lora_config: lora.LoraConfig | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch. Pure; jit it with the state donated.

    With `chunk_size` (and the batch's `mesh`) the gradient is computed by gradient caching
    (`gembed.gradcache`): the same gradient, with activations of one chunk per device alive.
    With `lora_config` enabled, `state.params` is the trainable tree and only it is differentiated.
    """
    step_rng = jax.random.fold_in(state.rng, state.step)
    if chunk_size is None:
        def trainable_loss(params, batch, rng):
            return batch_loss(lora.combine(params, state.frozen, rng, config=lora_config), batch,
                              rng, model_config=model_config, loss_config=loss_config)
        grad_fn = jax.value_and_grad(trainable_loss, has_aux=True)
    else:
        grad_fn = functools.partial(gradcache.cached_value_and_grad, model_config=model_config,
                                    loss_config=loss_config, chunk_size=chunk_size, mesh=mesh,
                                    frozen=state.frozen, lora_config=lora_config)
    (loss, metrics), grads = grad_fn(state.params, batch, step_rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    metrics = {**metrics, "loss": loss, "grad_norm": grad_norm,
               "learning_rate": schedule(state.step),
               FINITE: jnp.isfinite(loss) & jnp.isfinite(grad_norm)
               & jnp.isfinite(optax.tree.norm(params))}
    return dataclasses.replace(state, step=state.step + 1, params=params, opt_state=opt_state), metrics


def adapter_key(seed: int) -> jax.Array:
    """The key of a LoRA run's initial adapters."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), 2)


def init_state(model_config: ModelConfig, optimizer, seed: int,
               lora_config: lora.LoraConfig | None = None,
               projection_size: int | None = None) -> TrainState:
    """The state of a fresh init from `seed`: a LoRA run's adapters on that random base; with
    `projection_size` the params also hold DISTILL_PROJECTION f32[E, Dt]."""
    rng = jax.random.PRNGKey(seed)
    params = init_params(model_config, jax.random.fold_in(rng, 0))
    frozen = None
    if lora_config is not None and lora_config.enabled:
        params, frozen = lora.split(params, adapter_key(seed), config=lora_config)
    if projection_size is not None:
        params = {**params, DISTILL_PROJECTION: init_distill_projection(model_config, projection_size)}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), rng=jax.random.fold_in(rng, 1),
                      frozen=frozen)


def state_shardings(stage: StageConfig, optimizer, mesh,
                    projection_size: int | None = None) -> TrainState:
    """The NamedSharding of every TrainState leaf, by `stage.sharding.param_rules`."""
    abstract = jax.eval_shape(functools.partial(init_state, stage.model, optimizer,
                                                stage.train.seed, stage.lora, projection_size))
    return sharding.tree_shardings(abstract, mesh, stage.sharding.param_rules)


def abstract_base(stage: StageConfig, mesh) -> Any:
    """ShapeDtypeStructs (with shardings by the rules) of the model's whole params."""
    abstract = workdir_files.abstract_params(stage.model)
    shardings = sharding.tree_shardings(abstract, mesh, stage.sharding.param_rules)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, shardings)


@dataclasses.dataclass(frozen=True)
class InitFrom:
    """What INIT_FROM gives a new run: a tokenizer folder, and its params placed on shardings."""

    tokenizer_dir: pathlib.Path
    restore_params: Callable[[Any], Any]   # abstract params (with shardings) -> params


def _put_like(params, abstract):
    """Host params placed (and cast) like `abstract`."""
    return sharding.put(jax.tree.map(lambda value, leaf: np.asarray(value, leaf.dtype), params,
                                     abstract), jax.tree.map(lambda leaf: leaf.sharding, abstract))


def resolve_init_from(path: str, init_layers: tuple[int, ...] | None = None) -> InitFrom:
    """INIT_FROM as a model folder (params read on the host, then placed; only `init_layers` of
    its layers when given), a CKPT (restored by orbax straight onto the shardings; params it holds
    beyond the model's, such as DISTILL_PROJECTION, are dropped), or a LoRA run's CKPT (merged on
    the host, then placed)."""
    if model_folder.is_model_folder(path):
        folder = model_folder.read_model_folder(path)
        params = folder.params if init_layers is None else layer_subset.subset_params(
            folder.params, init_layers)
        return InitFrom(folder.path, functools.partial(_put_like, params))
    ref = checkpoint.resolve(path, role="INIT_FROM")
    if workdir_files.read_lora(ref.workdir) is not None:
        return InitFrom(ref.workdir, lambda abstract: _put_like(
            jax.device_get(workdir_files.restore_params(ref)), abstract))
    return InitFrom(ref.workdir, functools.partial(checkpoint.restore_params, ref))


def base_reference(path: str) -> str:
    """The stable name of a LoRA run's base: a model folder's path, or a CKPT's step folder."""
    if model_folder.is_model_folder(path):
        return str(pathlib.Path(path).resolve())
    return str(checkpoint.resolve(path, role="INIT_FROM").step_dir)


def restore_or_init(stage: StageConfig, optimizer, manager, init_from: InitFrom | None,
                    shardings, mesh, projection_size: int | None = None) -> TrainState:
    """The start state by the fixed restore order: own checkpoint, INIT_FROM params, scratch.

    `shardings`: the TrainState of NamedShardings every leaf is placed with. A LoRA run's
    `init_from` (its base) is given on resumes too: the frozen tree is not checkpointed.
    """
    make = functools.partial(init_state, stage.model, optimizer, stage.train.seed, stage.lora,
                             projection_size)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            jax.eval_shape(make), shardings)
    resuming = bool(manager.all_steps())
    base = None
    if init_from is not None and (stage.lora.enabled or not resuming):
        base = init_from.restore_params(abstract_base(stage, mesh))
    frozen = None if not (resuming and base is not None and stage.lora.enabled) else jax.jit(
        functools.partial(lora.frozen_of, config=stage.lora),
        out_shardings=shardings.frozen)(base)
    restored = restore_newest(manager, abstract, frozen)
    if restored is not None:
        return restored
    state = jax.jit(make, out_shardings=shardings)()
    if base is not None:
        params, frozen = base, None
        if stage.lora.enabled:
            params, frozen = jax.jit(functools.partial(lora.split, config=stage.lora),
                                     out_shardings=(shardings.params, shardings.frozen))(
                base, adapter_key(stage.train.seed))
        if projection_size is not None:   # the source has none: it keeps its fresh init
            params = {**params, DISTILL_PROJECTION: state.params[DISTILL_PROJECTION]}
        state = dataclasses.replace(state, params=params, frozen=frozen, opt_state=jax.jit(
            optimizer.init, out_shardings=shardings.opt_state)(params))
    return state


def model_params(state: TrainState, lora_config: lora.LoraConfig) -> Any:
    """The EmbeddingModel params of a state (a LoRA run's adapters merged)."""
    if state.frozen is None:
        return state.params
    return _merge_jit(lora_config)(state.params, state.frozen)


@functools.lru_cache(maxsize=4)
def _merge_jit(lora_config: lora.LoraConfig):
    return jax.jit(functools.partial(lora.merge, rng=None, config=lora_config))


def restore_newest(manager, abstract: TrainState, frozen: Any = None) -> TrainState | None:
    """The newest checkpoint of the workdir that restores with finite values; None when it has none.

    Newer ones that fail are reported in one line each and moved aside (`checkpoint.set_aside`),
    so the resumed run writes those steps anew. When none restores, nothing is moved (a changed
    model config fails every step alike) and the newest one's reason is the error.
    """
    failed = []   # (step, reason), newest first
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            state = TrainState.from_items(checkpoint.restore(manager, step, abstract.items()), frozen)
            reason = None if all_finite(state) else "it holds NaN or infinite values"
        except Exception as e:   # orbax and tensorstore raise many types for damaged files
            reason = f"it does not restore: {type(e).__name__}: {_first_line(e)}"
        if reason is None:
            for bad, why in failed:
                moved = checkpoint.set_aside(manager, bad)
                if jax.process_index() == 0:
                    print(f"gembed: skipped checkpoint {manager.directory / str(bad)} "
                          f"({why}); moved it to {moved}; resuming from step {step}.",
                          file=sys.stderr)
            return state
        failed.append((step, reason))
    if failed:
        step, reason = failed[0]
        raise GembedUserError(
            f"{manager.directory / str(step)}: cannot resume, no checkpoint of the workdir restores "
            f"(newest: {reason}); use the model gin file of the run, or another --workdir.")
    return None


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else ""


def all_finite(tree: Any) -> bool:
    """Whether every floating-point leaf of `tree` (arrays, possibly sharded) is finite."""
    leaves = [leaf for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    return bool(jax.jit(lambda xs: jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(x)) for x in xs] or [jnp.bool_(True)])))(leaves))


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


def check_lora_base(workdir: pathlib.Path, stage: StageConfig, resuming: bool) -> str | None:
    """A LoRA run's base reference (`base_reference`; the recorded one when resuming), else None."""
    if not stage.lora.enabled:
        return None
    recorded = workdir_files.read_lora(workdir)
    if resuming and recorded is not None:
        if recorded.config != stage.lora:
            raise GembedUserError(
                f"{workdir / workdir_files.LORA_FILE}: this run was started with {recorded.config} "
                f"but is resumed with {stage.lora}; resume with the same LoraConfig bindings.")
        return recorded.base
    if not stage.train.init_from:
        raise GembedUserError("LoraConfig.rank > 0 needs INIT_FROM, the base model the adapters "
                              "adapt; set --gin_param=\"INIT_FROM='MODEL_DIR'\" or LoraConfig.rank=0.")
    return base_reference(stage.train.init_from)


def training_teacher_vectors(workdir: pathlib.Path, stage: StageConfig,
                             datasets: list[TrainingDataset]):
    """The teacher vectors of every training text (`gembed.teacher_cache`) when the loss uses a
    teacher, else None; process 0 fills the cache, the others wait and read it."""
    config = stage.train
    if not stage.loss.uses_teacher:
        return None
    if config.teacher is None and config.teacher_cache is None:
        raise GembedUserError(
            "LossConfig has distillation weights but TrainConfig.teacher and teacher_cache are "
            "None; set TrainConfig.teacher='MODEL' (a model folder or hf: name).")
    folder = config.teacher_cache or str(workdir / "teacher_vectors")
    texts = [text for dataset in datasets for text in teacher_cache.example_texts(dataset.examples)]
    fill = functools.partial(teacher_cache.teacher_vectors, folder, config.teacher, texts,
                             max_length=config.max_length,
                             log=lambda message: print(message, file=sys.stderr))
    if jax.process_count() > 1:
        if jax.process_index() == 0:
            fill()
        multihost_utils.sync_global_devices("gembed: teacher vectors written")
    return fill()


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
                             chunk_size=stage.train.chunk_size, mesh=mesh, lora_config=stage.lora)

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
    with workdir_lock.hold(workdir, take=jax.process_index() == 0):
        return _train_locked(workdir, stage, show_progress)


def _train_locked(workdir: pathlib.Path, stage: StageConfig, show_progress: bool | None) -> dict:
    config = stage.train

    mesh = sharding.make_mesh(stage.sharding.model_parallelism)
    sharding.check_global_batch(config.batch_size, mesh)
    if config.chunk_size is not None:
        gradcache.check_chunk_size(config.batch_size, config.chunk_size,
                                   mesh.shape[sharding.DATA_AXIS])

    datasets, skipped = load_training_data(config)
    manager = checkpoint.open_manager(workdir, keep=config.keep_checkpoints)
    resuming = manager.latest_step() is not None
    lora_base = check_lora_base(workdir, stage, resuming)
    init_from = (resolve_init_from(lora_base or config.init_from, config.init_layers)
                 if lora_base or (config.init_from and not resuming) else None)
    tokenizer = workdir_tokenizer(workdir, stage, datasets, None if resuming else init_from)
    teacher = training_teacher_vectors(workdir, stage, datasets)
    projection_size = (teacher.size if teacher is not None and stage.loss.embedding_matching_weight
                       and teacher.size != stage.model.embedding_size else None)
    if projection_size is not None and stage.lora.enabled:
        raise GembedUserError(
            "LoRA with embedding matching through a learned map (teacher and student sizes "
            f"differ: {projection_size} vs {stage.model.embedding_size}) is not supported; set "
            "LossConfig.embedding_matching_weight=0 or LoraConfig.rank=0.")
    batches = TrainBatches(
        datasets, tokenizer, batch_size=config.batch_size, max_length=config.max_length,
        num_hard_negatives=config.num_hard_negatives, seed=config.seed,
        add_eos=stage.model.pooling == "last", rows=sharding.host_slice(config.batch_size),
        pack_groups=pack_groups(config, mesh) if config.packing else 0,
        length_buckets=config.length_buckets,
        teacher_vectors=None if teacher is None else teacher.lookup)

    optimizer = make_optimizer(config)
    shardings = state_shardings(stage, optimizer, mesh, projection_size)
    state = restore_or_init(stage, optimizer, manager, init_from, shardings, mesh, projection_size)
    if jax.process_index() == 0:
        write_operative_config(workdir / workdir_files.CONFIG_GIN)
        workdir_files.write_run_metadata(
            workdir, stage.model, max_length=config.max_length,
            task_prompts={d.spec.name: d.spec.query_prompt for d in datasets if d.spec.query_prompt})
        if stage.lora.enabled:
            workdir_files.write_lora(workdir, stage.lora, lora_base)
    step_fn = jit_train_step(stage, optimizer, mesh, shardings)
    evaluator = TrainingEvaluator(stage.evaluation, stage.model, tokenizer, config.max_length,
                                  config.train_steps)
    try:
        with checkpoint.quiet_interrupts(), preemption.notice() as preempted_at:
            last = _loop(workdir, stage, state, step_fn, batches, mesh, manager, evaluator,
                         tokenizer.pad_id, skipped, show_progress, preempted_at)
    except KeyboardInterrupt:
        try:   # the save in flight (if any) finishes and is kept: seconds
            with checkpoint.quiet_interrupts():
                checkpoint.finish(manager, interrupted=True)
        except BaseException:   # a second Ctrl-C, or the save failed: abandon it
            _silence_background_threads()
        raise
    except BaseException:
        checkpoint.finish(manager)   # the checkpoints saved before the error are kept
        raise
    checkpoint.finish(manager)
    return last


def _silence_background_threads() -> None:
    """Keeps orbax's abandoned save threads from printing tracebacks while the process exits
    (a save is renamed into place only when complete, so abandoning one loses nothing kept)."""
    logging.disable(logging.CRITICAL)
    threading.excepthook = lambda args: None


def _loop(workdir, stage: StageConfig, state: TrainState, step_fn, batches: TrainBatches, mesh,
          manager, evaluator: TrainingEvaluator, pad_id: int, skipped: SkippedLines | None,
          show_progress: bool | None, preempted_at: Callable[[int], bool]) -> dict:
    """Steps from the state's step to TRAIN_STEPS: log every LOG_EVERY steps (and at evaluations
    and the last step), checkpoint every CHECKPOINT_EVERY steps and at the last; when
    `preempted_at(step)` (`preemption.notice`), checkpoint that step and raise `preemption.Preempted`."""
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
    pending = []   # (step, finite flag, loss) on device of the steps not checked yet
    try:
        host_batches = batches.iterate(start_step)
        for step in range(start_step, config.train_steps):
            host_batch = pad_to_common_shape(next(host_batches), pad_id)
            state, metrics = step_fn(state, sharding.place_batch(host_batch, mesh))
            window.add(step)
            shapes.add(tuple(value.shape for value in host_batch.values()))
            meter.add_step(flops.train_flops(stage.model, flops.text_lengths(host_batch)))
            done = step + 1
            pending.append((done, metrics.pop(FINITE), metrics["loss"]))
            eval_values = evaluator.maybe_run(   # {} unless evaluation is due
                done, model_params(state, stage.lora) if evaluator.due(done) else None)
            meter.exclude(evaluator.last_seconds)   # evaluation time is not training throughput
            if eval_values or done % config.log_every == 0 or done == config.train_steps:
                check_finite(pending, manager)
                values = {name: float(value) for name, value in jax.device_get(metrics).items()}
                values.update(eval_values, **meter.flush(), **window.flush(),
                              compiled_shapes=len(shapes))
                if skipped is not None:
                    values["skipped_examples"] = skipped.count
                writer.write(done, values)
                progress.set_postfix(loss=f"{values['loss']:.4f}",
                                     temperature=f"{values['temperature']:.4f}")
                last = {"step": done, **values}
            preempted = preempted_at(done)
            if preempted or done % config.checkpoint_every == 0 or done == config.train_steps:
                check_finite(pending, manager)
                checkpoint.save(manager, done, state.items())
            progress.update(1)
            if preempted and done < config.train_steps:
                raise preemption.Preempted(done, manager.directory)
    finally:
        writer.close()
        progress.close()
    return last


def check_finite(pending: list, manager) -> None:
    """Reads the finite flags of the `pending` steps (then empties it); a divergence stops the run
    with a GembedUserError naming the first non-finite step and the last checkpoint written."""
    flags = jax.device_get([(flag, loss) for _, flag, loss in pending])
    steps = [step for step, _, _ in pending]
    pending.clear()
    for step, (finite, loss) in zip(steps, flags):
        if not finite:
            manager.wait_until_finished()
            latest = manager.latest_step()
            kept = (f"the last good checkpoint, {manager.directory / str(latest)}, is kept and a "
                    f"rerun resumes from it" if latest is not None else
                    "no checkpoint was written before it, so a rerun starts afresh")
            raise GembedUserError(
                f"training diverged at step {step} (loss {float(loss)}; a NaN or infinite loss, "
                f"gradient or param) and was stopped without saving it; {kept}; lower "
                f"LEARNING_RATE, lengthen TrainConfig.warmup_steps or set "
                f"TrainConfig.grad_clip_norm, then rerun.")
