"""The tiny train step compiled for accelerators this CPU host does not have (tests/compile_targets.py, one process
per compiler): splash attention for a TPU slice, a mesh over 2 TPU slices, the context axis, and an H100 with cuDNN
attention. A change that stops the step compiling for any of them fails here. Each compiler lives in a venv of its
own (`make venv-tpu`, `make venv-cuda`; .ci/run makes both); without it these tests skip with one line naming it.
Marked slow (35 s of compiles): `make test` runs them, `make test-fast` does not."""

import json
import subprocess

import pytest

from conftest import ROOT, script_env

pytestmark = pytest.mark.slow
VENVS = {"tpu": ".venv-tpu", "gpu": ".venv-cuda"}
EXTRAS = {"tpu": "tpu", "gpu": "cuda"}


def compile_for(platform: str) -> dict:
    python = ROOT / VENVS[platform] / "bin" / "python"
    if not python.exists():
        pytest.skip(f"needs the `{EXTRAS[platform]}` extra in {VENVS[platform]} (`make {VENVS[platform][1:]}`)")
    done = subprocess.run([str(python), str(ROOT / "tests" / "compile_targets.py"), platform], env=script_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def tpu_cases():
    return compile_for("tpu")


@pytest.fixture(scope="module")
def gpu_cases():
    return compile_for("gpu")


def test_splash_attention_compiles_for_a_tpu_slice(tpu_cases):
    cases = tpu_cases
    for name in ("splash, 1 slice", "context axis"):
        case = cases[name]
        assert case["attention"] == "splash" and "tpu_custom_call" in case["kernels"], name
        assert case["dcn"] == 0, name
    # the context axis all-gathers K and V inside the slice
    assert cases["context axis"]["by_op"]["all-gather ici"]["bytes"] > 0


def test_two_slices_send_only_the_gradient_reduction_over_dcn(tpu_cases):
    case = tpu_cases["2 slices"]
    assert case["devices"] == 8 and "tpu_custom_call" in case["kernels"]
    dcn_ops = {op for op in case["by_op"] if op.endswith(" dcn")}
    assert dcn_ops == {"all-reduce dcn"}, case["by_op"]
    # At least the gradients' bytes; the TPU pads arrays to its tiles, at most as the analytic model's padded head dim.
    assert case["dcn_gradients"] <= case["dcn"] <= case["dcn_analytic"]


def test_cudnn_attention_compiles_for_an_h100(gpu_cases):
    case = gpu_cases["h100"]
    assert case["attention"] == "cudnn" and any("cudnn" in k for k in case["kernels"]), case["kernels"]
    assert case["ici"] > 0 and case["dcn"] == 0
