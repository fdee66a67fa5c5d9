"""Orbax checkpoints of a training workdir, and finding the params of any CKPT a user names.

Layout: DIR/checkpoints/<step>/{params,opt_state,loop}. Writes are atomic (orbax writes a temporary
folder and renames it) and so are removals of old steps (renamed into DIR/checkpoints/.deleting,
emptied later), so a process killed at any moment leaves every step folder whole. A Ctrl-C during
the part of a save that runs on the main thread is held until that part ends.
Everywhere a CKPT is asked for, a training workdir (its latest step) or one step folder is accepted.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import pathlib
import shutil
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from gembed.errors import GembedUserError

ITEMS = ("params", "opt_state", "loop")
DELETING_DIR = ".deleting"   # old steps are renamed here (atomic), then removed
SKIPPED_DIR = "skipped_checkpoints"   # damaged checkpoints a resume moved out of checkpoints/


class _QuietReadOnly(logging.Filter):
    """Drops orbax's notices that a manager opened read-only (on purpose, to read) will not save,
    and that a params item has no checkpoint-level metadata file (its tree metadata is read)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("CheckpointManagerOptions.read_only=True")
                    or message.startswith("Given directory is read only")
                    or message.startswith("Metadata file does not exist"))


@contextlib.contextmanager
def _quiet_read_only():
    quiet = _QuietReadOnly()
    logging.getLogger("absl").addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger("absl").removeFilter(quiet)


class _QuietInterrupt(logging.Filter):
    """Drops orbax's error reports of a KeyboardInterrupt (Ctrl-C during a save): the CLI says it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.exc_info[0] is KeyboardInterrupt)


@contextlib.contextmanager
def quiet_interrupts():
    """While the block runs, a Ctrl-C inside orbax is not logged with its traceback."""
    quiet = _QuietInterrupt()
    logging.getLogger("absl").addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger("absl").removeFilter(quiet)


def checkpoint_dir(workdir: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(workdir).resolve() / "checkpoints"


@contextlib.contextmanager
def _deferred_interrupts(interrupted: bool = False):
    """A first Ctrl-C inside the block takes effect when the block ends, a second one at once
    (`interrupted`: the first came before the block).

    Orbax runs part of a save on the main thread (an asyncio loop, thread starts, the wait for the
    previous save); a KeyboardInterrupt raised in there left the save hung, aborted the process, or
    was swallowed so that training went on.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = interrupted

    def hold(signum, frame):
        nonlocal pressed
        if pressed:
            raise KeyboardInterrupt
        pressed = True

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed and not interrupted:
        signal.raise_signal(signal.SIGINT)   # delivered to the usual handler now


def open_manager(workdir, keep: int | None = None, read_only: bool = False) -> ocp.CheckpointManager:
    """The workdir's manager, keeping the `keep` newest steps (removing older ones atomically)."""
    with _quiet_read_only():
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, read_only=read_only,
            todelete_subdir=None if read_only else DELETING_DIR)
        manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                        item_names=ITEMS)
    if not read_only:
        _empty_deleting(manager)   # what a killed run left there
    return manager


def save(manager: ocp.CheckpointManager, step: int, state: dict[str, Any]) -> None:
    """Starts an asynchronous save of the `ITEMS` of `state` at `step` (after the previous save
    and its removal of old steps have finished)."""
    with _deferred_interrupts():
        manager.save(step, args=ocp.args.Composite(
            **{name: ocp.args.StandardSave(state[name]) for name in ITEMS}))
    _empty_deleting(manager)


def finish(manager: ocp.CheckpointManager, interrupted: bool = False) -> None:
    """Waits for the save in flight (if any) and its removal of old steps, then closes; after a
    Ctrl-C (`interrupted`), another one abandons the wait."""
    with _deferred_interrupts(interrupted):
        manager.wait_until_finished()
        manager.close()
    _empty_deleting(manager, remove_folder=True)


def _empty_deleting(manager: ocp.CheckpointManager, remove_folder: bool = False) -> None:
    """Removes the old steps renamed into DELETING_DIR (process 0; a partial removal is harmless:
    nothing reads that folder); the folder itself only when no save is in flight to rename into it."""
    deleting = pathlib.Path(str(manager.directory)) / DELETING_DIR
    if jax.process_index() != 0 or not deleting.is_dir():
        return
    for old in deleting.iterdir():
        shutil.rmtree(old, ignore_errors=True)
    if remove_folder:
        with contextlib.suppress(OSError):
            deleting.rmdir()


