"""Experiment configuration: gin-registered dataclasses, file/flag parsing, operative-config dump.

A training stage is configured by gin files (a model size from `experiments/configs/model/` plus a
stage file such as `experiments/configs/prefinetune.gin`) and `--gin_param` overrides. Stage files
bind the contract's macros (TRAIN_DATA, BATCH_SIZE, ...) into `TrainConfig`; `%gin.REQUIRED`
macros fail loudly when a run forgets them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pathlib
import re
import tokenize
from typing import Sequence

import gin

from gembed import checkpoint, layer_subset, model_folder, workdir
from gembed.convert import hub, hub_folder
from gembed.data.mixture import DatasetSpec
from gembed.errors import GembedUserError
from gembed.evaluation.tasks import parse_task_list
from gembed.lora import LoraConfig
from gembed.model import ModelConfig
from gembed.sharding import ShardingConfig

GIN_FILES_DIR = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "configs"

# Macros every stage config honours (docs/interface.md); --gin_param may set any of these or a
# macro a parsed gin file defines.
CONTRACT_MACROS = (
    "TRAIN_DATA", "BATCH_SIZE", "TRAIN_STEPS", "MAX_LENGTH", "LEARNING_RATE", "SEED",
    "INIT_FROM", "CHUNK_SIZE", "CHECKPOINT_EVERY", "LOG_EVERY",
)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Which InfoNCE variant to train with (see `gembed.losses.contrastive.contrastive_loss`)."""

    symmetric: bool = True          # cpt-text: mean of both directions; False: Gemini query->doc
    same_tower: bool = False        # add query-query / doc-doc in-batch negatives
    mask_duplicates: bool = True    # never treat an identical text as a negative
    max_scale: float = 100.0        # clamp on exp(log_scale)
    false_negative_margin: float | None = None   # drop a candidate scoring above the positive
                                    # by more than this cosine margin (None: keep every candidate)
    hardness_alpha: float = 0.0     # weight negatives by exp(alpha * sg(cosine)); 0 = off
    # Distillation (gembed.losses.distillation; docs/distillation.md). The total loss is
    # contrastive_weight * InfoNCE + the weighted terms below; teacher terms need TrainConfig.teacher.
    contrastive_weight: float = 1.0
    embedding_matching_weight: float = 0.0   # student vs teacher vectors of every slot
    embedding_matching: str = "cosine"       # 'cosine' | 'mse'
    score_distillation_weight: float = 0.0   # KL(teacher || student) over each query's candidates
    student_temperature: float = 0.05
    teacher_temperature: float = 0.05
    spread_out_weight: float = 0.0  # global orthogonal regularisation of queries and of positives

    @property
    def uses_teacher(self) -> bool:
        return self.embedding_matching_weight > 0 or self.score_distillation_weight > 0

    def __post_init__(self):
        checks = [
            (self.embedding_matching in ("cosine", "mse"),
             f"LossConfig.embedding_matching={self.embedding_matching!r} must be 'cosine' or 'mse'"),
            (min(self.contrastive_weight, self.embedding_matching_weight,
                 self.score_distillation_weight, self.spread_out_weight) >= 0,
             "LossConfig weights must be >= 0"),
            (self.student_temperature > 0 and self.teacher_temperature > 0,
             "LossConfig.student_temperature and teacher_temperature must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise GembedUserError(f"{message}; fix the binding in your gin file or --gin_param.")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training stage. Sizes are global (all hosts, all devices); steps are optimizer steps."""

    train_data: str | None = ""     # JSONL path, tfds:NAME[/CONFIG]:SPLIT, or builtin:NAME
    datasets: tuple[DatasetSpec, ...] = ()   # a mixture instead of train_data (data/mixture.py)
    batch_size: int = 64
    train_steps: int = 100
    max_length: int = 64            # tokens per text, after truncation
    learning_rate: float = 1e-3     # peak, after warmup
    seed: int = 0
    init_from: str | None = None    # checkpoint (workdir or step folder) or model folder
    chunk_size: int | None = None   # gradient-cache micro-batch per device; None = off
    checkpoint_every: int = 100
    log_every: int = 10
    keep_checkpoints: int = 3
    warmup_steps: int = 10
    end_learning_rate_fraction: float = 0.0   # cosine decay to this fraction of the peak
    weight_decay: float = 0.01
    no_weight_decay_pattern: str = r"(bias|scale)$"   # regex over "/"-joined param names
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-6
    grad_clip_norm: float | None = 1.0
    num_hard_negatives: int = 0     # k hard negatives per query taken from each example
    tokenizer: str | None = None    # a sentencepiece .model; None: inherit from INIT_FROM or train
    skip_bad_examples: bool = False  # skip (and count in metrics) bad data lines instead of stopping
    max_text_chars: int = 100_000   # a longer text is a bad example (truncation is by tokens)
    packing: bool = True            # pack texts into MAX_LENGTH rows (gembed.data.packing): almost
                                    # no padding; per device, or per gradient-cache chunk
    length_buckets: bool = True     # unpacked only: pad to a power-of-two bucket, not MAX_LENGTH
    init_layers: tuple[int, ...] | None = None   # with a model-folder INIT_FROM: keep only these
                                    # of its layers (e.g. (1, 3, 5)); the student has len() layers
    teacher: str | None = None      # model folder or hf: name whose vectors the distillation
                                    # losses match (LossConfig); None = no teacher
    teacher_cache: str | None = None   # folder of cached teacher vectors (gembed.teacher_cache);
                                    # None = WORKDIR/teacher_vectors

    @property
    def dataset_specs(self) -> tuple[DatasetSpec, ...]:
        """The mixture to train on: `datasets`, or TRAIN_DATA as a one-dataset mixture."""
        return self.datasets or (DatasetSpec(name=self.train_data, data=self.train_data),)

    def __post_init__(self):
        object.__setattr__(self, "datasets", tuple(self.datasets))
        if self.init_layers is not None:
            object.__setattr__(self, "init_layers", tuple(self.init_layers))
        for name, macro in (("batch_size", "BATCH_SIZE"), ("train_steps", "TRAIN_STEPS"),
                            ("max_length", "MAX_LENGTH"), ("checkpoint_every", "CHECKPOINT_EVERY"),
                            ("log_every", "LOG_EVERY"), ("warmup_steps", "TrainConfig.warmup_steps"),
                            ("seed", "SEED"), ("learning_rate", "LEARNING_RATE")):
            value = getattr(self, name)
            wanted = (int, float) if name == "learning_rate" else int
            if isinstance(value, bool) or not isinstance(value, wanted):
                raise GembedUserError(
                    f"{macro}={value!r} must be {'a number' if name == 'learning_rate' else 'an integer'}"
                    f"; fix the binding in your gin file or --gin_param.")
        checks = [
            (bool(self.train_data) or bool(self.datasets),
             "TRAIN_DATA is empty; set --gin_param='TRAIN_DATA=\"pairs.jsonl\"'"),
            (not (self.train_data and self.datasets),
             f"TRAIN_DATA={self.train_data!r} and TrainConfig.datasets are both set; set "
             f"TRAIN_DATA=None to train on the mixture"),
            (self.max_text_chars > 0, f"TrainConfig.max_text_chars={self.max_text_chars} must be positive"),
            (self.batch_size > 0, f"BATCH_SIZE={self.batch_size} must be positive"),
            (self.train_steps > 0, f"TRAIN_STEPS={self.train_steps} must be positive"),
            (self.max_length >= 2, f"MAX_LENGTH={self.max_length} must be at least 2"),
            (self.learning_rate > 0, f"LEARNING_RATE={self.learning_rate} must be positive"),
            (self.checkpoint_every > 0, f"CHECKPOINT_EVERY={self.checkpoint_every} must be positive"),
            (self.log_every > 0, f"LOG_EVERY={self.log_every} must be positive"),
            (self.chunk_size is None or self.chunk_size > 0,
             f"CHUNK_SIZE={self.chunk_size} must be positive or None"),
            (self.num_hard_negatives >= 0,
             f"TrainConfig.num_hard_negatives={self.num_hard_negatives} must be >= 0"),
            (0 <= self.warmup_steps, f"TrainConfig.warmup_steps={self.warmup_steps} must be >= 0"),
            (self.init_layers is None or (len(self.init_layers) > 0 and self.init_from),
             f"TrainConfig.init_layers={self.init_layers} needs a model-folder INIT_FROM and at "
             f"least one layer"),
        ]
        for ok, message in checks:
            if not ok:
                raise GembedUserError(f"{message}; fix the binding in your gin file or --gin_param.")
        try:
            re.compile(self.no_weight_decay_pattern)
        except re.error as e:
            raise GembedUserError(
                f"TrainConfig.no_weight_decay_pattern={self.no_weight_decay_pattern!r} is not a "
                f"valid regex ({e}); fix the binding.") from None


@gin.configurable
@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation during training: `gembed eval` tasks scored on the in-training params.

    Scores go to metrics.jsonl and TensorBoard as `eval/TASK/METRIC` at the steps they run.
    E.g. `EvalConfig.tasks = ['stsb', 'stdlib_code']`, `EvalConfig.data_dir = '../shared/data'`.
    """

    tasks: tuple[str, ...] = ()     # task names as `gembed eval --tasks` takes them; () = off
    data_dir: str | None = None     # folder of the public evaluation sets (tasks without data skip)
    every_steps: int = 0            # run every N steps, and at the last step; 0 = last step only
    batch_size: int = 64            # texts per encoder call

    def __post_init__(self):
        tasks = self.tasks.split(",") if isinstance(self.tasks, str) else self.tasks
        object.__setattr__(self, "tasks", tuple(t.strip() for t in tasks if t.strip()))
        if self.tasks:   # unknown names fail now, before data loading and training
            parse_task_list(self.tasks)
        if self.every_steps < 0 or self.batch_size <= 0:
            raise GembedUserError(
                f"EvalConfig.every_steps={self.every_steps} must be >= 0 and EvalConfig.batch_size="
                f"{self.batch_size} positive; fix the binding in your gin file or --gin_param.")


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Everything one `gembed train` run is configured with."""

    train: TrainConfig
    model: ModelConfig
    loss: LossConfig
    evaluation: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    sharding: ShardingConfig = dataclasses.field(default_factory=ShardingConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)


def _resolve_gin_file(name: str) -> str:
    """A gin file given on the command line: as a path, else relative to experiments/configs."""
    for candidate in (pathlib.Path(name), GIN_FILES_DIR / name):
        if candidate.is_file():
            return str(candidate)
    raise GembedUserError(
        f"{name}: gin file not found (looked in the current directory and {GIN_FILES_DIR}); "
        f"fix the --gin_file path.")


def _macro_defined(name: str) -> bool:
    """Whether the gin config parsed so far defines the macro `name`."""
    try:
        gin.query_parameter(f"%{name}")
    except ValueError:
        return False
    return True


class _QuietIncludeSearch(logging.Filter):
    """Drops gin's "Path not found" log lines, printed while it searches include paths."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Path not found")


@contextlib.contextmanager
def _quiet_include_search():
    """While parsing: no "Path not found" lines from gin's include-path search."""
    quiet = _QuietIncludeSearch()
    logging.getLogger().addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quiet)


def parse_gin(gin_files: Sequence[str], gin_params: Sequence[str]) -> None:
    """Parses gin files then bindings, with one-line user errors for typos and unknown names.

    A --gin_param that sets a macro no gin file defines (a likely typo, e.g. BATCH_SZE) is refused.
    """
    gin.clear_config()
    if GIN_FILES_DIR.is_dir():
        gin.add_config_file_search_path(str(GIN_FILES_DIR))
    for name in gin_files:
        path = _resolve_gin_file(name)
        try:
            with _quiet_include_search():
                gin.parse_config_file(path)
        except (ValueError, SyntaxError, IOError, tokenize.TokenError) as e:
            first_line = str(e).splitlines()[0]
            raise GembedUserError(f"{path}: {first_line}; fix or remove that binding.") from None
    for binding in gin_params:
        name = binding.split("=", 1)[0].strip()
        if "=" not in binding:
            raise GembedUserError(f"--gin_param={binding!r}: expected NAME=VALUE.")
        if (re.fullmatch(r"[A-Z][A-Z0-9_]*", name) and name not in CONTRACT_MACROS
                and not _macro_defined(name)):
            raise GembedUserError(
                f"--gin_param={binding!r}: no gin file defines the macro {name}; set one the "
                f"gin files define (every stage file defines {', '.join(CONTRACT_MACROS)}).")
        try:
            gin.parse_config(binding)
        except (ValueError, SyntaxError, tokenize.TokenError) as e:
            first_line = str(e).splitlines()[0]
            raise GembedUserError(f"--gin_param={binding!r}: {first_line}; fix the binding.") from None
    try:
        gin.finalize()
    except ValueError as e:
        macro = str(e).split("/", 1)[0]
        raise GembedUserError(
            f"{macro} is required by {', '.join(gin_files)} but not set; "
            f"add --gin_param='{macro}=...'.") from None


def build_stage_config() -> StageConfig:
    """Instantiates the configured dataclasses (call after `parse_gin`).

    When INIT_FROM is a model folder or a CKPT, the model is its architecture (see
    `model_folder.finetune_model_config` for which ModelConfig bindings still apply), so a stage
    started from another needs no model gin file; with a model folder, `TrainConfig.init_layers`
    keeps those of its layers (`gembed.layer_subset`). An `hf:ORG/NAME` INIT_FROM becomes the
    model folder it imports to (`hub_folder`).
    """
    train = TrainConfig()
    if hub.is_hub_name(train.init_from):
        train = dataclasses.replace(train, init_from=str(hub_folder.hub_model_folder(train.init_from)))
    model = ModelConfig()
    if model_folder.is_model_folder(train.init_from):
        model = model_folder.finetune_model_config(
            model_folder.read_model_config(train.init_from), gin.get_bindings(ModelConfig),
            train.init_from)
        if train.init_layers is not None:
            model = layer_subset.subset_config(model, train.init_layers, train.init_from)
    elif train.init_layers is not None:
        raise GembedUserError(
            f"TrainConfig.init_layers={train.init_layers} needs INIT_FROM to be a model folder "
            f"(gembed import / export), not {train.init_from!r}; fix INIT_FROM or drop init_layers.")
    elif train.init_from is not None and checkpoint.holds_checkpoints(train.init_from):
        source = checkpoint.resolve(train.init_from, role="INIT_FROM").workdir
        model = model_folder.finetune_model_config(
            workdir.read_model_config(source), gin.get_bindings(ModelConfig), source)
    return StageConfig(train=train, model=model, loss=LossConfig(), evaluation=EvalConfig(),
                       sharding=ShardingConfig(), lora=LoraConfig())


def write_operative_config(path: os.PathLike) -> None:
    """Writes gin's operative config (every value actually used) atomically to `path`."""
    path = pathlib.Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(gin.operative_config_str())
    os.replace(tmp, path)
