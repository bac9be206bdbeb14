"""Test set-up: 8 simulated CPU devices (set before JAX is imported anywhere); where the test data lives."""

import os
import pathlib
import re

_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count=" not in _flags:  # pytest-xdist's workers inherit the controller's
    _flags += " --xla_force_host_platform_device_count=8"
# The tests' programs are tiny: compiling them is most of the suite's CPU (BUILD.md, "Tests"). XLA:CPU's older
# fusion emitters compile them in about 40% less CPU (test_precision.py 45 -> 27 CPU-s; the suite's per-test CPU
# 957 -> ~880) for slightly slower steps, which these short runs barely take. -O0 once compiled in about half the time
# (tiny train step: 10 s -> 4 s); with jax 0.10.2 it changes neither compile nor step time. Scripts the tests start
# inherit both through script_env, so their numbers match the in-process references bit for bit; the README walk
# passes them to its commands (tests/test_readme.py).
COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
for _flag in COMPILE_FLAGS:
    if _flag.split("=")[0] + "=" not in _flags:
        _flags += f" {_flag}"
os.environ["XLA_FLAGS"] = _flags.strip()
# One BLAS / OpenMP thread per process: the suite runs a worker per core, and numpy's, scipy's and torch's pools
# would each spin on every core (test_scaling.py: 22.6 CPU-s for 12.6 s of wall time, 12.7 with one thread, the
# same wall time). Set before numpy is imported; workers and scripts started as subprocesses inherit it.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# No persistent compilation cache here: on XLA:CPU, multi-device executables loaded from it deadlock in their
# collectives (measured with jax 0.10.2: the second run of the same 8-device train step hangs in a rendezvous).

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"  # small real files the tests read (sources and licences in its README)

from tiny_sp512 import SMALL_TOKENIZER, SMALL_VOCAB, SMALL_VOCAB_FLAGS  # noqa: E402,F401 (re-exported)


def script_env(devices: int | None = None, **extra) -> dict:
    """The environment of a script run as a subprocess: this process's, with the simulated device count set above
    replaced by `devices` (None: the one CPU device a user's run gets), plus `extra`."""
    env = dict(os.environ, **extra)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).split()
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    return env


# The files that take over ~20 s of a worker each, longest first (a CI run's seconds per file, 2026-12-06;
# test_slurm.py first: its minute is mostly spent waiting for its SLURM jobs, which run beside the others). Run
# with `--dist loadfile --no-loadscope-reorder` (the Makefile), pytest-xdist hands out files in this order, so no
# long file starts last while the other worker idles; by default it orders files by their number of tests.
LONG_FILES = ("test_slurm.py", "test_readme.py", "test_distributed.py", "test_evaluate.py", "test_trainer.py",
              "test_faults.py", "test_benchmark.py", "test_series.py", "test_train_step.py", "test_sweep.py",
              "test_memory.py", "test_data_resume.py", "test_compile_targets.py", "test_precision.py",
              "test_splash.py", "test_context.py", "test_generate.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order