def save_params(workdir: str | pathlib.Path, step: int, params: Any) -> CheckpointRef:
    """Writes a params-only checkpoint DIR/checkpoints/<step>/params (e.g. a soup) and waits.

    `resolve` and `restore_params` read it like any training checkpoint; it cannot be resumed.
    """
    options = ocp.CheckpointManagerOptions(create=True)
    with ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=("params",)) as manager:
        manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
        manager.wait_until_finished()
    return CheckpointRef(pathlib.Path(workdir).resolve(), step)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: dict[str, Any]) -> dict:
    """Restores every item at `step` onto the shardings of `abstract_state` (ShapeDtypeStructs)."""
    restored = manager.restore(step, args=ocp.args.Composite(
        **{name: ocp.args.StandardRestore(abstract_state[name]) for name in ITEMS}))
    return {name: restored[name] for name in ITEMS}


def set_aside(manager: ocp.CheckpointManager, step: int) -> pathlib.Path:
    """Moves the (damaged) step folder out of checkpoints/ to DIR/skipped_checkpoints/STEP[.N] on
    process 0, so it is kept for inspection and the step can be saved again; returns the new path."""
    source = pathlib.Path(str(manager.directory)) / str(step)
    target = source.parent.parent / SKIPPED_DIR / str(step)
    suffix = 0
    while target.exists():
        suffix += 1
        target = target.with_name(f"{step}.{suffix}")
    if jax.process_index() == 0:
        target.parent.mkdir(exist_ok=True)
        source.rename(target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"gembed: set aside checkpoint {step}")
    manager.reload()
    return target


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    """A resolved CKPT: the training workdir it belongs to and one of its steps."""

    workdir: pathlib.Path
    step: int

    @property
    def step_dir(self) -> pathlib.Path:
        return checkpoint_dir(self.workdir) / str(self.step)


def holds_checkpoints(path: str | pathlib.Path) -> bool:
    """Whether `path` is a step folder, a checkpoints/ folder, or a workdir with checkpoints/."""
    path = pathlib.Path(path)
    return (path.name.isdigit() and path.parent.name == "checkpoints") or (
        path / "checkpoints").is_dir() or path.name == "checkpoints"


def resolve(path: str | pathlib.Path, role: str = "CKPT") -> CheckpointRef:
    """A workdir (latest step), its checkpoints/ folder, or a step folder -> CheckpointRef."""
    path = pathlib.Path(path).resolve()
    if path.is_dir() and path.name.isdigit() and path.parent.name == "checkpoints":
        if not (path / "params").is_dir():
            raise GembedUserError(
                f"{path}: step folder has no params (incomplete or corrupt checkpoint); "
                f"name another step or the workdir.")
        return CheckpointRef(path.parent.parent, int(path.name))
    workdir = path.parent if path.name == "checkpoints" else path
    if checkpoint_dir(workdir).is_dir():
        steps = open_manager(workdir, read_only=True).all_steps()
        if steps:
            return CheckpointRef(workdir, max(steps))
    raise GembedUserError(
        f"{path}: {role} is not a training workdir with checkpoints or a step folder "
        f"(DIR/checkpoints/STEP); check the path, or run the stage that writes it first.")


def restore_params(ref: CheckpointRef, abstract_params: Any) -> Any:
    """Only the params item of a checkpoint, placed like `abstract_params`; params the checkpoint
    holds beyond those (a training-only distillation map) are left out."""
    extra = _extra_params(ref, abstract_params)
    manager = open_manager(ref.workdir, read_only=True)
    try:
        restored = manager.restore(ref.step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore({**abstract_params, **extra})))
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise GembedUserError(
            f"{ref.step_dir}: its params do not restore ({str(e).splitlines()[0]}): the "
            f"checkpoint is damaged, or {ref.workdir}/model_config.json is not the run's that wrote "
            f"it; name another step, or fix that file.") from None
    return {name: value for name, value in restored["params"].items() if name not in extra}


def _extra_params(ref: CheckpointRef, abstract_params: Any) -> dict[str, Any]:
    """ShapeDtypeStructs of the top-level params the checkpoint holds beyond `abstract_params`
    (placed like its first leaf), to be read and dropped."""
    if not isinstance(abstract_params, dict):
        return {}
    try:
        with _quiet_read_only():
            tree = ocp.StandardCheckpointer().metadata(ref.step_dir / "params").item_metadata.tree
    except (ValueError, FileNotFoundError, AttributeError):
        return {}
    placement = jax.tree.leaves(abstract_params)[0].sharding
    return {name: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=placement),
                               tree[name])
            for name in tree.keys() - abstract_params.keys()}


def abstract_like(tree: Any, sharding) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) placed with `sharding`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
