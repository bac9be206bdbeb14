"""What a checkpoint's integrity record costs: a whole save by the Checkpointer (arrays, JSON items and the checksum
of every array, to the commit) against the same arrays saved by orbax alone, on a real train state (default:
pythia-160m, fp32 params and AdamW moments, ~2.3 GB)."""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time

import jax
import orbax.checkpoint as ocp

from neox_jax import checkpoint, integrity, setup, sharding, table
from neox_jax import config as cfg
from neox_jax import train as train_lib


def _state(config_spec: str, overrides: dict):
    # the batch only shapes the step, not the state: the smallest the mesh divides
    config = cfg.from_spec(config_spec, {"train.seq_len": 128, "train.batch_size": jax.device_count(), **overrides})
    run = setup.build(config, sharding.make_mesh(config))
    rng = jax.random.PRNGKey(0)
    return {"train": train_lib.init_train_state(run, rng), "rng": rng}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(config_spec: str, overrides: dict, repeats: int, directory: str = "") -> list[dict]:
    """One row: the state's size; the median time of a save to its commit by orbax alone (the arrays, nothing
    else) and by the Checkpointer (the arrays, the JSON items and the integrity record, whose checksums run on
    the devices while orbax writes), in ABBA order over `repeats` pairs after one warm-up pair (the disk's
    write-back makes single saves vary several-fold); what the checksums take when waited for on their own; and
    the Checkpointer's extra share of the save."""
    state = _state(config_spec, overrides)
    jax.block_until_ready(state)
    size = sum(x.nbytes for x in jax.tree.leaves(state))
    work = tempfile.mkdtemp(prefix="neox-ckpt-bench-", dir=directory or None)
    plain, ours, sums = [], [], []
    try:
        saver, bare = checkpoint.Checkpointer(work, keep=0), ocp.StandardCheckpointer()
        for i in range(repeats + 1):
            def save_ours():
                saver.save(i, state, {"samples": i}, {"config": config_spec})
                saver.wait()

            def save_plain():
                bare.save(f"{work}/plain-{i}", state)
                bare.wait_until_finished()

            # ABBA: the second of a pair writes while the kernel flushes the first's pages
            first, second = (save_plain, save_ours) if i % 2 else (save_ours, save_plain)
            t_first, t_second = _timed(first), _timed(second)
            times = (t_first, t_second) if i % 2 else (t_second, t_first)
            sums.append(_timed(lambda: integrity.array_checksums(state)))
            shutil.rmtree(f"{work}/plain-{i}")  # deletions outside the timings (rotation is off: keep=0)
            shutil.rmtree(saver.step_dir(i))
            saver.manager.reload()
            if i:  # the first pair is the warm-up: compilation, the first write's allocations
                plain.append(times[0])
                ours.append(times[1])
        saver.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sums = sums[1:]
    plain_s, ours_s = statistics.median(plain), statistics.median(ours)
    return [{"config": config_spec, "state_gb": size / 1e9, "orbax_s": plain_s, "checkpointer_s": ours_s,
             "extra": ours_s / plain_s - 1, "checksums_alone_s": statistics.median(sums), "repeats": repeats}]


COLUMNS = [table.Column("config", "config", align="<"), table.Column("state GB", "state_gb", ".2f"),
           table.Column("orbax save s", "orbax_s", ".2f"), table.Column("Checkpointer save s", "checkpointer_s", ".2f"),
           table.Column("extra", "extra", "+.1%"), table.Column("checksums alone s", "checksums_alone_s", ".2f")]


def format_rows(rows: list[dict]) -> str:
    return table.render(COLUMNS, rows)
