"""Scaling-law studies (neox_jax/scaling.py, scripts/sweep.py --isoflop / --fit): the fits recover a known law from
noisy synthetic losses, an isoflop plan spends each budget, and bad studies are one line each."""

import json
import math

import numpy as np
import pytest

from neox_jax import config as cfg
from neox_jax import metrics, scaling
from neox_jax.scaling import Point, ScalingError

from tiny_configs import script, tiny_py

# Hoffmann et al.'s fitted law (their approach 3)
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28


def synthetic(noise=0.003, seed=0):
    """9 sizes around each of 5 budgets' optimum, losses from the law times log-normal noise."""
    rng = np.random.default_rng(seed)
    points = []
    for c in (1e18, 3e18, 1e19, 3e19, 1e20):
        n_opt, _ = scaling.optimal_at(dict(E=E, A=A, B=B, alpha=ALPHA, beta=BETA), c)
        for f in np.geomspace(1 / 8, 8, 9):
            n = n_opt * f
            d = c / (6 * n)
            points.append(Point(f"{c:g}/{f:.2f}", n, d, c, (E + A / n**ALPHA + B / d**BETA) * math.exp(rng.normal(0, noise))))
    return points


@pytest.mark.slow
def test_the_fits_recover_a_known_law_from_noisy_losses():
    result = scaling.fit(synthetic(), resamples=20)
    three, two, ci = result["approach3"], result["approach2"], result["intervals"]
    for name, want in (("E", E), ("alpha", ALPHA), ("beta", BETA)):
        assert three[name] == pytest.approx(want, rel=0.03), name
        assert ci[name][0] <= three[name] <= ci[name][1], name
    # along C = 6ND the optimum moves as N ~ C^(beta / (alpha + beta)), D ~ C^(alpha / (alpha + beta))
    assert two["a"] == pytest.approx(BETA / (ALPHA + BETA), abs=0.02)
    assert two["b"] == pytest.approx(ALPHA / (ALPHA + BETA), abs=0.02)
    text = scaling.format_fit(result, at=1e21)
    assert "approach 2: N_opt ~ C^" in text and "compute-optimal at 1e+21 FLOPs" in text


def test_an_isoflop_plan_spends_each_budget_on_sizes_around_the_optimum():
    base = tiny_py()
    shapes = scaling.family("depth:1-8,aspect:32")
    assert shapes[2] == scaling.Shape(3, 96, 3)
    plan = scaling.isoflop_plan(base, [1e13, 4e13], shapes, per_budget=4)
    assert [r.budget for r in plan] == [1e13] * 4 + [4e13] * 4
    t = base.train
    for r in plan:
        m = base.model.copy_and_resolve_references()
        m.update(dict(num_layers=r.shape.layers, hidden_size=r.shape.hidden, num_heads=r.shape.heads))
        spent = metrics.flops_per_token(m, t.seq_len) * r.steps * t.batch_size * t.seq_len
        assert spent == pytest.approx(r.budget, rel=0.01)
        assert r.params == cfg.param_count(m) - 2 * cfg.padded_vocab(m) * m.hidden_size - 2 * m.hidden_size
    assert len(scaling.family("pythia")) == 10


def test_bad_studies_are_one_line_each(tmp_path):
    with pytest.raises(ScalingError, match=r"--isoflop budget 1e\+09 FLOPs: only 0 size\(s\) .* raise the budget"):
        scaling.isoflop_plan(tiny_py(), [1e9], scaling.family("depth:1-4"))
    with pytest.raises(ScalingError, match=r"--family 'depth:4-1': expected pythia, or depth:A-B"):
        scaling.family("depth:4-1")
    # a run that stopped early, then runs that share no budget
    for name, steps, reached in (("a", 100, 100), ("b", 100, 40)):
        run = tmp_path / name
        run.mkdir()
        c = tiny_py(**{"train.steps": steps})
        (run / "config.json").write_text(c.to_json())
        (run / "metrics.jsonl").write_text(json.dumps({"step": reached, "split": "train", "loss": 5.0}) + "\n")
    with pytest.raises(ScalingError, match=r"--fit: run b did not finish \(step 40 of 100\)"):
        scaling.read_runs(str(tmp_path))
    (tmp_path / "b" / "metrics.jsonl").write_text(json.dumps({"step": 100, "split": "train", "loss": 5.0}) + "\n")
    with pytest.raises(ScalingError, match=r"approach 2 needs 2 budgets of 3 or more runs each .* these runs have 0"):
        scaling.approach2(scaling.read_runs(str(tmp_path)))


def test_sweep_script_refuses_isoflop_without_a_config(capsys):
    with pytest.raises(SystemExit) as stop:
        script("sweep").main(["--isoflop", "1e13,2e13"])
    assert stop.value.code == 2
    assert "--isoflop needs --config SPEC" in capsys.readouterr().err
