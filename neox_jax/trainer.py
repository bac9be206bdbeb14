"""The training loop: data -> compiled train step -> metrics, evaluation, checkpoints, preemption.

Kept apart from `train.py` (the pure, compiled step) because everything here is I/O and control flow.
Resume is exact: the data pipeline's batch n is a pure function of n, and the checkpoint holds the full train
state, the RNG and the pipeline position, so a run stopped at any step continues bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from typing import Any, Callable

import jax
import numpy as np

from neox_jax import checkpoint as ckpt_lib
from neox_jax import config as cfg
from neox_jax import energy as energy_lib
from neox_jax import errors
from neox_jax import metrics as metrics_lib
from neox_jax import fit, goodput, setup, sharding, weights
from neox_jax import train as train_lib
from neox_jax import workdir as workdir_lib
from neox_jax.data import default_paths
from neox_jax.data.dataset import make_train_iterator, make_val_batches, tokenizes_text, train_spec
from neox_jax.data.indexed import IndexedDataset
from neox_jax.data.tokenizer import check_vocab


class NonFiniteError(errors.RunFailure):
    """Too many consecutive steps had a non-finite loss or gradient, from `first_bad_step` on."""

    def __init__(self, message: str, first_bad_step: int | None = None):
        super().__init__(message)
        self.first_bad_step = first_bad_step


def check_tokenizer(config, model) -> None:
    """Refuse a tokenizer whose ids don't fit the padded embedding, when text is tokenized on the fly (pre-tokenized
    data is checked by its ids when it is opened: the default tokenizer has nothing to say about it)."""
    if tokenizes_text(config):
        check_vocab(config.data.tokenizer or default_paths()["tokenizer"], cfg.padded_vocab(model))


def validation_loss(eval_step, params, val_batches, mesh) -> float:
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


def train(config, workdir: str, *, stop_after: int | None = None, stop: workdir_lib.StopFlag | None = None,
          started: float | None = None, task_eval: Callable | None = None) -> dict:
    """Train `config` in `workdir`, resuming from its latest checkpoint. Returns the last logged metrics (plus
    "step" and, with a validation set, "unigram_val_loss") and the goodput record of the workdir.

    `stop_after` ends the run after that many steps of this invocation exactly as a preemption signal would
    (checkpoint saved, return): for time-sliced sessions that continue later in the same workdir. `stop`: a flag
    the caller installed before start-up (scripts/train.py), so that a signal during start-up is not lost.
    `started`: when this attempt began, in epoch seconds (scripts/train.py passes its process's start), for the
    goodput record; default now. `task_eval`: what scores train.eval_tasks, `neox_jax.evaluate.LoopEvaluator(config)`
    (lm-eval is optional, so scripts/train.py builds it); called with (model config, params, mesh) every
    train.eval_tasks_every steps.
    """
    clock = goodput.Clock(started)  # every second of this attempt, charged to one category
    cfg.validate(config)
    if config.train.eval_tasks and task_eval is None:
        raise cfg.ConfigError("config field train.eval_tasks: the tasks are scored by lm-eval, which scripts/train.py "
                              "loads for them; from Python pass trainer.train(..., "
                              "task_eval=neox_jax.evaluate.LoopEvaluator(config))")
    run = setup.build(config, sharding.make_mesh(config))  # the model, optimizer and placement, derived once
    is_main = jax.process_index() == 0
    check_tokenizer(run.config, run.model_config)
    say = (lambda msg: print(msg, flush=True)) if is_main else (lambda msg: None)
    say(describe_devices(run.mesh))
    train_spec(run.config)  # no data named: one line before anything is written
    with contextlib.ExitStack() as cleanup:  # closed in reverse: signals, checkpoint saves, data, writers, lock
        loop = _open_workdir(run, workdir, clock, cleanup, say, stop or workdir_lib.StopFlag())
        loop.task_eval = task_eval
        loop.state, loop.rng = _restore_or_init(run, loop, say)
        if is_main:
            workdir_lib.write_config(workdir, run.config)
        try:
            step = _run_steps(run, loop, stop_after, say)
        except NonFiniteError as e:
            if e.first_bad_step is None:
                raise
            raise NonFiniteError(f"{e} {_roll_back(loop.checkpointer, e.first_bad_step)}", e.first_bad_step) from None
        _finish(loop, step, say)
    return {**loop.log.last, "step": step}


@dataclasses.dataclass
class _Loop:
    """What the loop runs with, open in the workdir for the length of the run; `state` and `rng` are the train
    state and key it carries from step to step (held here alone, so that each step's input can be freed)."""

    workdir: str
    step_fn: Any  # the compiled train step
    eval_fn: Any  # the jitted eval step; None without a validation set
    train_it: Any
    val_batches: list | None
    checkpointer: ckpt_lib.Checkpointer
    stop: workdir_lib.StopFlag
    log: StepLog
    state: Any = None
    rng: Any = None
    task_eval: Callable | None = None  # scores train.eval_tasks


def _open_workdir(run: setup.RunSetup, workdir: str, clock: goodput.Clock, cleanup: contextlib.ExitStack,
                  say, stop: workdir_lib.StopFlag) -> _Loop:
    """Hold `workdir`, compile the step, then open what the loop reads and writes, each closed by `cleanup`."""
    config, t = run.config, run.config.train
    is_main = jax.process_index() == 0
    cleanup.enter_context(workdir_lib.hold_workdir(workdir))
    jax.monitoring.register_event_time_span_listener(clock.on_span)  # compilations anywhere count as compile
    cleanup.callback(jax.monitoring.unregister_event_time_span_listener, clock.on_span)
    with clock.charged("compile"):
        step_fn = compile_and_check(run, say)  # before anything else is written or allocated
    writers = metrics_lib.Writers(workdir, enabled=is_main, wandb_project=t.wandb_project,
                                  run_config=config.to_dict())
    cleanup.callback(writers.close)
    energy = energy_lib.RunEnergy(config, workdir, is_main)  # metering starts here, compilation included
    cleanup.callback(energy.close)
    train_it = make_train_iterator(config)
    cleanup.callback(train_it.close)
    val_batches = make_val_batches(config) if t.eval_every else None
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=t.keep_checkpoints, keep_every=t.keep_every,
                                         keep_steps=cfg.checkpoint_schedule(t.checkpoint_steps, t.steps))
    cleanup.callback(checkpointer.close)
    cleanup.callback(stop.install())
    log = StepLog(run, writers, energy, say, clock)
    if val_batches is not None and is_main:
        log.last["unigram_val_loss"] = unigram_baseline(train_it, val_batches, run.model_config.vocab_size)
        say(f"unigram baseline: val_loss {log.last['unigram_val_loss']:.4f} (context-free token frequencies "
            "of the training data)")
    eval_fn = train_lib.make_eval_step(run) if val_batches is not None else None
    return _Loop(workdir, step_fn, eval_fn, train_it, val_batches, checkpointer, stop, log)


def _restore_or_init(run: setup.RunSetup, loop: _Loop, say):
    """(train state, RNG key): the latest checkpoint's, the data pipeline put back at its position; else a fresh
    state, its params from train.init_from when that is set."""
    t = run.config.train
    # a global (replicated) key: orbax cannot save one process's single-device array in a multi-process run
    replicated = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())
    rng = jax.jit(jax.random.PRNGKey, static_argnums=0, out_shardings=replicated)(t.seed)
    if loop.checkpointer.latest_step() is not None:
        abstract = {"train": train_lib.state_shapes(run),
                    "rng": jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=replicated)}
        restored, data_state, _ = loop.checkpointer.restore(abstract, move_aside=True)
        loop.train_it.set_state(data_state, allow_changed_data=run.config.data.allow_changed_data)
        say(f"resumed from {loop.checkpointer.directory} at step {int(restored['train'].step)}")
        return restored["train"], restored["rng"]
    params = weights.params_for(run.model_config, t.init_from) if t.init_from else None
    state = train_lib.init_train_state(run, rng, params)
    if params is not None:
        say(f"initialised params from {t.init_from} (fresh optimizer state, step 0)")
    return state, rng


