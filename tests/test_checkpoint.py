"""The orbax Checkpointer on small pytrees: retention, async saves, leftovers of a crashed save, resharding on
restore, and the shape-mismatch error. (Whole training runs are in test_trainer.py.)"""

import asyncio
import gc
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from neox_jax import checkpoint as ckpt


def _state(step, sharding=None):
    params = {"w": jnp.arange(32.0).reshape(8, 4) + step, "b": jnp.full((4,), float(step))}
    if sharding is not None:
        params = jax.device_put(params, {"w": sharding, "b": NamedSharding(sharding.mesh, P())})
    return {"train": {"params": params, "step": jnp.asarray(step, jnp.int32)}}


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _save_steps(workdir, steps, **kw):
    c = ckpt.Checkpointer(str(workdir), **kw)
    for s in steps:
        c.save(s, _state(s), {"samples": s * 8}, {"train": {"steps": 100}})
    c.close()


def test_keep_last_k_plus_every_m(tmp_path):
    _save_steps(tmp_path, range(1, 12), keep=2, keep_every=4)
    assert ckpt.Checkpointer(str(tmp_path)).all_steps() == [4, 8, 10, 11]


def test_async_save_restores_state_data_and_config(tmp_path):
    c = ckpt.Checkpointer(str(tmp_path), async_save=True)
    state = _state(7)
    assert c.save(7, state, {"samples": 56}, {"train": {"steps": 100}})
    c.wait()
    restored, data, config = c.restore(_abstract(state))
    c.close()
    np.testing.assert_array_equal(restored["train"]["params"]["w"], state["train"]["params"]["w"])
    assert int(restored["train"]["step"]) == 7
    assert data == {"samples": 56} and config == {"train": {"steps": 100}}


def test_leftover_of_a_crashed_save_is_ignored(tmp_path):
    _save_steps(tmp_path, [3])
    # what a process killed in the middle of writing step 6 leaves behind
    partial = os.path.join(ckpt.checkpoint_dir(str(tmp_path)), "6.orbax-checkpoint-tmp-1712345678")
    os.makedirs(os.path.join(partial, "state"))
    open(os.path.join(partial, "state", "junk"), "wb").write(b"\0" * 10)
    c = ckpt.Checkpointer(str(tmp_path))
    assert c.latest_step() == 3
    restored, data, _ = c.restore(_abstract(_state(0)))
    c.close()
    assert int(restored["train"]["step"]) == 3 and data == {"samples": 24}


def test_restore_onto_another_mesh(tmp_path):
    devices = np.array(jax.devices())
    saved_on = NamedSharding(jax.sharding.Mesh(devices.reshape(8, 1), ("data", "tensor")), P("data", None))
    c = ckpt.Checkpointer(str(tmp_path))
    state = _state(2, saved_on)
    c.save(2, state, {}, {})
    c.wait()
    target = NamedSharding(jax.sharding.Mesh(devices[:4].reshape(2, 2), ("data", "tensor")), P("tensor", "data"))
    restored, _, _ = c.restore(_abstract(_state(0, target)))
    c.close()
    w = restored["train"]["params"]["w"]
    assert w.sharding == target
    np.testing.assert_array_equal(w, np.asarray(state["train"]["params"]["w"]))


def test_one_process_saves_replicated_arrays_whole(tmp_path, caplog):
    """orbax's replica-parallel saving cuts a replicated array into one slice per device so that hosts share its
    writing, each slice a compile of its own; in one process every replica is here, so nothing is sliced."""
    replicated = NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("data",)), P())
    state = _state(3, replicated)
    c = ckpt.Checkpointer(str(tmp_path))
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        c.save(3, state, {}, {})
        c.wait()
    c.close()
    compiled = [r.getMessage() for r in caplog.records if "Finished XLA compilation" in r.getMessage()]
    assert not [m for m in compiled if "jit(slice)" in m], compiled
    c = ckpt.Checkpointer(str(tmp_path))
    restored, _, _ = c.restore(_abstract(state))
    c.close()
    np.testing.assert_array_equal(restored["train"]["params"]["w"], state["train"]["params"]["w"])


def test_futures_of_an_abandoned_orbax_write_log_no_traceback(tmp_path, caplog):
    """After a failed save, asyncio may collect orbax's gathered writes later and log "exception was never
    retrieved" with a traceback through orbax but no orbax name in the message, or for a write tensorstore failed
    with no traceback but the save's temporary folder in its message (each seen in CI, after the disk-full run's one
    line); the save's own error already said it. asyncio's other errors still log."""
    ckpt.Checkpointer(str(tmp_path)).close()
    in_orbax = os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "serialization.py")
    writes = {}
    for where in (in_orbax, "mine.py"):
        scope = {}
        exec(compile("async def write():\n    raise ValueError('No space left on device')\n", where, "exec"), scope)
        writes[where] = scope["write"]

    async def abandon(write):
        asyncio.gather(write())  # a gathered write nobody awaits, as an abandoned save leaves it
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    logged = {}
    for where, write in writes.items():
        caplog.clear()
        with caplog.at_level("ERROR", logger="asyncio"):
            asyncio.run(abandon(write))
            gc.collect()
        logged[where] = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert logged[in_orbax] == []
    assert ["exception was never retrieved" in m for m in logged["mine.py"]] == [True]

    async def failed_write(where):  # a future tensorstore failed from C++: no Python frames, only the path
        asyncio.get_running_loop().create_future().set_exception(
            ValueError(f'RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "{where}/": '
                       "No space left on device"))
        await asyncio.sleep(0)

    for where, expected in ((f"{tmp_path}/6.orbax-checkpoint-tmp/state", 0), (f"{tmp_path}/elsewhere", 1)):
        caplog.clear()
        with caplog.at_level("ERROR", logger="asyncio"):
            asyncio.run(failed_write(where))
            gc.collect()
        assert len([r for r in caplog.records if "exception was never retrieved" in r.getMessage()]) == expected


def test_shape_mismatch_names_the_first_parameter(tmp_path):
    _save_steps(tmp_path, [1])
    other = _state(0)
    other["train"]["params"]["w"] = jnp.zeros((8, 5))
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"train/params/w has shape \(8, 4\) but the config "
                                                           r"expects \(8, 5\)"):
        ckpt.Checkpointer(str(tmp_path)).restore(_abstract(other))
    extra = _state(0)
    extra["train"]["params"]["gate"] = jnp.zeros((4,))
    with pytest.raises(ckpt.CheckpointMismatchError, match="has no array train/params/gate"):
        ckpt.Checkpointer(str(tmp_path)).restore(_abstract(extra))


def test_missing_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.Checkpointer(str(tmp_path)).restore(_abstract(_state(0)))
