"""Goodput accounting from hand-made timelines and records: the clock's categories partition the wall time, the
records carry over attempts (downtime, steps run again), the summary line, the sweep column, the process start.
The training runs that write real records are in test_trainer.py."""

import json
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from neox_jax import cli, errors, goodput
from neox_jax import sweep as S

COMPILE = "/jax/core/compile/backend_compile_duration"
EPOCH = 1_700_000_000.0  # the fake clock's wall time at timer 0


class FakeTime:
    def __init__(self):
        self.now = 0.0

    def timer(self):
        return self.now

    def wall(self):
        return EPOCH + self.now


def test_the_clock_charges_every_second_to_one_category():
    t = FakeTime()
    t.now = 5.0
    clock = goodput.Clock(started=EPOCH + 1.0, timer=t.timer, wall=t.wall)  # the attempt began 4 s before the clock
    t.now = 7.0
    clock.switch("compile")
    t.now = 10.0
    clock.switch("productive")
    t.now = 11.0
    with clock.charged("data"):
        t.now = 11.5
    t.now = 14.0
    with clock.charged("eval"):  # an eval step compiled at its first call, 1 s of the eval's 2
        clock.on_span(COMPILE, EPOCH + 14.5, EPOCH + 15.5)
        clock.on_span(COMPILE, EPOCH + 15.0, EPOCH + 15.2)  # nested in the one before: counted once
        clock.on_span("/jax/some/other_event", EPOCH + 14.0, EPOCH + 16.0)
        t.now = 16.0
    t.now = 17.0
    seconds = clock.read()
    want = {"startup": 6.0, "compile": 3.0 + 1.0, "productive": 1.0 + 2.5 + 1.0, "data": 0.5, "eval": 2.0 - 1.0,
            "checkpoint": 0.0, "other": 0.0}
    assert seconds == pytest.approx(want)
    assert sum(seconds.values()) == pytest.approx(17.0 - 1.0)  # the attempt's wall time, all of it
    assert clock.current == "productive"


def test_a_compilation_while_compiling_is_not_counted_twice_and_categories_are_checked():
    t = FakeTime()
    clock = goodput.Clock(timer=t.timer, wall=t.wall)
    clock.switch("compile")
    clock.on_span(COMPILE, EPOCH + 0.5, EPOCH + 1.5)
    t.now = 2.0
    assert clock.read()["compile"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="unknown goodput category 'lunch'"):
        clock.switch("lunch")


def test_covered_is_the_union_clipped():
    assert goodput.covered([], 0, 10) == 0
    assert goodput.covered([(1, 3), (2, 5), (7, 8), (9, 20)], 0, 10) == pytest.approx(4 + 1 + 1)
    assert goodput.covered([(-5, 1), (4, 4)], 0, 10) == pytest.approx(1)


def _record(step, time, attempt, attempt_from, attempt_productive_s, lost_steps=0, **seconds):
    """A record as a run writes it: the workdir's totals per category, and the attempt's bookkeeping."""
    return {"split": "goodput", "step": step, "time": time, "attempt": attempt, "attempt_from": attempt_from,
            "attempt_productive_s": attempt_productive_s, "lost_steps": lost_steps,
            **{f"{c}_s": float(seconds.get(c, 0.0)) for c in goodput.CATEGORIES}}


# Attempt 1 starts at 1000 from step 0: 10 s of start-up, 2 s compiling its first step, then 2 s a step; it records
# steps 0, 4 and 8 and is killed after 1030. Attempt 2 starts at 1050 from step 6 (the newest checkpoint).
FIRST = [_record(0, 1010, 1, 0, 0, startup=10),
         _record(4, 1020, 1, 0, 8, startup=10, compile=2, productive=8),
         _record(8, 1030, 1, 0, 16, startup=10, compile=2, productive=16, eval=2)]


def test_a_first_attempt_carries_nothing():
    carried = goodput.resume([], 0, 1000.0)
    assert carried.attempt == 1 and carried.lost_steps == 0 and set(carried.seconds.values()) == {0.0}


def test_a_resume_from_an_older_checkpoint_counts_the_steps_run_again():
    carried = goodput.resume(FIRST, 6, 1050.0)
    assert carried.attempt == 2
    assert carried.lost_steps == 8 - 6
    # steps 7 and 8 took 2 s each in attempt 1 (16 s at step 8, 8 s at step 4: 12 s at step 6)
    assert carried.seconds["rerun"] == pytest.approx(4.0)
    assert carried.seconds["productive"] == pytest.approx(16.0 - 4.0)
    assert carried.seconds["downtime"] == pytest.approx(1050 - 1030)
    # every second from attempt 1's start to attempt 2's start is in one category
    assert sum(carried.seconds.values()) == pytest.approx(1050 - 1000)