def _run_steps(run: setup.RunSetup, loop: _Loop, stop_after: int | None, say) -> int:
    """Train up to train.steps, evaluating and saving on their schedules; a stop signal or `stop_after` ends it
    early, saved. Returns the step reached."""
    t = run.config.train
    step = start_step = int(loop.state.step)
    loop.log.begin(step)
    if step >= t.steps:
        say(f"nothing to do: {loop.workdir} is already at step {step} (train.steps={t.steps}); "
            "raise --config.train.steps to train further")
    trace = _Trace(cfg.profile_window(t.profile_steps), f"{loop.workdir}/profile", say)
    scheduled = set(cfg.checkpoint_schedule(t.checkpoint_steps, t.steps))
    if step == 0 and 0 in scheduled and loop.checkpointer.latest_step() is None:  # the initial weights
        _save(run, loop, 0, skipped_steps=0)
    while step < t.steps:
        trace.before(step)
        with loop.log.clock.charged("data"):
            batch = sharding.global_batch(next(loop.train_it), run.mesh)
        loop.state, step_metrics = loop.step_fn(loop.state, batch)
        step += 1
        loop.log.add(step, step_metrics)
        trace.after(step, step_metrics)
        if loop.eval_fn is not None and step % t.eval_every == 0:
            with loop.log.paused("eval"):
                val_loss = validation_loss(loop.eval_fn, loop.state.params, loop.val_batches, run.mesh)
            loop.log.validation(step, val_loss)
        if loop.task_eval is not None and step % t.eval_tasks_every == 0:
            with loop.log.paused("eval"):
                found = loop.task_eval(run.model_config, loop.state.params, run.mesh)
            loop.log.task_scores(step, found)
        preempted = workdir_lib.any_process(loop.stop.signal is not None) or (
            stop_after is not None and step - start_step >= stop_after)
        if step % t.checkpoint_every == 0 or step in scheduled or step == t.steps or preempted:
            _save(run, loop, step, int(jax.device_get(step_metrics["skipped_steps"])))
        if preempted:
            why = f"signal {signal.Signals(loop.stop.signal).name}" if loop.stop.signal else f"stop_after={stop_after}"
            say(f"stopping at step {step} ({why}); checkpoint saved in {loop.checkpointer.directory}")
            break
    loop.log.flush()
    trace.close()
    return step


