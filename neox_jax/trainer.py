"""The training loop: data -> compiled train step -> metrics, evaluation, checkpoints, preemption.

Kept apart from `train.py` (the pure, compiled step) because everything here is I/O and control flow.
Resume is exact: the data pipeline's batch n is a pure function of n, and the checkpoint holds the full train
state, the RNG and the pipeline position, so a run stopped at any step continues bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import os
import signal
import socket
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from neox_jax import checkpoint as ckpt_lib
from neox_jax import config as cfg
from neox_jax import energy as energy_lib
from neox_jax import errors
from neox_jax import metrics as metrics_lib
from neox_jax import fit, setup, sharding, weights
from neox_jax import train as train_lib
from neox_jax.data import default_paths
from neox_jax.data.dataset import make_train_iterator, make_val_batches, tokenizes_text, train_spec
from neox_jax.data.indexed import IndexedDataset
from neox_jax.data.tokenizer import check_vocab

log = logging.getLogger("neox_jax")


class NonFiniteError(errors.RunFailure):
    """Too many consecutive steps had a non-finite loss or gradient."""


class WorkdirBusyError(errors.RunFailure):
    """Another training run holds the workdir."""


@contextlib.contextmanager
def hold_workdir(workdir: str):
    """This process's exclusive hold on `workdir` for the length of a run: an flock on `workdir/.lock.<process
    index>` (the processes of one run lock different files, so it also works with several processes per host).
    The kernel releases it when the process ends, kill -9 included, so a dead run never leaves it stuck. A second
    run on the same workdir (which would interleave metrics.jsonl and race the checkpoints) stops at once with
    one WorkdirBusyError naming the holder, on every process (the verdicts are gathered)."""
    os.makedirs(workdir, exist_ok=True)
    f = open(os.path.join(workdir, f".lock.{jax.process_index()}"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder = None
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a process that has not written its name yet"
    if _any_process(holder is not None):
        f.close()
        holder = holder or "its lock file for another process of this run is held"
        raise WorkdirBusyError(f"workdir {workdir} is in use by another training run ({holder}); wait for it to "
                               "end, or give another --workdir")
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    try:
        yield
    finally:
        f.close()


@dataclasses.dataclass
class StopFlag:
    """Set by SIGTERM / SIGINT: the loop finishes the current step, saves and returns."""

    signal: int | None = None

    def __call__(self, signum, frame):
        self.signal = signum

    def install(self):
        previous = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}
        return lambda: [signal.signal(s, h) for s, h in previous.items()]


def _profile_window(spec: str) -> tuple[int, int] | None:
    if not spec:
        return None
    try:
        start, stop = (int(x) for x in spec.split(","))
    except ValueError:
        raise cfg.ConfigError(f"config field train.profile_steps: {spec!r} is not 'START,STOP' (e.g. '10,12')") from None
    if not 0 <= start < stop:
        raise cfg.ConfigError(f"config field train.profile_steps: need 0 <= START < STOP, got {spec!r}")
    return start, stop


def _check_tokenizer(config, model) -> None:
    """Refuse a tokenizer whose ids don't fit the padded embedding, when text is tokenized on the fly (pre-tokenized
    data is checked by its ids when it is opened: the default tokenizer has nothing to say about it)."""
    if tokenizes_text(config):
        check_vocab(config.data.tokenizer or default_paths()["tokenizer"], cfg.padded_vocab(model))


def evaluate(eval_step, params, val_batches, mesh) -> float:
    """Mean validation cross-entropy over the fixed validation batches."""
    total, count = 0.0, 0
    for batch in val_batches:
        out = eval_step(params, sharding.global_batch(batch, mesh))
        total += float(out["loss"]) * int(out["tokens"])
        count += int(out["tokens"])
    return total / max(count, 1)


def unigram_baseline(train_it, val_batches, vocab_size: int, max_tokens: int = 20_000_000) -> float:
    """Validation loss of the context-free unigram model fitted on the training data (the first `max_tokens` of
    each training dataset, mixed by its weight), on exactly the targets the validation loss is measured on."""
    train = [IndexedDataset(p).tokens[:max_tokens] for p in train_it.prefixes]
    targets = np.concatenate([np.asarray(b["tokens"])[:, 1:].ravel() for b in val_batches])
    return metrics_lib.unigram_cross_entropy(train, targets, vocab_size, weights=train_it.weights)


def describe_devices(mesh) -> str:
    """The start-up line: processes, devices and the mesh they form."""
    sizes = " x ".join(f"{a} {n}" for a, n in mesh.shape.items())
    d = jax.devices()[0]
    return (f"devices: {jax.device_count()} {d.platform} ({d.device_kind}) in {jax.process_count()} process(es); "
            f"mesh {sizes}")


def compile_and_check(run: setup.RunSetup, say):
    """The train step compiled ahead of time (the executable the loop calls), after its per-device peak was checked
    against the device's memory (`fit.check`; train.memory_check=false skips the check)."""
    t = run.config.train
    say(f"compiling the train step ({cfg.param_count(run.model_config) / 1e6:,.0f}M parameters, "
        f"{t.batch_size // t.micro_batches // sharding.batch_split(run.mesh)} sequences of {t.seq_len} per device "
        f"per micro-batch)...")
    start = time.perf_counter()
    step = train_lib.compile_train_step(run)
    took = f"compiled in {time.perf_counter() - start:.0f} s"
    if not t.memory_check:
        say(f"{took}; memory check off (train.memory_check=false)")
        return step
    line = fit.check(run, step.memory_analysis(), fit.device_bytes(t.device_memory_gb), say)
    say(f"{took}; {line}")
    return step


def _any_process(flag: bool) -> bool:
    """True on every process when it is true on one (a preemption signal may reach only some hosts)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def train(config, workdir: str, *, stop_after: int | None = None) -> dict:
    """Train `config` in `workdir`, resuming from its latest checkpoint. Returns the last logged metrics (plus
    "step" and, with a validation set, "unigram_val_loss").

    `stop_after` ends the run after that many steps of this invocation exactly as a preemption signal would
    (checkpoint saved, return): for time-sliced sessions that continue later in the same workdir.
    """
    cfg.validate(config)
    t = config.train
    mesh = sharding.make_mesh(config)
    run = setup.build(config, mesh)  # the model, optimizer and placement, derived once for the whole run
    config, model = run.config, run.model_config
    is_main = jax.process_index() == 0
    _check_tokenizer(config, model)
    profile = _profile_window(t.profile_steps)
    say = (lambda msg: print(msg, flush=True)) if is_main else (lambda msg: None)
    say(describe_devices(mesh))
    train_spec(config)  # no data named: one line before anything is written

    last: dict = {}
    with contextlib.ExitStack() as cleanup:  # closed in reverse: signals, checkpoint saves, data, writers, lock
        cleanup.enter_context(hold_workdir(workdir))
        step_fn = compile_and_check(run, say)  # before anything else is written or allocated
        writers = metrics_lib.Writers(workdir, enabled=is_main, wandb_project=t.wandb_project,
                                      run_config=config.to_dict())
        cleanup.callback(writers.close)
        energy = energy_lib.RunEnergy(config, workdir, is_main)  # metering starts here, compilation included
        cleanup.callback(energy.close)
        train_it = make_train_iterator(config)
        cleanup.callback(train_it.close)
        val_batches = make_val_batches(config) if t.eval_every else None
        checkpointer = ckpt_lib.Checkpointer(workdir, keep=t.keep_checkpoints, keep_every=t.keep_every)
        cleanup.callback(checkpointer.close)
        stop = StopFlag()
        cleanup.callback(stop.install())
        if val_batches is not None and is_main:
            last["unigram_val_loss"] = unigram_baseline(train_it, val_batches, model.vocab_size)
            say(f"unigram baseline: val_loss {last['unigram_val_loss']:.4f} (context-free token frequencies "
                "of the training data)")
        # a global (replicated) key: orbax cannot save one process's single-device array in a multi-process run
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        rng = jax.jit(jax.random.PRNGKey, static_argnums=0, out_shardings=replicated)(t.seed)
        if checkpointer.latest_step() is not None:
            abstract = {"train": train_lib.state_shapes(run),
                        "rng": jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=replicated)}
            restored, data_state, _ = checkpointer.restore(abstract, move_aside=True)
            state, rng = restored["train"], restored["rng"]
            train_it.set_state(data_state)
            say(f"resumed from {checkpointer.directory} at step {int(state.step)}")
        else:
            params = weights.params_for(model, t.init_from) if t.init_from else None
            state = train_lib.init_train_state(run, rng, params)
            if params is not None:
                say(f"initialised params from {t.init_from} (fresh optimizer state, step 0)")
            del params
        eval_fn = train_lib.make_eval_step(run) if val_batches is not None else None
        if is_main:
            with open(f"{workdir}/config.json", "w") as f:
                f.write(config.to_json(indent=1))
        flops_token = metrics_lib.flops_per_token(model, t.seq_len, tensor_parallel=config.mesh.tensor)
        peak = metrics_lib.device_peak_tflops(override=t.peak_tflops)

        def save(step: int):
            checkpointer.save(step, {"train": state, "rng": rng}, train_it.get_state(), json.loads(config.to_json()),
                              force=True)

        step = start_step = int(state.step)
        if step >= t.steps:
            say(f"nothing to do: {workdir} is already at step {step} (train.steps={t.steps}); "
                "raise --config.train.steps to train further")
        window = {"loss": [], "t0": time.perf_counter(), "steps": 0, "paused": 0.0}
        pending = None  # metrics of the previous step, read while the current one runs

        def outside_steps(fn):
            """fn() (an evaluation, a checkpoint save) with its time kept out of the window's throughput: the
            step it follows is finished first, so none of the step's own time is taken out."""
            jax.block_until_ready(step_metrics)
            start = time.perf_counter()
            try:
                return fn()
            finally:
                window["paused"] += time.perf_counter() - start

        tracing = False
        while step < t.steps:
            if profile and step == profile[0]:
                jax.profiler.start_trace(f"{workdir}/profile")
                tracing = True
            batch = sharding.global_batch(next(train_it), mesh)
            state, step_metrics = step_fn(state, batch)
            step += 1
            if pending is not None:
                last = _consume(pending, window, t, writers, flops_token, peak, last, energy)
            pending = (step, step_metrics)
            if tracing and step == profile[1]:
                jax.block_until_ready(step_metrics)
                jax.profiler.stop_trace()
                tracing = False
                say(f"profile of steps {profile[0]}..{profile[1]} written to {workdir}/profile")
            if eval_fn is not None and step % t.eval_every == 0:
                val_loss = outside_steps(lambda: evaluate(eval_fn, state.params, val_batches, mesh))
                writers.write(step, {"loss": val_loss, "ppl": math.exp(min(val_loss, 50))}, prefix="val")
                last["val_loss"] = val_loss
                say(f"step {step:>6}/{t.steps} | val_loss {val_loss:.4f} | val_ppl {math.exp(min(val_loss, 50)):.2f}")
            preempted = _any_process(stop.signal is not None) or (
                stop_after is not None and step - start_step >= stop_after)
            if step % t.checkpoint_every == 0 or step == t.steps or preempted:
                outside_steps(lambda: save(step))
            if preempted:
                why = f"signal {signal.Signals(stop.signal).name}" if stop.signal else f"stop_after={stop_after}"
                say(f"stopping at step {step} ({why}); checkpoint saved in {checkpointer.directory}")
                break
        if pending is not None:
            energy.stop()  # the final reading, so that the last line's totals are the sum of all windows
            last = _consume(pending, window, t, writers, flops_token, peak, last, energy, force_log=True)
            if energy.enabled:
                say(energy.summary())
        if tracing:
            jax.profiler.stop_trace()
    if is_main:
        plot = metrics_lib.plot_run(workdir)
        if plot:
            say(f"plot: {plot}")
    last["step"] = step
    return last


def _consume(pending, window, t, writers, flops_token, peak, last, energy, force_log: bool = False) -> dict:
    """Read one finished step's metrics; every log_every steps write a line (loss averaged over the window, energy
    used in it)."""
    step, m = pending
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    if m["nonfinite_in_a_row"] >= t.max_nonfinite_in_a_row:
        raise NonFiniteError(
            f"step {step}: {int(m['nonfinite_in_a_row'])} steps in a row had a non-finite loss or gradient "
            f"(limit train.max_nonfinite_in_a_row={t.max_nonfinite_in_a_row}); the updates were skipped and the last "
            "checkpoint is intact. Lower optimizer.lr, check the data, or use precision.loss_scale=dynamic for fp16.")
    if not m["skipped"]:
        window["loss"].append(m["loss"])
    if window.get("warm"):
        window["steps"] += 1
    else:  # the first step includes compilation: time throughput from its end
        window.update(warm=True, t0=time.perf_counter(), paused=0.0)
    if step % t.log_every and not force_log:
        return last
    elapsed = time.perf_counter() - window["t0"] - window["paused"]  # evaluation and saves are not training
    timed = window["steps"]
    tokens_per_s = timed * t.batch_size * t.seq_len / max(elapsed, 1e-9) if timed else None
    loss = float(np.mean(window["loss"])) if window["loss"] else float("nan")
    n_dev = jax.device_count()
    out = {"loss": loss, "ppl": math.exp(min(loss, 50)) if math.isfinite(loss) else float("nan"),
           "lr": m["lr"], "grad_norm": m["grad_norm"], "tokens_per_s": tokens_per_s,
           "step_time": elapsed / timed if timed else None, "loss_scale": m["loss_scale"],
           "skipped_steps": m["skipped_steps"],
           "mfu": metrics_lib.mfu(tokens_per_s, flops_token, n_dev, peak) if timed else None, **energy.window()}
    writers.write(step, out)
    if writers.enabled:
        print(metrics_lib.format_line(step, t.steps, out), flush=True)
    window.update(loss=[], t0=time.perf_counter(), steps=0, paused=0.0)
    return {**last, **out}
