"""Checkpoints: an orbax CheckpointManager holding the train state, the data-iterator state and the config.

Layout: `<workdir>/checkpoints/<step>/{state,data,config,integrity}`. `state` is any pytree of jax arrays (the
TrainState plus the RNG key); it is restored onto whatever shardings the caller's abstract target carries, so a run can
resume on another mesh or device count (orbax reshards). `data` is the pipeline's small JSON state, keyed by global
position, so it is valid for any process count. Saves are asynchronous and atomic (orbax writes to a temporary
`<step>.orbax-checkpoint-tmp*` directory and renames it when complete): a crash mid-save leaves the previous
checkpoint as the latest, and the leftover temporary directory is ignored.

A committed step can still be damaged later (a truncated copy, a disk error, a file emptied or flipped by hand).
Every save writes a fourth item, `integrity`: the checksum of every array (computed on the devices from the
arrays saved, `integrity.py`) and of the data and config items, and the run's count of skipped steps. A step
is read in two checks: `damage`, before anything is read (every JSON file orbax reads parses, every byte range the
state's OCDBT index points at lies inside its file), then, after the read and before any array is used, every
checksum. A step that fails either is passed over with one warning for the newest one that passes; the trainer
renames it to `<step>.damaged` (nothing is deleted, and a later save of that step does not collide with it). A
failed save (a full disk) is one CheckpointSaveError naming the step, the cause and the newest complete checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
import sys
import traceback
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from jax.experimental import multihost_utils

from neox_jax import errors, integrity
from neox_jax.integrity import first_mismatch
from neox_jax.workdir import any_process
from neox_jax.pytree import path_name

STATE, DATA, CONFIG, INTEGRITY = "state", "data", "config", "integrity"
DAMAGED_SUFFIX, DIVERGED_SUFFIX, DANGLING_SUFFIX = ".damaged", ".diverged", ".dangling"
# a step dir set aside under one of those names (`_free_name` appends -2, -3, ... when one is taken)
_SET_ASIDE = re.compile(rf"\d+({'|'.join(map(re.escape, (DAMAGED_SUFFIX, DIVERGED_SUFFIX, DANGLING_SUFFIX)))})(-\d+)?")
log = logging.getLogger("neox_jax")
# files of a step orbax reads as JSON (the step's metadata, the state's tree metadata and sharding, the JSON items)
_JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding", "metadata")
_REQUIRED = (os.path.join(STATE, "_METADATA"), os.path.join(DATA, "metadata"), os.path.join(CONFIG, "metadata"),
             os.path.join(INTEGRITY, "metadata"))
# an OCDBT location: kind, base path, file, offset, length (tensorstore's `ocdbt.dump` spelling)
_OCDBT_REF = re.compile(r"^(value|btreenode):([^:]*):(.+):(\d+):(\d+)$")


class CheckpointMismatchError(errors.RunFailure, ValueError):
    """A checkpoint's arrays don't have the shapes the current config expects."""


class CheckpointDamagedError(errors.RunFailure):
    """No checkpoint of a workdir (or not the one asked for) is intact."""


class CheckpointSaveError(errors.RunFailure):
    """A checkpoint could not be written (a full disk, an I/O error); the ones written before are intact."""


_ORBAX_TMP = ".orbax-checkpoint-tmp"  # the suffix of a save's folder until orbax renames it, complete


class _OrbaxTracebacks(logging.Filter):
    """Drops the tracebacks orbax logs from its background save threads: the same exception is raised in the
    main thread at the next save or wait, where it becomes one CheckpointSaveError (a full disk otherwise
    printed four tracebacks of a hundred lines each). asyncio logs the same for orbax's tasks and futures a failed
    save abandoned ("Task exception was never retrieved", naming the orbax coroutine; "_GatheringFuture exception
    was never retrieved", naming nothing of orbax but a traceback through it; "Future exception was never
    retrieved" for a write tensorstore failed, with no Python frames at all but the path of the save's temporary
    folder), when they happen to be collected."""

    def filter(self, record):
        if not (record.exc_info and record.levelno >= logging.ERROR):
            return True
        orbax = f"{os.sep}orbax{os.sep}"
        frames = (frame.f_code.co_filename for frame, _ in traceback.walk_tb(record.exc_info[2]))
        return not (any(orbax in where for where in (record.pathname, record.getMessage(), *frames))
                    or _ORBAX_TMP in str(record.exc_info[1]))


_TRACEBACK_FILTER = _OrbaxTracebacks()


def _closed_loop(unraisable) -> bool:
    """tensorstore's callbacks into the event loop of a save orbax abandoned: after a failed save, each write still
    in flight printed an 'Event loop is closed' traceback (dozens on a full disk); the save's error says it all."""
    return isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"


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


