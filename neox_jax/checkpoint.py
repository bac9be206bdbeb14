"""Checkpoints: an orbax CheckpointManager holding the train state, the data-iterator state and the config.

Layout: `<workdir>/checkpoints/<step>/{state,data,config}`. `state` is any pytree of jax arrays (the TrainState
plus the RNG key); it is restored onto whatever shardings the caller's abstract target carries, so a run can
resume on another mesh or device count (orbax reshards). `data` is the pipeline's small JSON state, keyed by global
position, so it is valid for any process count. Saves are asynchronous and atomic (orbax writes to a temporary
`<step>.orbax-checkpoint-tmp*` directory and renames it when complete): a crash mid-save leaves the previous
checkpoint as the latest, and the leftover temporary directory is ignored.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from neox_jax import config as cfg
from neox_jax import errors

STATE, DATA, CONFIG = "state", "data", "config"


class CheckpointMismatchError(errors.RunFailure, ValueError):
    """A checkpoint's arrays don't have the shapes the current config expects."""


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

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, config: dict, force: bool = False) -> bool:
        """Start an async save of step `step`; returns whether one was started."""
        args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state), DATA: ocp.args.JsonSave(data_state),
                                     CONFIG: ocp.args.JsonSave(config)})
        return self.manager.save(step, args=args, force=force)

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self.manager.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} (have {self.all_steps()})")
        return step

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, dict]:
        """Restore (state, data_state, config) of `step` (default: latest) onto the shardings of `abstract_state`."""
        step = self._step(step)
        check_shapes(self.stored_shapes(step), abstract_state, f"{self.directory}/{step}")
        restored = self.manager.restore(step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(abstract_state), DATA: ocp.args.JsonRestore(),
            CONFIG: ocp.args.JsonRestore()}))
        return restored[STATE], restored[DATA], restored[CONFIG]

    def restore_config(self, step: int | None = None) -> dict:
        step = self._step(step)
        return self.manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]

    def stored_metadata(self, step: int) -> Any:
        """The state item's tree of orbax ArrayMetadata (shape, dtype) as stored."""
        meta = self.manager.item_metadata(step)[STATE]
        return getattr(meta, "tree", meta)

    def stored_shapes(self, step: int) -> dict[str, tuple]:
        return {path_name(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(
            self.stored_metadata(step), is_leaf=lambda m: hasattr(m, "shape"))}

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def path_name(path) -> str:
    """'train/params/layers/mlp/dense_h_to_4h/kernel': one spelling for dict keys, attributes and indices, so a
    stored tree (all dicts) and a live one (dataclasses, named tuples) name their leaves alike."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


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


def load_params(workdir: str, step: int | None = None) -> tuple[Any, dict]:
    """(run config, params as host numpy arrays) of a training workdir's latest (or `step`) checkpoint.

    Only the weights are read (not the optimizer's moments): the fp32 master of a run with
    precision.mode=master_weights (its 16-bit params are that master's cast), else the params. The config's
    model.padded_vocab_size is pinned to the stored embedding, so `config.model` rebuilds exactly these shapes on
    any mesh.
    """
    if not os.path.isdir(checkpoint_dir(workdir)):
        raise FileNotFoundError(f"{workdir}: no checkpoints/ folder; expected a training workdir")
    ckpt = Checkpointer(workdir, async_save=False, create=False)
    try:
        step = ckpt._step(step)
        config = cfg.from_saved(ckpt.restore_config(step), f"{ckpt.directory}/{step}/config")
        stored = ckpt.stored_metadata(step)["train"]
        weights = "master" if stored.get("master") else "params"
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), stored[weights],
                                is_leaf=lambda m: hasattr(m, "shape"))
        restored = ocp.PyTreeCheckpointer().restore(
            os.path.join(ckpt.directory, str(step), STATE),
            args=ocp.args.PyTreeRestore(item={"train": {weights: stored[weights]}},
                                        restore_args={"train": {weights: as_numpy}}, partial_restore=True))
    finally:
        ckpt.close()
    params = restored["train"][weights]
    config.model.padded_vocab_size = int(np.shape(params["embed_in"])[0])
    return config, params
