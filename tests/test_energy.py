"""Energy and carbon accounting (neox_jax/energy.py) and the run planner (neox_jax/plan.py, scripts/plan_run.py).

The meter runs codecarbon for real on this CPU (everything estimated here), with every socket connection refused;
the GPU path runs codecarbon against a fake NVML; a missing or failing codecarbon degrades to rated power with one
warning. The planner is checked against the GPT-NeoX-20B run computed by hand from the paper's figures."""

import json
import logging
import runpy
import socket
import sys
import time
import types

import numpy as np
import pytest

from neox_jax import config as cfg
from neox_jax import energy, metrics, plan

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
ESTIMATED_WORLD = 475.0  # g CO2e/kWh: the IEA 2019 world average codecarbon ships


def _config(**fields):
    c = cfg.default_config()
    c.energy.sample_secs = 0.05
    for k, v in fields.items():
        c.energy[k] = v
    return c


def _wait(predicate, timeout=60.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def _burn(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(range(1000))


def _started(run):
    _wait(lambda: run._meter.sources)
    return run


@pytest.fixture
def no_network(monkeypatch):
    """Every outgoing connection and name lookup fails, and is recorded."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", lambda self, addr: refuse(addr))
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, addr: refuse(addr))
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.fixture
def no_codecarbon(monkeypatch):
    for name in [m for m in sys.modules if m == "codecarbon" or m.startswith("codecarbon.")] + ["codecarbon"]:
        monkeypatch.setitem(sys.modules, name, None)  # makes every `import codecarbon...` fail


def _sums_match(windows, last):
    for key in ("energy_kwh", "energy_gpu_kwh", "energy_cpu_kwh", "energy_ram_kwh", "co2e_kg"):
        assert sum(w[key] for w in windows) == pytest.approx(last[key.replace("_kg", "_kg_total").replace(
            "_kwh", "_kwh_total")], rel=1e-9, abs=1e-15), key


def test_cpu_run_fields_units_and_windows_adding_up_with_no_network(no_network, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # codecarbon must write nothing here (no emissions.csv)
    workdir = tmp_path / "run"
    workdir.mkdir()
    run = _started(energy.RunEnergy(_config(country="USA", region="california"), str(workdir)))
    windows = []
    for _ in range(2):
        _burn(0.4)
        windows.append(run.window())
    run.stop()
    windows.append(run.window())  # the final reading, after the last step
    last = windows[-1]

    sources = run._meter.sources
    assert sources["gpu"].startswith("none") and run._meter.backend.startswith("codecarbon 3.")
    assert last["energy_cpu_kwh"] >= 0 and last["energy_ram_kwh"] >= 0  # since the last sample: maybe nothing
    for w in windows[:2]:
        assert w["energy_gpu_kwh"] == 0.0 and w["energy_cpu_kwh"] > 0 and w["energy_ram_kwh"] > 0
        assert w["energy_kwh"] == pytest.approx(w["energy_cpu_kwh"] + w["energy_ram_kwh"])
        assert 0.1 < w["power_w"] < 5000, w  # watts, not kW or mW: a CPU host
        estimated = sum(w[f"energy_{k}_kwh"] for k in ("cpu", "ram") if sources[k].startswith("estimated"))
        assert w["energy_estimated"] == pytest.approx(estimated / w["energy_kwh"])
    # kWh = W x s / 3.6e6 over the whole run, within what the sampling grid allows
    seconds = run._totals["energy_seconds"]
    mean_w = last["energy_kwh_total"] * 3.6e6 / seconds
    assert min(w["power_w"] for w in windows[:2]) * 0.7 <= mean_w <= max(w["power_w"] for w in windows[:2]) * 1.3
    # carbon: the grid intensity of California from codecarbon's table, applied to every kWh
    intensity, source = energy.grid_intensity(_config(country="USA", region="california").energy)
    assert "california" in source and 10 < intensity < ESTIMATED_WORLD
    assert last["co2e_kg_total"] == pytest.approx(last["energy_kwh_total"] * intensity / 1000)
    _sums_match(windows, last)

    run.close()
    record = json.loads((workdir / "energy.json").read_text())
    assert record["energy_kwh_total"] == last["energy_kwh_total"] and record["sources"] == sources
    assert f"{last['energy_kwh_total']:.4g} kWh" in run.summary()
    assert not no_network and list(tmp_path.iterdir()) == [workdir]


def test_tracking_off_does_nothing(tmp_path):
    run = energy.RunEnergy(_config(track=False), str(tmp_path))
    assert run.window() == {} and run.summary() == ""
    run.stop()
    run.close()
    assert not (tmp_path / "energy.json").exists()


class _ScriptedMeter:
    """Stands in for _Meter: returns the given readings in turn."""

    readings = []

    def __init__(self, *args, **kwargs):
        self.sources = {"gpu": "measured (NVML)", "cpu": "estimated", "ram": "estimated"}
        self.backend = "scripted"
        self._readings = iter(self.readings)

    def read(self):
        return next(self._readings)

    def stop(self):
        pass


def test_windows_sum_over_processes_and_continue_a_resumed_run(tmp_path, monkeypatch):
    # two processes: [seconds, gpu, cpu, ram, estimated kWh] cumulative, three log lines
    p0 = [[10, 0.010, 0.001, 0.002, 0.003], [20, 0.030, 0.002, 0.004, 0.006], [25, 0.040, 0.003, 0.005, 0.008]]
    p1 = [[12, 0.020, 0.000, 0.000, 0.000], [22, 0.050, 0.000, 0.000, 0.000], [30, 0.060, 0.000, 0.000, 0.000]]
    p1_windows = iter(np.diff(np.array([[0.0] * 5, *p1]), axis=0))  # what process 1 sends: its windows
    monkeypatch.setattr(energy, "_Meter", _ScriptedMeter)
    monkeypatch.setattr(energy, "_all_processes", lambda delta: np.stack([delta, next(p1_windows)]))
    _ScriptedMeter.readings = [np.array(r, float) for r in p0]
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 5, "split": "train", "loss": 3.0}) + "\n"
        + json.dumps({"step": 10, "split": "train", "energy_kwh_total": 1.0, "energy_gpu_kwh_total": 0.9,
                      "energy_cpu_kwh_total": 0.06, "energy_ram_kwh_total": 0.04, "co2e_kg_total": 0.5}) + "\n")
    run = energy.RunEnergy(_config(carbon_intensity=200.0), str(tmp_path))
    w1, w2, w3 = run.window(), run.window(), run.window()

    # window 2 by hand: gpu 0.020 + 0.030, cpu 0.001, ram 0.002; estimated 0.003 of 0.053 kWh
    assert w2["energy_gpu_kwh"] == pytest.approx(0.050) and w2["energy_cpu_kwh"] == pytest.approx(0.001)
    assert w2["energy_kwh"] == pytest.approx(0.053) and w2["energy_estimated"] == pytest.approx(0.003 / 0.053)
    assert w2["co2e_kg"] == pytest.approx(0.053 * 0.2)
    # power: each process's kWh over its own 10 s, summed: (0.023 + 0.030) kWh * 3.6e6 J / 10 s
    assert w2["power_w"] == pytest.approx((0.023 + 0.030) * 3.6e6 / 10)
    # cumulative: this session's sums on top of the last totals in metrics.jsonl
    assert w3["energy_kwh_total"] == pytest.approx(1.0 + 0.048 + 0.060)
    assert w3["energy_gpu_kwh_total"] == pytest.approx(0.9 + 0.100)
    assert w3["co2e_kg_total"] == pytest.approx(0.5 + 0.108 * 0.2)
    windows = [w1, w2, w3]
    assert sum(w["energy_kwh"] for w in windows) == pytest.approx(w3["energy_kwh_total"] - 1.0)
    assert "1 kWh in earlier sessions" in run.summary()


def _rated_meter(clock, **fields):
    e = _config(**fields).energy
    return energy._Meter(e, ESTIMATED_WORLD, [], {"gpu": 700.0, "cpu": 20.0, "ram": 0.0}, True, clock=clock)


def test_missing_codecarbon_estimates_from_rated_power_with_one_warning(no_codecarbon, caplog, tmp_path):
    now = [100.0]
    with caplog.at_level(logging.WARNING, logger="neox_jax"):
        meter = _rated_meter(lambda: now[0], pue=1.5)
        _wait(lambda: meter.sources)
        now[0] += 3600.0  # one hour at 700 W + 20 W, PUE 1.5: 1.05 kWh + 0.03 kWh
        reading = meter.read()
        meter.stop()
        now[0] += 3600.0  # stopped: the reading no longer grows
        assert (meter.read() == reading).all()
    assert reading[1:4] == pytest.approx([1.05, 0.03, 0.0]) and reading[4] == pytest.approx(1.08)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "codecarbon is not installed" in warnings[0].getMessage()
    assert meter.sources["gpu"] == "estimated (700 W rated)" and meter.sources["ram"].startswith("none")

    # the whole run: fields present, all estimated, average power = rated CPU power x PUE (no GPU here)
    run = energy.RunEnergy(_config(cpu_watts=36.0, pue=1.25, country="FRA"), str(tmp_path))
    assert run.intensity == ESTIMATED_WORLD and "not installed" in run.intensity_source
    _wait(lambda: run._meter.sources)
    time.sleep(0.1)
    w = run.window()
    assert w["energy_estimated"] == pytest.approx(1.0) and w["power_w"] == pytest.approx(36.0 * 1.25)
    assert w["energy_cpu_kwh"] > 0 and w["energy_gpu_kwh"] == 0.0


@pytest.mark.parametrize("failure", ["start is swallowed", "measurement raises"])
def test_failing_codecarbon_degrades_with_one_warning(failure, monkeypatch, caplog, tmp_path):
    import codecarbon

    if failure == "start is swallowed":  # codecarbon's start() logs its own errors and returns
        monkeypatch.setattr(codecarbon.OfflineEmissionsTracker, "start", lambda self: None)
    else:
        real, calls = codecarbon.OfflineEmissionsTracker._measure_power_and_energy, []

        def flaky(self):
            calls.append(1)
            if len(calls) > 3:
                raise RuntimeError("NVML went away")
            real(self)

        monkeypatch.setattr(codecarbon.OfflineEmissionsTracker, "_measure_power_and_energy", flaky)
    with caplog.at_level(logging.WARNING, logger="neox_jax"):
        run = energy.RunEnergy(_config(cpu_watts=10.0), str(tmp_path))
        before = run.window()
        _wait(lambda: run._meter.backend.startswith("rated power"))
        run.window()  # the window in which it failed: partly codecarbon's, partly rated power
        time.sleep(0.1)
        after = run.window()
        run.stop()
        final = run.window()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING][0].startswith("energy: codecarbon")
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    assert after["energy_kwh_total"] >= before["energy_kwh_total"] and final["energy_kwh_total"] >= after[
        "energy_kwh_total"]
    assert after["energy_estimated"] == pytest.approx(1.0) and after["power_w"] == pytest.approx(10.0)


class _FakeNVML(types.ModuleType):
    """Two H100s whose energy counters (mJ) the test sets; everything else codecarbon asks for, constant."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    NVMLError_NotSupported = NVMLError

    def __init__(self):
        super().__init__("pynvml")
        self.counters_mj = [5_000_000, 9_000_000]

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-0000000{h}"

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return 700_000

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(total=80 << 30, free=40 << 30, used=40 << 30)

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        return self.counters_mj[h]

    def nvmlDeviceGetPowerUsage(self, h):
        return 500_000

    def nvmlDeviceGetUtilizationRates(self, h):
        return types.SimpleNamespace(gpu=90, memory=50)

    def nvmlDeviceGetTemperature(self, h, sensor):
        return 60

    def nvmlDeviceGetComputeMode(self, h):
        return 0

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return []

    nvmlDeviceGetGraphicsRunningProcesses = nvmlDeviceGetComputeRunningProcesses


def test_gpu_path_reads_this_process_gpus_from_nvml_counters(monkeypatch):
    from codecarbon.core import gpu, gpu_nvidia, hardware_cache

    fake = _FakeNVML()
    monkeypatch.setattr(gpu_nvidia, "pynvml", fake)
    monkeypatch.setattr(gpu_nvidia, "PYNVML_AVAILABLE", True)
    monkeypatch.setattr(gpu, "PYNVML_AVAILABLE", True)
    monkeypatch.setattr(gpu, "is_nvidia_system", lambda: True)
    hardware_cache.clear_cache()
    try:
        # this process drives GPU 1 only (e.g. CUDA_VISIBLE_DEVICES=1); another process counts the host
        meter = energy._Meter(_config(pue=1.2).energy, ESTIMATED_WORLD, energy.nvml_indices(
            [0], {"CUDA_VISIBLE_DEVICES": "1"}), {"gpu": 700.0, "cpu": 0.0, "ram": 0.0}, count_host=False)
        _wait(lambda: meter.sources)
        fake.counters_mj[0] += 7_200_000  # GPU 0: 2 Wh, not ours
        fake.counters_mj[1] += 3_600_000  # GPU 1: 1 Wh = 0.001 kWh
        meter.stop()
    finally:
        hardware_cache.clear_cache()
    seconds, gpu_kwh, cpu_kwh, ram_kwh, estimated = meter.read()
    assert gpu_kwh == pytest.approx(0.001 * 1.2) and cpu_kwh == ram_kwh == estimated == 0.0
    assert meter.sources["gpu"] == "measured (NVML)" and meter.sources["cpu"].startswith("none")


def test_nvml_indices_follow_cuda_visible_devices():
    assert energy.nvml_indices([0, 1], {}) == ["0", "1"]
    assert energy.nvml_indices([0, 1], {"CUDA_VISIBLE_DEVICES": "4,6"}) == ["4", "6"]
    assert energy.nvml_indices([1], {"CUDA_VISIBLE_DEVICES": "GPU-ab12, GPU-cd34"}) == ["GPU-cd34"]


def test_rated_power_estimate_inputs():
    assert energy.rated_watts(["NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe"], 8) == {"gpu": 1050.0, "cpu": 32.0,
                                                                                       "ram": 0.0}
    assert energy.rated_watts(["TPU v4"], 0, cpu_watts=150.0) == {"gpu": 0.0, "cpu": 0.0, "ram": 0.0}
    assert energy.rated_watts([], 2, cpu_watts=150.0)["cpu"] == 150.0


@pytest.mark.parametrize("field, value, message", [
    ("country", "usa", "3-letter upper-case ISO code"),
    ("pue", 0.9, "must be >= 1"),
    ("carbon_intensity", -1.0, "must be >= 0"),
    ("sample_secs", 0.0, "must be positive"),
    ("cpu_watts", -5.0, "must be >= 0 W"),
])
def test_bad_energy_fields_name_the_field(field, value, message):
    with pytest.raises(cfg.ConfigError, match=f"config field energy.{field}: .*{message}"):
        cfg.validate(_config(**{field: value}))


def test_unknown_grid_is_one_clear_error():
    with pytest.raises(cfg.ConfigError, match="energy.country: 'USB' is not in codecarbon's grid table; did you "
                                              "mean .*USA"):
        energy.grid_intensity(_config(country="USB").energy)
    with pytest.raises(cfg.ConfigError, match="energy.region: codecarbon has no grid data for 'atlantis' in USA"):
        energy.grid_intensity(_config(country="USA", region="atlantis").energy)
    with pytest.raises(cfg.ConfigError, match="energy.region='texas' needs energy.country"):
        energy.grid_intensity(_config(region="texas").energy)
    assert energy.grid_intensity(_config(carbon_intensity=123.0, country="FRA").energy) == (
        123.0, "energy.carbon_intensity")


def test_console_line_and_plot_show_energy(tmp_path):
    row = {"loss": 2.0, "power_w": 412.4, "energy_kwh_total": 0.01234567, "co2e_kg_total": 0.005,
           "energy_estimated": 0.25}
    assert metrics.format_line(7, 10, row).endswith(
        "power_w 412 W | energy_kwh_total 0.01235 kWh | co2e_kg_total 0.005 kg | energy 25% estimated")
    assert metrics.estimated_label(0.0) == "measured" and metrics.estimated_label(1.0) == "estimated"
    w = metrics.Writers(str(tmp_path), tensorboard=False)
    for step in (1, 2):
        w.write(step, {**row, "energy_kwh_total": 0.01 * step, "tokens_per_s": 10.0})
    w.close()
    from PIL import Image

    assert Image.open(metrics.plot_run(str(tmp_path))).size[0] == 1600  # three panels: loss, throughput, energy


# ---- planner -------------------------------------------------------------------------------------------

# GPT-NeoX-20B as trained (the paper): N = 20,554,567,680, L 44, H 6144, S 2048, 150,000 steps of 1,536 x 2,048
# tokens on 96 A100s at 117 TFLOP/s each; A100: 312 TFLOP/s dense bf16 peak, 400 W rated.
N, L, H, S = 20_554_567_680, 44, 6144, 2048
TOKENS = 150_000 * 1536 * 2048
FLOPS = TOKENS * (6 * N + 12 * L * H * S)
SECONDS = FLOPS / (96 * 117e12)


def _neox_20b():
    return cfg.from_spec(str(ROOT / "configs" / "neox_20b.py"))


def test_planner_matches_the_20b_run_computed_by_hand():
    p = plan.estimate(_neox_20b(), "A100", 96, tflops=117.0)
    assert (p.tokens_per_step, p.steps, p.tokens, p.params) == (1536 * 2048, 150_000, TOKENS, N)
    assert p.flops == pytest.approx(FLOPS, rel=1e-12)
    assert p.mfu == pytest.approx(117 / 312)
    assert p.wall_days == pytest.approx(SECONDS / 86400, rel=1e-12)  # 63.2 days
    assert p.device_hours == pytest.approx(96 * SECONDS / 3600, rel=1e-12)
    assert p.energy_kwh == pytest.approx(96 * SECONDS / 3600 * 0.4, rel=1e-12)
    assert p.co2e_kg == pytest.approx(p.energy_kwh * ESTIMATED_WORLD / 1000, rel=1e-12)

    # MFU given directly, and every energy factor overridden
    q = plan.estimate(_neox_20b(), "A100", 48, mfu=0.5, watts=250.0, utilisation=0.8, pue=1.1,
                      carbon_intensity=300.0, steps=1000)
    seconds = 1000 * 1536 * 2048 * (6 * N + 12 * L * H * S) / (48 * 312e12 * 0.5)
    assert q.wall_days == pytest.approx(seconds / 86400, rel=1e-12)
    assert q.energy_kwh == pytest.approx(48 * seconds / 3600 * 0.250 * 0.8 * 1.1, rel=1e-12)
    assert q.co2e_kg == pytest.approx(q.energy_kwh * 0.3, rel=1e-12)


def test_planner_mfu_from_a_benchmark_file(tmp_path):
    rows = [{"name": "gpu-410m", "impl": "hf_torch_eager", "mfu_datasheet_peak": 0.3},
            {"name": "gpu-410m", "impl": "neox_jax", "device": "NVIDIA H200", "n_devices": 1,
             "mfu_datasheet_peak": 0.41}]
    (tmp_path / "b.json").write_text(json.dumps(rows))
    assert plan.mfu_from_benchmark(str(tmp_path / "b.json")) == (0.41, "gpu-410m on 1 x NVIDIA H200")
    (tmp_path / "cpu.json").write_text(json.dumps([{**rows[1], "mfu_datasheet_peak": None, "device": "cpu"}]))
    with pytest.raises(plan.PlanError, match="has no MFU \\('cpu' has no datasheet peak\\)"):
        plan.mfu_from_benchmark(str(tmp_path / "cpu.json"))
    with pytest.raises(plan.PlanError, match="--benchmark .*missing.json: cannot read"):
        plan.mfu_from_benchmark(str(tmp_path / "missing.json"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(device="A100", devices=8), "exactly one of --mfu, --tflops or --benchmark"),
    (dict(device="A100", devices=8, mfu=0.5, tflops=100.0), "exactly one of"),
    (dict(device="CPU", devices=1, mfu=0.5), "--device 'CPU': no datasheet peak known.*give --peak_tflops"),
    (dict(device="TPU v4", devices=8, mfu=0.5), "--device 'TPU v4': no rated power known.*give --watts"),
    (dict(device="A100", devices=8, tflops=400.0), "MFU must be in \\(0, 1\\], got 1.282"),
    (dict(device="A100", devices=0, mfu=0.5), "--devices must be at least 1"),
    (dict(device="A100", devices=8, mfu=0.5, utilisation=1.5), "--utilisation must be in \\(0, 1\\], got 1.5"),
    (dict(device="A100", devices=8, mfu=0.5, steps=0), "--steps must be at least 1, got 0"),
    (dict(device="A100", devices=8, mfu=0.5, pue=0.5), "--pue must be at least 1"),
])
def test_planner_bad_input_names_the_flag(kwargs, message):
    with pytest.raises(plan.PlanError, match=message):
        plan.estimate(_neox_20b(), **kwargs)


def _plan_run(*argv):
    main = runpy.run_path(str(ROOT / "scripts" / "plan_run.py"), run_name="plan_run")["main"]
    return main(list(argv))


def test_plan_run_script_paper_check_and_sweep(tmp_path, capsys):
    assert _plan_run("--config", "configs/neox_20b.py", "--device", "A100", "--devices", "96", "--tflops", "117") == 0
    out = capsys.readouterr().out
    assert "37.5%" in out and "63.2" in out and "145,603" in out
    assert _plan_run("--sweep", "configs/sweeps/tiny.py", "--device", "H100", "--devices", "8", "--mfu", "0.4",
                     "--config.train.steps=100", "--json", str(tmp_path / "p.json")) == 0
    rows = json.loads((tmp_path / "p.json").read_text())
    assert [r["name"] for r in rows] == ["lr=0.001,seed=0", "lr=0.001,seed=1", "lr=0.003,seed=0", "lr=0.003,seed=1"]
    assert all(r["steps"] == 100 and r["tokens"] == 100 * 8 * 16 for r in rows)
    with pytest.raises(SystemExit) as e:
        _plan_run("--config", "configs/tiny.py", "--config.train.stepz=3", "--device", "A100", "--devices", "1",
                  "--mfu", "0.5")
    assert e.value.code == 2 and "FATAL: unknown config field 'train.stepz'" in capsys.readouterr().err
    for argv, message in ((("--config", "configs/tiny.py", "--sweep", "configs/sweeps/tiny.py"), "not both"),
                          ((), "give --config SPEC or --sweep FILE")):
        with pytest.raises(SystemExit) as e:
            _plan_run(*argv, "--device", "A100", "--devices", "1", "--mfu", "0.5")
        assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("same_host, counts", [(True, False), (False, True)])
def test_only_the_first_process_on_a_host_counts_it(monkeypatch, same_host, counts):
    import jax
    from jax.experimental import multihost_utils

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    other = lambda mine: mine if same_host else np.asarray(int(mine) ^ 1, np.int32)  # noqa: E731
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda mine: np.stack([other(mine), mine]))
    assert energy._first_on_host() is counts