class _IntegrityHandler(ocp.JsonCheckpointHandler):
    """The integrity item: JSON whose array checksums are read from the devices in orbax's background thread,
    when the item is written (integrity.DeviceChecksums), so that a save waits for them no longer than for its
    arrays; the item is committed with the step, atomically, as the others are."""

    async def _save_fn(self, x, directory):
        if isinstance(x.get("arrays"), integrity.DeviceChecksums):
            x = {**x, "arrays": x["arrays"].result()}
        await super()._save_fn(x, directory)


@ocp.args.register_with_handler(_IntegrityHandler, for_save=True)
class _IntegritySave(ocp.args.JsonSave):
    pass


@ocp.args.register_with_handler(_IntegrityHandler, for_restore=True)
class _IntegrityRestore(ocp.args.JsonRestore):
    pass


def _handlers() -> dict:
    # Replica-parallel saving splits each replicated array among its replicas so that hosts share its writing; in
    # one process every replica is here, and the split only adds a slice per array and device, each compiled on
    # first use (an 8-device CPU run of the tiny model: 80 compiles, 4 of its 25 CPU-seconds). What is read back
    # is the same either way. orbax's ArrayHandler takes the choice only when built, and a new one registered in
    # its place would drop the array-metadata store the default carries (and log a warning on every run).
    arrays = ocp.type_handlers.get_type_handler(jax.Array)
    if hasattr(arrays, "_use_replica_parallel"):
        arrays._use_replica_parallel = jax.process_count() > 1
    # explicit handlers so metadata and single items can be read from a manager that has not saved yet
    return {STATE: ocp.StandardCheckpointHandler(), DATA: ocp.JsonCheckpointHandler(),
            CONFIG: ocp.JsonCheckpointHandler(), INTEGRITY: _IntegrityHandler()}


class Unreadable(CheckpointDamagedError):
    """One step's bytes do not read back as written (a read error, or a checksum that does not match)."""


