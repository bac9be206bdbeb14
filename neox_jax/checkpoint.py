"""Checkpoints: an orbax CheckpointManager holding the train state, the data-iterator state and the config.

Layout: `<workdir>/checkpoints/<step>/{state,data,config}`. `state` is any pytree of jax arrays (the TrainState
plus the RNG key); it is restored onto whatever shardings the caller's abstract target carries, so a run can
resume on another mesh or device count (orbax reshards). `data` is the pipeline's small JSON state, keyed by global
position, so it is valid for any process count. Saves are asynchronous and atomic (orbax writes to a temporary
`<step>.orbax-checkpoint-tmp*` directory and renames it when complete): a crash mid-save leaves the previous
checkpoint as the latest, and the leftover temporary directory is ignored.

A committed step can still be damaged later (a truncated copy, a disk error, a file emptied by hand). Before a
step is restored it is verified (`damage`): every JSON file orbax reads parses (the tree metadata, the sharding,
the data-iterator state, the config) and every byte range the state's OCDBT index points at lies inside its
file, so a missing or truncated tensor file is found without reading the tensors. A damaged latest step is
passed over with one warning for the newest intact one; the trainer renames it to `<step>.damaged` (nothing is
deleted, and a later save of that step does not collide with it). A failed save (a full disk) is one
CheckpointSaveError naming the step, the cause and the newest complete checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from jax.experimental import multihost_utils

from neox_jax import errors
from neox_jax.pytree import path_name

STATE, DATA, CONFIG = "state", "data", "config"
DAMAGED_SUFFIX = ".damaged"
log = logging.getLogger("neox_jax")
# files of a step orbax reads as JSON (the step's metadata, the state's tree metadata and sharding, the JSON items)
_JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding", "metadata")
_REQUIRED = (os.path.join(STATE, "_METADATA"), os.path.join(DATA, "metadata"), os.path.join(CONFIG, "metadata"))
# an OCDBT location: kind, base path, file, offset, length (tensorstore's `ocdbt.dump` spelling)
_OCDBT_REF = re.compile(r"^(value|btreenode):([^:]*):(.+):(\d+):(\d+)$")


class CheckpointMismatchError(errors.RunFailure, ValueError):
    """A checkpoint's arrays don't have the shapes the current config expects."""


class CheckpointDamagedError(errors.RunFailure):
    """No checkpoint of a workdir (or not the one asked for) is intact."""


class CheckpointSaveError(errors.RunFailure):
    """A checkpoint could not be written (a full disk, an I/O error); the ones written before are intact."""


class _OrbaxTracebacks(logging.Filter):
    """Drops the tracebacks orbax logs from its background save threads: the same exception is raised in the
    main thread at the next save or wait, where it becomes one CheckpointSaveError (a full disk otherwise
    printed four tracebacks of a hundred lines each)."""

    def filter(self, record):
        return not (record.exc_info and record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


_TRACEBACK_FILTER = _OrbaxTracebacks()


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip()
    line = next((x for x in text.splitlines() if "No space left on device" in x), text.splitlines()[0] if text else "")
    return (line or type(e).__name__)[:limit]


def damage(step_dir: str) -> str | None:
    """Why the committed checkpoint `step_dir` cannot be restored, or None when it is intact as far as can be told
    without reading its tensors: the JSON files orbax reads parse, and every byte range the state's OCDBT index
    refers to lies inside its file."""
    for rel in _REQUIRED:
        if not os.path.isfile(os.path.join(step_dir, rel)):
            return f"{rel} is missing"
    for root, _, names in os.walk(step_dir):
        for name in names:
            if name in _JSON_FILES or os.path.basename(root) == "array_metadatas":
                path = os.path.join(root, name)
                try:
                    with open(path, "rb") as f:
                        json.loads(f.read())
                except (OSError, ValueError) as e:
                    return f"{os.path.relpath(path, step_dir)} is not readable JSON ({e})"
    state = os.path.join(step_dir, STATE)
    return _ocdbt_damage(state) if os.path.isfile(os.path.join(state, "manifest.ocdbt")) else None


def _ocdbt_damage(state: str) -> str | None:
    """Walk the B+tree of the state's (merged) OCDBT database and check the file of every node and value."""
    base = ts.KvStore.open(f"file://{os.path.abspath(state)}/").result()
    where = os.path.basename(state)
    try:
        versions = ts.ocdbt.dump(base).result().get("versions") or []
    except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError with a status text
        return f"{where}/manifest.ocdbt is not readable ({_first_line(e)})"
    pending = [versions[-1]["root"]["location"]] if versions and "location" in versions[-1].get("root", {}) else []
    while pending:
        location = pending.pop()
        kind, base_path, file, offset, length = _OCDBT_REF.match(location).groups()
        path = os.path.join(state, base_path, file)
        rel = os.path.join(where, base_path, file)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        if os.path.getsize(path) < int(offset) + int(length):
            return f"{rel} has {os.path.getsize(path)} bytes, the checkpoint's index needs {int(offset) + int(length)}"
        if kind == "btreenode":
            try:
                node = ts.ocdbt.dump(base, location).result()
            except Exception as e:  # noqa: BLE001
                return f"{rel} is not readable ({_first_line(e)})"
            pending += [v for v in _strings(node) if _OCDBT_REF.match(v)]
    return None