TASKS_SPLIT = "tasks"  # metrics.jsonl's split of train.eval_tasks' scores


def format_scores(found: dict[str, float]) -> str:
    """{"piqa/acc": .., "piqa/acc_stderr": ..} -> "piqa acc 0.5234 +- 0.0201, ..." (stderrs beside their metric)."""
    return ", ".join(f"{k.replace('/', ' ')} {v:.4f}" + (f" +- {found[k + '_stderr']:.4f}"
                                                         if isinstance(found.get(k + "_stderr"), float) else "")
                     for k, v in found.items() if not k.endswith("_stderr"))


def _save(run: setup.RunSetup, loop: _Loop, step: int, skipped_steps: int) -> None:
    with loop.log.paused("checkpoint"):
        loop.checkpointer.save(step, {"train": loop.state, "rng": loop.rng}, loop.train_it.get_state(),
                               json.loads(run.config.to_json()), force=True, skipped_steps=skipped_steps)


def _finish(loop: _Loop, step: int, say) -> None:
    """The attempt's end: the last save completed, the loss plot redrawn, then the attempt's last goodput record."""
    with loop.log.clock.charged("checkpoint"):
        loop.checkpointer.wait()
    loop.log.clock.switch("other")
    if jax.process_index() == 0:
        _plot(loop.workdir, say)
    loop.log.record_goodput(step)


