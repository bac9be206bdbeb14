"""Evaluating a series of checkpoints (neox_jax/series.py, `evaluate.py --workdir`): each step scores as its own
model would alone, the scoring compiles once for the whole series, a repeated command reads what is done, and a
run trained with a checkpoint schedule evaluates its kept steps in one command."""

import json

import jax
import pytest

from neox_jax import errors, series, trainer
from neox_jax import evaluate as E

from tiny_configs import script, tiny_py
from tiny_sp512 import SMALL_VOCAB

TASKS = ["piqa", "arc_easy"]
LIMIT = 6


def test_steps_are_chosen_by_all_a_range_or_a_list():
    kept = [0, 1, 2, 4, 8, 512, 1000, 2000]
    assert series.select(kept, "all", "RUN") == kept
    assert series.select(kept, "2:512", "RUN") == [2, 4, 8, 512]
    assert series.select(kept, ":4", "RUN") == [0, 1, 2, 4]
    assert series.select(kept, "1000:", "RUN") == [1000, 2000]
    assert series.select(kept, "2000,8", "RUN") == [8, 2000]
    with pytest.raises(errors.InputError, match=r"--steps: step 3 has no checkpoint in RUN; it holds 0, 1, 2, 4"):
        series.select(kept, "3", "RUN")
    with pytest.raises(errors.InputError, match=r"--steps '8:2': expected A:B with whole steps A <= B"):
        series.select(kept, "8:2", "RUN")
    assert series.log_spaced(kept) and not series.log_spaced([1000, 2000, 3000])


def test_a_folder_that_is_no_series_is_one_error(tmp_path):
    (tmp_path / "final").mkdir()
    with pytest.raises(errors.InputError, match="neither a training workdir .* nor a folder of HF checkpoints"):
        series.checkpoints(str(tmp_path))


def _compiles_per_step(run):
    """run(say) with a `say` that marks each step's start: (backend compiles during each step, run's result)."""
    seen, marks = [], []

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        result = run(lambda line: marks.append(len(seen)))
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    ends = marks[1:] + [len(seen)]
    return [end - start for start, end in zip(marks, ends)], result


@pytest.mark.slow
def test_hf_series_scores_each_step_as_alone_compiles_once_and_resumes(tmp_path, monkeypatch):
    from test_evaluate import SMALL, make_hf_model

    folder = tmp_path / "pythia"
    for seed, step in enumerate((0, 1, 512)):
        make_hf_model(folder / f"step{step}", SMALL, seed=seed)
    compiles, results = _compiles_per_step(lambda say: series.evaluate_steps(
        str(folder), [0, 1, 512], TASKS, str(tmp_path / "all"), say=say, limit=LIMIT, bootstrap_iters=10))
    assert compiles[0] > 0 and compiles[1:] == [0, 0]  # later steps swap their weights into the compiled functions
    for step in (0, 1, 512):  # each step's scores are its model's own
        alone = E.evaluate(E.NeoXLM(hf=str(folder / f"step{step}")), TASKS, limit=LIMIT)["results"]
        for task in TASKS:
            assert results[step]["results"][task]["acc,none"] == alone[task]["acc,none"], (step, task)
        assert json.loads((tmp_path / "all" / f"step_{step}.json").read_text())["results"] == results[step]["results"]
    rows = series.rows(results)
    assert {(r[0], r[1]) for r in rows if r[2] == "acc"} == {(s, t) for s in (0, 1, 512) for t in TASKS}
    assert all(r[4] > 0 for r in rows if r[2] == "acc")  # with their stderr
    # the same command again reads every step back and evaluates nothing
    monkeypatch.setattr(E, "evaluate", lambda *a, **k: pytest.fail("a finished step was evaluated again"))
    again = series.evaluate_steps(str(folder), [0, 1, 512], TASKS, str(tmp_path / "all"), limit=LIMIT)
    assert {s: r["results"] for s, r in again.items()} == {s: r["results"] for s, r in results.items()}
    with pytest.raises(errors.InputError, match=r"step_0.json was evaluated with other settings \(limit: 6, now 5\)"):
        series.evaluate_steps(str(folder), [0], TASKS, str(tmp_path / "all"), limit=5)


