"""Test set-up: 8 simulated CPU devices (set before JAX is imported anywhere); where the test data lives."""

import os
import pathlib

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
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


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end test (runs in CI; skip locally with -m 'not slow')")