def _roll_back(checkpointer: ckpt_lib.Checkpointer, first_bad_step: int) -> str:
    """After a divergence, set aside the checkpoints whose weights led into it (the step saved just before the
    first bad step computed that step's loss) so that rerunning, with a lower learning rate say, starts from
    before it; what was done, as the second half of the error line."""
    moved, step = checkpointer.set_aside_after(first_bad_step - 2)
    where = (f"rerunning resumes from step {step}, the newest checkpoint from before the streak" if step is not None
             else "no checkpoint was saved before the streak: rerunning starts afresh")
    aside = f" (the ones after it are kept as {', '.join(os.path.basename(m) for m in moved)})" if moved else ""
    return (f"{where}{aside}. Lower optimizer.lr, check the data, or use precision.loss_scale=dynamic for fp16, "
            "then run the same command again.")


def _plot(workdir: str, say) -> None:
    plot = metrics_lib.plot_run(workdir)
    if plot:
        say(f"plot: {plot}")


class StepLog:
    """The loop's metrics. Each step's are read one step late (the read then never waits for the step running),
    and every train.log_every steps one line is written over the window of steps since the last: the mean loss,
    throughput, MFU and energy, then the goodput record. Evaluations and saves run `with log.paused(category):`,
    kept out of the throughput and charged to their goodput category on `clock`."""

    def __init__(self, run: setup.RunSetup, writers: metrics_lib.Writers, energy: energy_lib.RunEnergy, say,
                 clock: goodput.Clock):
        self.t, self.writers, self.energy, self.say, self.clock = run.config.train, writers, energy, say, clock
        self.flops_token = metrics_lib.flops_per_token(run.model_config, self.t.seq_len,
                                                       tensor_parallel=run.config.mesh.tensor)
        self.peak = metrics_lib.device_peak_tflops(override=self.t.peak_tflops)
        self.last: dict = {}  # the latest line's metrics, the latest val_loss and the unigram baseline
        self._pending = None  # (step, metrics) of the step dispatched last, read once the next one is dispatched
        self._warm = False  # the first step includes compilation: throughput is timed from its end
        self._carried, self._start_step = None, 0  # the earlier attempts' goodput, read when the loop begins
        self._new_window()

    def _new_window(self):
        self._losses, self._steps, self._paused, self._t0 = [], 0, 0.0, time.perf_counter()

    def add(self, step: int, metrics) -> None:
        """Take the step just dispatched; read (and on a log_every step, log) the one before it."""
        if self._pending is not None:
            self._read(*self._pending)
        self._pending = (step, metrics)

    def begin(self, step: int) -> None:
        """The loop begins at `step`: the earlier attempts' goodput carried on, the first record written; the time
        until the first step is read is compilation."""
        earlier = goodput.earlier_records(self.writers.workdir) if self.writers.enabled else []
        self._carried, self._start_step = goodput.resume(earlier, step, self.clock.started), step
        self.record_goodput(step)
        self.clock.switch("compile")

    def record_goodput(self, step: int) -> None:
        row = goodput.record(self._carried, self.clock.read(), self.clock.started, self._start_step)
        self.writers.write(step, row, prefix=goodput.SPLIT)
        self.last.update(row)

    @contextlib.contextmanager
    def paused(self, category: str):
        """The body's time (an evaluation, a checkpoint save) kept out of the window's throughput and charged to
        goodput `category`: the step it follows is finished first, so none of the step's own time is taken out."""
        if self._pending is not None:  # none before the first step (the initial weights' save)
            jax.block_until_ready(self._pending[1])
        start = time.perf_counter()
        try:
            with self.clock.charged(category):
                yield
        finally:
            self._paused += time.perf_counter() - start

    def task_scores(self, step: int, found: dict[str, float]) -> None:
        """train.eval_tasks' scores: metrics.jsonl (split "tasks"), TensorBoard, the console, the run's last line."""
        self.writers.write(step, found, prefix=TASKS_SPLIT)
        self.last.update(task_scores=format_scores(found), task_scores_step=step)  # for the run's last line
        self.say(f"step {step:>6}/{self.t.steps} | {format_scores(found)}")

    def validation(self, step: int, val_loss: float) -> None:
        ppl = math.exp(min(val_loss, 50))
        self.writers.write(step, {"loss": val_loss, "ppl": ppl}, prefix="val")
        self.last["val_loss"] = val_loss
        self.say(f"step {step:>6}/{self.t.steps} | val_loss {val_loss:.4f} | val_ppl {ppl:.2f}")

    def flush(self) -> None:
        """The end of the loop: the last step read and logged whatever its number, then the run's energy."""
        if self._pending is None:
            return
        self.energy.stop()  # the final reading, so that the last line's totals are the sum of all windows
        self._read(*self._pending, force_log=True)
        self._pending = None
        if self.energy.enabled:
            self.say(self.energy.summary())

    def _read(self, step: int, metrics, force_log: bool = False) -> None:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if m["nonfinite_in_a_row"] >= self.t.max_nonfinite_in_a_row:
            raise NonFiniteError(
                f"step {step}: {int(m['nonfinite_in_a_row'])} steps in a row had a non-finite loss or gradient "
                f"(limit train.max_nonfinite_in_a_row={self.t.max_nonfinite_in_a_row}); their updates were "
                "skipped;", first_bad_step=step - int(m["nonfinite_in_a_row"]) + 1)
        if not m["skipped"]:
            self._losses.append(m["loss"])
        if self._warm:
            self._steps += 1
        else:  # the first step includes compilation: time throughput from its end
            self._warm, self._t0, self._paused = True, time.perf_counter(), 0.0
            self.clock.switch("productive")
        if step % self.t.log_every == 0 or force_log:
            self._write(step, m)

    def _write(self, step: int, m: dict) -> None:
        """One line over the window (loss averaged, energy used in it), then a new window."""
        t = self.t
        elapsed = time.perf_counter() - self._t0 - self._paused  # evaluation and saves are not training
        timed = self._steps
        tokens_per_s = timed * t.batch_size * t.seq_len / max(elapsed, 1e-9) if timed else None
        loss = float(np.mean(self._losses)) if self._losses else float("nan")
        n_dev = jax.device_count()
        out = {"loss": loss, "ppl": math.exp(min(loss, 50)) if math.isfinite(loss) else float("nan"),
               "lr": m["lr"], "grad_norm": m["grad_norm"], "tokens_per_s": tokens_per_s,
               "step_time": elapsed / timed if timed else None, "loss_scale": m["loss_scale"],
               "skipped_steps": m["skipped_steps"],
               "mfu": metrics_lib.mfu(tokens_per_s, self.flops_token, n_dev, self.peak) if timed else None,
               **self.energy.window()}
        self.writers.write(step, out)
        self.say(metrics_lib.format_line(step, t.steps, out))
        self._new_window()
        self.last.update(out)
        self.record_goodput(step)


class _Trace:
    """The JAX profiler trace of train.profile_steps' window: steps START to STOP-1, into `directory`."""

    def __init__(self, window: tuple[int, int] | None, directory: str, say):
        self.window, self.directory, self.say, self.on = window, directory, say, False

    def before(self, step: int) -> None:
        if self.window and step == self.window[0]:
            jax.profiler.start_trace(self.directory)
            self.on = True

    def after(self, step: int, metrics) -> None:
        if self.on and step == self.window[1]:
            jax.block_until_ready(metrics)
            jax.profiler.stop_trace()
            self.on = False
            self.say(f"profile of steps {self.window[0]}..{self.window[1]} written to {self.directory}")

    def close(self) -> None:
        """A window the run ended inside is cut at the last step."""
        if self.on:
            jax.profiler.stop_trace()