@pytest.mark.slow
def test_a_run_with_pythias_schedule_evaluates_its_kept_steps_in_one_command(tmp_path, capsys):
    workdir = tmp_path / "run"
    config = tiny_py(**{**SMALL_VOCAB, "train.steps": 10, "train.checkpoint_steps": "pythia",
                        "train.checkpoint_every": 100, "train.keep_checkpoints": 1, "train.eval_every": 0,
                        "train.batch_size": 8,
                        "model.max_position_embeddings": 512, "train.log_every": 5})
    trainer.train(config, str(workdir))
    main = script("evaluate").main
    main(["--workdir", str(workdir), "--steps", "all", "--tasks", ",".join(TASKS), "--limit", str(LIMIT)])
    out = capsys.readouterr().out
    for step in (0, 1, 2, 4, 8, 10):  # Pythia's 0, 1, 2, 4, 8 and the run's last
        assert (workdir / "eval" / f"step_{step}.json").exists(), step
    assert "arc_easy" in out and (workdir / "eval" / "piqa_acc.png").exists()
    # what the README's in-loop cost figure comes from: both ways timed on this run
    script("benchmark").main(["eval-loop", "--workdir", str(workdir), "--steps", "8,10", "--limit", str(LIMIT),
                              "--passes", "1", "--json", str(tmp_path / "loop.json")])
    rows = json.loads((tmp_path / "loop.json").read_text())
    assert {r["how"] for r in rows} == {"inside the loop", "afterwards (load + evaluate)"}
    assert all(r["seconds"] > 0 for r in rows)


@pytest.mark.slow
def test_tasks_scored_inside_the_loop_are_the_checkpoints_own_scores(tmp_path):
    """train.eval_tasks every 4 steps on the training mesh: metrics.jsonl rows, the run's last line, and at step 8
    the same scores as evaluating step 8's checkpoint afterwards."""
    from neox_jax import cli, metrics

    workdir = tmp_path / "run"
    config = tiny_py(**{**SMALL_VOCAB, "train.steps": 8, "train.eval_every": 0, "train.batch_size": 8,
                        "train.log_every": 4,
                        "train.eval_tasks": ",".join(TASKS), "train.eval_tasks_every": 4,
                        "train.eval_tasks_limit": LIMIT, "model.max_position_embeddings": 512})
    last = trainer.train(config, str(workdir), task_eval=E.LoopEvaluator(config))
    rows = [r for r in metrics.read_jsonl(str(workdir / "metrics.jsonl")) if r["split"] == "tasks"]
    assert [r["step"] for r in rows] == [4, 8] and all(f"{t}/acc" in rows[0] for t in TASKS)
    assert "tasks at step 8: piqa acc" in cli.final_line(last, str(workdir))
    after = series.evaluate_steps(str(workdir), [8], TASKS, str(tmp_path / "eval"), limit=LIMIT, bootstrap_iters=100)
    for task in TASKS:
        assert rows[1][f"{task}/acc"] == pytest.approx(after[8]["results"][task]["acc,none"], abs=1e-9)
        assert rows[1][f"{task}/acc_norm"] == pytest.approx(after[8]["results"][task]["acc_norm,none"], abs=1e-9)


def test_in_loop_tasks_are_checked_before_training(tmp_path):
    from neox_jax import config as cfg

    config = tiny_py(**{"train.eval_tasks": "piqa,pica", "train.eval_tasks_every": 4})
    with pytest.raises(cfg.ConfigError, match=r"train.eval_tasks: task\(s\) pica .*\(did you mean piqa\?\)"):
        E.LoopEvaluator(config)
    with pytest.raises(cfg.ConfigError, match=r"train.eval_tasks: the tasks are scored by lm-eval"):
        trainer.train(tiny_py(**{"train.eval_tasks": "piqa", "train.eval_tasks_every": 4}), str(tmp_path))
    with pytest.raises(cfg.ConfigError, match=r"train.eval_tasks_every: train.eval_tasks='piqa' are scored every"):
        cfg.validate(tiny_py(**{"train.eval_tasks": "piqa"}))