def _record(step_dir: str) -> dict:
    """A step's integrity record ({} when it cannot be read)."""
    try:
        with open(os.path.join(step_dir, INTEGRITY, "metadata"), "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return {}


def newest_known_good(directory: str, steps: list[int], pending: tuple[int, int] | None = None) -> int | None:
    """The newest intact step whose weights are known to train on: a later step (or `pending`, the (step, skipped
    steps) being saved) was saved with the same count of skipped steps, so the step right after it had a finite
    loss and gradient; or the one a later step's record names (its witness may have been rotated away since)."""
    steps = sorted(steps)
    records = {s: _record(os.path.join(directory, str(s))) for s in steps}
    skipped = [records[s].get("skipped_steps") for s in steps] + ([pending[1]] if pending else [])
    named = [r.get("known_good") for r in records.values() if r.get("known_good") in records]
    for i in range(len(steps) - 1, -1, -1):
        if skipped[i] is not None and skipped[i] in skipped[i + 1:] and \
                damage(os.path.join(directory, str(steps[i]))) is None:
            return max([steps[i], *named])
    return max(named, default=None)


@dataclasses.dataclass
class _Rotation:
    """Which steps `keep_checkpoints` rotation keeps (an orbax preservation policy): the last `keep` (0: all), the
    multiples of `keep_every`, the steps of a schedule (`keep_steps`, train.checkpoint_steps), and always the
    newest known-good one (`newest_known_good`), so that a streak of non-finite steps can never rotate away the last
    checkpoint to roll back to."""

    directory: str
    keep: int
    keep_every: int
    keep_steps: frozenset = frozenset()

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        steps = [c.step for c in checkpoints]
        good = newest_known_good(self.directory, steps)
        rank = {s: i for i, s in enumerate(sorted(steps, reverse=True))}
        return [not self.keep or rank[s] < self.keep or bool(self.keep_every and s % self.keep_every == 0)
                or s in self.keep_steps or s == good for s in steps]


class Checkpointer:
    """keep: the last K checkpoints are kept; keep_every: every checkpoint whose step is a multiple of M is kept
    as well (0 = none); keep_steps: these steps are kept too (a checkpoint schedule); the newest known-good one is
    never rotated away (`_Rotation`). Every save carries an integrity record (the checksum of each array and JSON
    item, `integrity.py`), checked whenever a step is read."""

    def __init__(self, workdir: str, keep: int = 3, keep_every: int = 0, async_save: bool = True,
                 create: bool = True, keep_steps=()):
        self.directory = checkpoint_dir(workdir)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=_Rotation(self.directory, keep, keep_every, frozenset(keep_steps)),
            enable_async_checkpointing=async_save,
            create=create,
        )
        if create:
            _tidy(self.directory)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers())
        self._saving: int | None = None  # the step of the save in flight
        self._failed = False
        for logger in ("absl", "asyncio"):  # orbax logs through absl; its abandoned tasks through asyncio
            logging.getLogger(logger).addFilter(_TRACEBACK_FILTER)
        errors.filter_hook(sys, "unraisablehook", _closed_loop)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, config: dict, force: bool = False,
             skipped_steps: int | None = None) -> bool:
        """Start an async save of step `step`; returns whether one was started. `skipped_steps`: the run's count of
        skipped (non-finite) steps so far, which tells rotation which steps are known to be good. A failed save
        (this one or the previous, still in flight) raises CheckpointSaveError."""
        arrays = integrity.DeviceChecksums(state)  # dispatched, not waited for: read when the item is written
        self.wait()
        good = newest_known_good(self.directory, self.all_steps(), (step, skipped_steps))
        record = {"version": 1, "skipped_steps": skipped_steps, "known_good": good, "arrays": arrays,
                  DATA: integrity.json_checksum(data_state), CONFIG: integrity.json_checksum(config)}
        args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state), DATA: ocp.args.JsonSave(data_state),
                                     CONFIG: ocp.args.JsonSave(config), INTEGRITY: _IntegritySave(record)})
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

    def newest_readable(self, step: int | None, read, move_aside: bool = False):
        """`read(s)` of `step` when given (refused when damaged), else of the newest step that is intact
        (`damage`) and reads back as written (`read` raises Unreadable when not). Newer steps passed over get one
        warning each naming the step dir and why; with `move_aside` (the trainer) each is renamed to
        `<step>.damaged`, so that saving that step again does not collide with it. Nothing is deleted; with no
        readable step at all, one CheckpointDamagedError."""
        if step is not None:
            step = self._step(step)
            reason = damage(self.step_dir(step))
            if reason is None:
                try:
                    return read(step)
                except Unreadable as e:
                    reason = str(e)
            raise CheckpointDamagedError(f"checkpoint {self.step_dir(step)} is damaged: {reason}; choose another "
                                         f"step (stored: {self.all_steps()})")
        damaged = []
        for s in reversed(self.all_steps()):
            reason = damage(self.step_dir(s))
            if reason is None:
                try:
                    result = read(s)
                except Unreadable as e:
                    reason = str(e)
                else:
                    self._pass_over(damaged, s, move_aside)
                    return result
            damaged.append((s, reason))
        if not damaged:
            return read(self._step(None))  # none at all: FileNotFoundError
        raise CheckpointDamagedError(
            f"no intact checkpoint in {self.directory}: " + "; ".join(f"step {s}: {r}" for s, r in damaged)
            + " (left as they are; move them out of checkpoints/ to start this workdir afresh)")

    def _pass_over(self, damaged: list[tuple[int, str]], chosen: int, move_aside: bool) -> None:
        moved = (_move_aside([self.step_dir(s) for s, _ in damaged], DAMAGED_SUFFIX) if move_aside
                 else [None] * len(damaged))
        if move_aside and damaged:
            self.manager.reload()
        for (s, reason), where in zip(damaged, moved):
            if jax.process_index() == 0:
                log.warning("checkpoint %s is damaged (%s); using step %d, the newest intact one%s", self.step_dir(s),
                            reason, chosen, f"; the damaged one is kept as {where}" if where else "")

    def intact_step(self, step: int | None = None, move_aside: bool = False) -> int:
        """The step `newest_readable` would read, judged by `damage` alone (no array is read)."""
        return self.newest_readable(step, lambda s: s, move_aside)

    def restore(self, abstract_state: Any, step: int | None = None, move_aside: bool = False
                ) -> tuple[Any, dict, dict]:
        """Restore (state, data_state, config) of `step` (default: the newest that reads back as written, see
        `newest_readable`) onto the shardings of `abstract_state`; every array and JSON item is checked against
        the step's integrity record before it is returned."""
        def read(s):
            with _read_errors(s):
                check_shapes(self.stored_shapes(s), abstract_state, self.step_dir(s))
                restored = self.manager.restore(s, args=ocp.args.Composite(**{
                    STATE: ocp.args.StandardRestore(abstract_state), DATA: ocp.args.JsonRestore(),
                    CONFIG: ocp.args.JsonRestore(), INTEGRITY: _IntegrityRestore()}))
            record = restored[INTEGRITY]
            _check(s, first_mismatch(record["arrays"], integrity.array_checksums(restored[STATE]))
                   or _json_mismatch(record, restored))
            return restored[STATE], restored[DATA], restored[CONFIG]

        return self.newest_readable(step, read, move_aside)

    def restore_config(self, step: int | None = None) -> dict:
        step = self._step(step)
        return self.manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]

    def stored_metadata(self, step: int) -> Any:
        """The state item's tree of orbax ArrayMetadata (shape, dtype) as stored."""
        meta = self.manager.item_metadata(step)[STATE]
        return getattr(meta, "tree", meta)

    def restore_numpy(self, step: int, item: Any) -> Any:
        """The arrays of `item` (a part of `stored_metadata(step)`, nested as in the state, e.g.
        {"train": {"params": ...}}) as host numpy arrays on any mesh, checked against the step's integrity record
        (Unreadable when they do not match); nothing else of the step is read."""
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item,
                                is_leaf=lambda m: hasattr(m, "shape"))
        with _read_errors(step):
            arrays = ocp.PyTreeCheckpointer().restore(
                os.path.join(self.step_dir(step), STATE),
                args=ocp.args.PyTreeRestore(item=item, restore_args=as_numpy, partial_restore=True))
            record = self.manager.restore(step, args=ocp.args.Composite(**{INTEGRITY: _IntegrityRestore()}))
        got = {path_name(p): integrity.numpy_checksum(x) for p, x in jax.tree_util.tree_leaves_with_path(arrays)}
        _check(step, first_mismatch(record[INTEGRITY]["arrays"], got))
        return arrays

    def stored_shapes(self, step: int) -> dict[str, tuple]:
        return {path_name(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(
            self.stored_metadata(step), is_leaf=lambda m: hasattr(m, "shape"))}

    def set_aside_after(self, step: int) -> tuple[list[str], int | None]:
        """Move the steps after `step` aside as `<step>.diverged` (after a divergence: so that the next run resumes
        from before it). Returns (the moved dirs, the newest step left)."""
        with contextlib.suppress(CheckpointSaveError):
            self.wait()
        steps = self.all_steps()
        moved = _move_aside([self.step_dir(s) for s in steps if s > step], DIVERGED_SUFFIX)
        self.manager.reload()
        return moved, self.latest_step()

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


@contextlib.contextmanager
def _read_errors(step: int):
    """tensorstore's and orbax's read errors (bytes the decompressor or the index refuses) as Unreadable."""
    try:
        yield
    except errors.UserError:
        raise
    except (ValueError, OSError, KeyError) as e:
        raise Unreadable(f"step {step} could not be read ({_first_line(e)})") from None


def _check(step: int, reason: str | None) -> None:
    """Raise Unreadable with `reason`, agreed by every process (each reads only its own shards)."""
    if any_process(reason is not None):
        raise Unreadable(reason or f"step {step} failed its checks on another process")


def _json_mismatch(record: dict, restored) -> str | None:
    for item in (DATA, CONFIG):
        if integrity.json_checksum(restored[item]) != record.get(item):
            return f"{item}/metadata does not match the checksum written with it (its bytes changed after the save)"
    return None


def _tidy(directory: str) -> None:
    """Report once what does not belong in `directory`: dangling links named like a step are renamed
    `<step>.dangling` (orbax would count the step but could never write it again); other stray entries are left
    and skipped."""
    if jax.process_index() != 0 or not os.path.isdir(directory):  # process 0 alone: no barrier to agree on
        return
    dangling, stray = [], []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if _SET_ASIDE.fullmatch(name) or _ORBAX_TMP in name:
            continue  # set aside before, or a save cut short: orbax skips them
        if os.path.islink(path) and not os.path.exists(path):
            dangling.append(name)
        elif not name.isdigit():
            stray.append(name)
    moved = []
    for name in (n for n in dangling if n.isdigit()):
        moved.append(_free_name(os.path.join(directory, name), DANGLING_SUFFIX))
        os.rename(os.path.join(directory, name), moved[-1])
    if dangling or stray:
        log.warning("%s: %s", directory, "; ".join(
            ([f"dangling links {dangling} (to missing targets) skipped" + (
                f", renamed {[os.path.basename(m) for m in moved]}" if moved else "")] if dangling else [])
            + ([f"entries {stray} are not checkpoints, skipped"] if stray else [])))


def _free_name(path: str, suffix: str) -> str:
    """`<path><suffix>`, or `-2`, `-3`, ... after it when taken: nothing set aside before is replaced."""
    target, n = path + suffix, 1
    while os.path.lexists(target):
        n += 1
        target = f"{path}{suffix}-{n}"
    return target


def _move_aside(step_dirs: list[str], suffix: str) -> list[str]:
    """Rename step dirs to `<step><suffix>` (then <suffix>-2, ...): orbax ignores names that are not a step
    number. Process 0 renames, between barriers, so every process has looked at the same dirs first."""
    targets = [_free_name(d, suffix) for d in step_dirs]
    _barrier("neox_jax checkpoints checked")
    if jax.process_index() == 0:
        for d, target in zip(step_dirs, targets):
            os.rename(d, target)
    _barrier("neox_jax checkpoints moved")
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
