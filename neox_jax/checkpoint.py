"""Checkpoints: an orbax CheckpointManager holding the train state, the data-iterator state and the config.

Layout: `<workdir>/checkpoints/<step>/{state,data,config}`. `state` is any pytree of jax arrays (the TrainState
plus the RNG key); it is restored onto whatever shardings the caller's abstract target carries, so a run can
resume on another mesh or device count (orbax reshards). `data` is the pipeline's small JSON state, keyed by global
position, so it is valid for any process count. Saves are asynchronous and atomic (orbax writes to a temporary
directory and renames it when complete): a crash mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """A checkpoint's arrays don't have the shapes the current config expects."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 3, keep_every: int = 0, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep or None,
            keep_period=keep_every or None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.directory = checkpoint_dir(workdir)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, config: dict, force: bool = False) -> bool:
        """Start an async save of step `step`; returns whether one was started."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), config=ocp.args.JsonSave(config)
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, dict]:
        """Restore (state, data_state, config) of `step` (default: latest) onto the shardings of `abstract_state`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        check_shapes(self.stored_shapes(step), abstract_state, f"{self.directory}/{step}")
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["data"], restored["config"]

    def restore_config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def stored_shapes(self, step: int) -> Any:
        meta = self.manager.item_metadata(step)["state"]
        tree = getattr(meta, "tree", meta)
        return jax.tree.map(lambda m: tuple(m.shape), tree, is_leaf=lambda m: hasattr(m, "shape"))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_shapes(stored: Any, target: Any, where: str) -> None:
    """Raise CheckpointMismatchError naming the first parameter whose stored shape differs from the target's."""
    flat_stored = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(
        stored, is_leaf=lambda s: isinstance(s, tuple))}
    for path, leaf in jax.tree_util.tree_leaves_with_path(target):
        key = jax.tree_util.keystr(path)
        want = tuple(np.shape(leaf))
        if key not in flat_stored:
            raise CheckpointMismatchError(f"checkpoint {where} has no array {key} (expected shape {want}); "
                                          "was it written by another model or optimizer config?")
        if tuple(flat_stored[key]) != want:
            raise CheckpointMismatchError(
                f"checkpoint {where}: {key} has shape {tuple(flat_stored[key])} but the config expects {want}; "
                "the checkpoint was written for a different model config")