def _strings(tree):
    if isinstance(tree, str):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _strings(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _strings(v)


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def _handlers() -> dict:
    # explicit handlers so metadata and single items can be read from a manager that has not saved yet
    return {STATE: ocp.StandardCheckpointHandler(), DATA: ocp.JsonCheckpointHandler(),
            CONFIG: ocp.JsonCheckpointHandler()}


class Checkpointer:
    """keep: the last K checkpoints are kept; keep_every: every checkpoint whose step is a multiple of M is kept
    as well (0 = none)."""

    def __init__(self, workdir: str, keep: int = 3, keep_every: int = 0, async_save: bool = True,
                 create: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep or None,
            keep_period=keep_every or None,
            enable_async_checkpointing=async_save,
            create=create,
        )
        self.directory = checkpoint_dir(workdir)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers())
        self._saving: int | None = None  # the step of the save in flight
        self._failed = False
        logging.getLogger("absl").addFilter(_TRACEBACK_FILTER)  # orbax logs through absl

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, config: dict, force: bool = False) -> bool:
        """Start an async save of step `step`; returns whether one was started. A failed save (this one or the
        previous, still in flight) raises CheckpointSaveError."""
        args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state), DATA: ocp.args.JsonSave(data_state),
                                     CONFIG: ocp.args.JsonSave(config)})
        self.wait()
        with self._save_errors(step):
            started = self.manager.save(step, args=args, force=force)
        self._saving = step if started else None
        return started

    @contextlib.contextmanager
    def _save_errors(self, step: int | None):
        """An exception of orbax's save of `step` (raised here, or in the background and re-raised at the next
        save or wait) becomes one CheckpointSaveError; after one, closing waits quietly."""
        try:
            yield
        except (OSError, ValueError, RuntimeError) as e:
            if step is None or isinstance(e, errors.UserError):
                raise
            self._failed = True
            text = str(e)
            full = "No space left on device" in text or "os_error_code='28'" in text or \
                getattr(e, "errno", None) == errno.ENOSPC
            reason = "the disk is full (no space left on device)" if full else _first_line(e)
            done = [s for s in self.all_steps() if s != step]
            intact = (f"the newest complete checkpoint is step {done[-1]}; run the same command again to resume from "
                      "it" if done else "no checkpoint was completed before it")
            raise CheckpointSaveError(f"checkpoint step {step} could not be written to {self.directory}: {reason}; "
                                      f"{intact}{' once space is free' if full and done else ''} (the partial "
                                      "folder it left is ignored)") from None

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self.manager.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} (have {self.all_steps()})")
        return step

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def intact_step(self, step: int | None = None, move_aside: bool = False) -> int:
        """The step to restore: `step` when given (refused when damaged), else the newest intact one. Newer damaged
        steps are passed over with one warning each naming the step dir; with `move_aside` (the trainer) each is
        renamed to `<step>.damaged`, so that saving that step again does not collide with it. Nothing is deleted;
        with no intact step at all, one CheckpointDamagedError."""
        if step is not None:
            step = self._step(step)
            reason = damage(self.step_dir(step))
            if reason:
                raise CheckpointDamagedError(f"checkpoint {self.step_dir(step)} is damaged: {reason}; choose another "
                                             f"step (stored: {self.all_steps()})")
            return step
        damaged, chosen = [], None
        for s in reversed(self.all_steps()):
            reason = damage(self.step_dir(s))
            if reason is None:
                chosen = s
                break
            damaged.append((s, reason))
        if chosen is None:
            if not damaged:
                return self._step(None)  # none at all: FileNotFoundError
            raise CheckpointDamagedError(
                f"no intact checkpoint in {self.directory}: " + "; ".join(f"step {s}: {r}" for s, r in damaged)
                + " (left as they are; move them out of checkpoints/ to start this workdir afresh)")
        moved = _move_aside([self.step_dir(s) for s, _ in damaged]) if move_aside else [None] * len(damaged)
        if move_aside:
            self.manager.reload()
        for (s, reason), where in zip(damaged, moved):
            if jax.process_index() == 0:
                log.warning("checkpoint %s is damaged (%s); using step %d, the newest intact one%s", self.step_dir(s),
                            reason, chosen, f"; the damaged one is kept as {where}" if where else "")
        return chosen

    def restore(self, abstract_state: Any, step: int | None = None, move_aside: bool = False
                ) -> tuple[Any, dict, dict]:
        """Restore (state, data_state, config) of `step` (default: the newest intact one, see `intact_step`) onto
        the shardings of `abstract_state`."""
        step = self.intact_step(step, move_aside)
        check_shapes(self.stored_shapes(step), abstract_state, f"{self.directory}/{step}")
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**{
                STATE: ocp.args.StandardRestore(abstract_state), DATA: ocp.args.JsonRestore(),
                CONFIG: ocp.args.JsonRestore()}))
        except ValueError as e:  # tensorstore's read errors (damaged bytes the index check cannot see)
            raise CheckpointDamagedError(f"checkpoint {self.step_dir(step)} could not be read ({_first_line(e)}); "
                                         f"move it out of {self.directory} to resume from the step before") from None
        return restored[STATE], restored[DATA], restored[CONFIG]

    def restore_config(self, step: int | None = None) -> dict:
        step = self._step(step)
        return self.manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]

    def stored_metadata(self, step: int) -> Any:
        """The state item's tree of orbax ArrayMetadata (shape, dtype) as stored."""
        meta = self.manager.item_metadata(step)[STATE]
        return getattr(meta, "tree", meta)

    def restore_numpy(self, step: int, item: Any) -> Any:
        """The arrays of `item` (a part of `stored_metadata(step)`, nested as in the state, e.g.
        {"train": {"params": ...}}) as host numpy arrays on any mesh; nothing else of the step is read."""
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item,
                                is_leaf=lambda m: hasattr(m, "shape"))
        return ocp.PyTreeCheckpointer().restore(
            os.path.join(self.step_dir(step), STATE),
            args=ocp.args.PyTreeRestore(item=item, restore_args=as_numpy, partial_restore=True))

    def stored_shapes(self, step: int) -> dict[str, tuple]:
        return {path_name(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(
            self.stored_metadata(step), is_leaf=lambda m: hasattr(m, "shape"))}

    def wait(self) -> None:
        with self._save_errors(self._saving):
            self.manager.wait_until_finished()
        self._saving = None

    def close(self) -> None:
        """Wait for the save in flight (its failure raises here) and close; after a failed save that was already
        raised, quietly."""
        reported = self._failed
        try:
            self.wait()
            self.manager.close()
        except Exception:  # noqa: BLE001 - the failure was reported when it was raised
            if not reported:
                raise


def _move_aside(step_dirs: list[str]) -> list[str]:
    """Rename damaged step dirs to `<step>.damaged` (then .damaged-2, ...): orbax ignores names that are not a
    step number. Process 0 renames, between barriers, so every process has verified the same dirs first."""
    targets = []
    for d in step_dirs:
        target, n = d + DAMAGED_SUFFIX, 1
        while os.path.exists(target):
            n += 1
            target = f"{d}{DAMAGED_SUFFIX}-{n}"
        targets.append(target)
    _barrier("neox_jax damaged checkpoints verified")
    if jax.process_index() == 0:
        for d, target in zip(step_dirs, targets):
            os.rename(d, target)
    _barrier("neox_jax damaged checkpoints moved")
    return targets


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def check_shapes(stored: dict[str, tuple], target: Any, where: str) -> None:
    """Raise CheckpointMismatchError naming the first array whose stored shape differs from the target's.
    Parameters are checked first, so the message names a parameter when the model config changed."""
    leaves = [(path_name(p), tuple(np.shape(x))) for p, x in jax.tree_util.tree_leaves_with_path(target)]
    leaves.sort(key=lambda kv: "/params/" not in f"/{kv[0]}/")
    for key, want in leaves:
        if key not in stored:
            raise CheckpointMismatchError(f"checkpoint {where} has no array {key} (expected shape {want}); "
                                          "was it written by another model or optimizer config?")
        if stored[key] != want:
            raise CheckpointMismatchError(
                f"checkpoint {where}: {key} has shape {stored[key]} but the config expects {want}; the checkpoint "
                "was written for a different model config (resume with the config it was saved with, or use a "
                "new --workdir)")