def test_resuming_past_the_last_record_loses_nothing_but_downtime():
    carried = goodput.resume(FIRST, 8, 1031.0)
    assert carried.lost_steps == 0 and carried.seconds["rerun"] == 0
    assert carried.seconds["downtime"] == pytest.approx(1.0)


def test_lost_steps_over_three_attempts():
    """Attempt 2 (from step 6, its records carry attempt 1's totals with the 4 s run again) runs steps 7..12 at
    2 s a step after 10 s of start-up; attempt 3 resumes from step 5: attempt 1's step 6 and all of attempt 2's are
    run again."""
    base = goodput.resume(FIRST, 6, 1050.0).seconds
    second = [_record(6, 1060, 2, 6, 0, lost_steps=2, **{**base, "startup": base["startup"] + 10}),
              _record(12, 1072, 2, 6, 12, lost_steps=2, **{**base, "startup": base["startup"] + 10,
                                                            "productive": base["productive"] + 12})]
    carried = goodput.resume(FIRST + second, 5, 1100.0)
    assert carried.attempt == 3
    assert carried.lost_steps == 2 + (6 - 5) + (12 - 6)
    assert carried.seconds["rerun"] == pytest.approx(4 + 2 + 12)
    assert carried.seconds["productive"] == pytest.approx(10)  # attempt 1's steps 1..5 (step 1 was compilation)
    assert carried.seconds["downtime"] == pytest.approx(20 + 28)
    assert sum(carried.seconds.values()) == pytest.approx(1100 - 1000)


def test_a_record_holds_the_totals_and_the_attempts_bookkeeping():
    carried = goodput.resume(FIRST, 6, 1050.0)
    own = {"startup": 3.0, "compile": 2.0, "productive": 4.0, "data": 0.5, "checkpoint": 0.5, "eval": 0.0,
           "other": 0.0}
    r = goodput.record(carried, own, 1050.0, 6)
    assert r["wall_s"] == pytest.approx(50 + 10)
    assert r["productive_s"] == pytest.approx(12 + 4) and r["goodput"] == pytest.approx(16 / 60)
    assert r["lost_s"] == pytest.approx(4 + 20) and r["lost_steps"] == 2
    assert (r["attempt"], r["attempt_start"], r["attempt_from"]) == (2, 1050.0, 6)
    assert r["attempt_wall_s"] == pytest.approx(10) and r["attempt_productive_s"] == 4.0
    # the next attempt reads it back
    assert goodput.resume(FIRST + [{"split": "goodput", "time": 1060.0, "step": 8, **r}], 8, 1060.0).attempt == 3


def test_the_summary_line_shows_goodput():
    r = goodput.record(goodput.resume(FIRST, 6, 1050.0), {"productive": 4.0, "other": 1.0}, 1050.0, 6)
    line = cli.final_line({"step": 8, "loss": 2.0, **r}, "runs/x")
    assert "goodput 29% of 55 s over 2 attempts (compile 2 s, data 0 s, checkpoints 0 s, eval 2 s, start-up 10 s, " \
           "lost 24 s (2 steps run again), other 1 s) | workdir runs/x" in line
    assert "goodput" not in cli.final_line({"step": 8}, "runs/x")


def test_earlier_records_are_read_from_metrics_jsonl(tmp_path):
    assert goodput.earlier_records(str(tmp_path)) == []
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"split": "train", "step": 4, "loss": 3.0}), *map(json.dumps, FIRST)]
    path.write_text("\n".join(lines) + '\n{"split": "goodput", "st')  # a torn last line is skipped
    assert goodput.earlier_records(str(tmp_path)) == FIRST
    broken = {k: v for k, v in FIRST[1].items() if k != "attempt_from"}
    path.write_text(json.dumps(broken) + "\n")
    with pytest.raises(errors.InputError, match=r"metrics.jsonl: the goodput row of step 4 lacks attempt_from"):
        goodput.earlier_records(str(tmp_path))


def test_the_sweep_summary_has_a_goodput_column(tmp_path):
    for name, share in (("a", 0.25), ("b", None)):
        run = tmp_path / name
        run.mkdir()
        rows = [{"split": "train", "step": 8, "loss": 2.0}]
        if share is not None:
            rows += [{**FIRST[-1], "goodput": 0.5}, {**FIRST[-1], "goodput": share}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    columns, rows = S.summarize(str(tmp_path))
    assert columns[-1] == "goodput" and [r["goodput"] for r in rows] == [0.25, None]
    table = S.format_table(columns, rows).splitlines()
    assert table[2].split()[-1] == "25%" and table[3].split()[-1] == "-"


def test_process_start_is_when_the_process_began():
    code = "import time; t = time.time(); from neox_jax import goodput; print(goodput.process_start(), t)"
    before = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    started, at_import = map(float, out.stdout.split())
    # the kernel's 10 ms ticks: never before the launch, and before the interpreter ran a line
    assert before - 0.02 <= started <= at_import
