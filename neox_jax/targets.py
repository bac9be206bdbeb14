"""What we compile for: the platform model code is traced for, devices this host does not have, the XLA flags of a
platform and the config a CPU compile uses when it stands in for an accelerator.

The platform (`target_platform`, `compiling_for`): the default backend, unless a tool compiles for another target
(e.g. scripts/inspect_sharding.py building TPU or CUDA executables on a CPU-only host); model code reads it to pick
its attention implementation.

`scripts/inspect_sharding.py --target SPEC` compiles the train step for the real compiler of the machine a run is
planned for, from a CPU-only host, and reads that compiler's memory figures:

    cpu                     simulated CPU devices (XLA:CPU; the default, needs nothing)
    tpu:v5p:4x4x4           a TPU slice from libtpu (in .venv-tpu: `make venv-tpu`), e.g. v4:4x4x4,
                            v5p:4x4x4, v5e:8x8 (jax.experimental.topologies.get_topology_desc)
    gpu:a100-40gb:96        N GPUs of a kind below, 8 per host, from the CUDA plugin without a GPU
                            (in .venv-cuda: `make venv-cuda`); deviceless compilation needs the
                            device's description, given here for the kinds in GPU_KINDS

Each returns a flat device list to build the mesh on, the platform model code is traced for (`compiling_for`) and
the device's memory in bytes. `stand_in` and `CPU_AS_ACCELERATOR` are what a CPU compile changes to stand in for
a GPU or TPU.

XLA flags (`apply_xla_flags`), set before JAX starts its backend: on GPU the latency-hiding scheduler overlaps
collectives with compute on multi-GPU meshes and costs nothing on one GPU; collective combining thresholds let
FSDP/ZeRO all-gathers and reduce-scatters batch up. Flags a user already set in XLA_FLAGS win. Nothing is set for
CPU or TPU.

JAX is imported inside functions only: scripts import this module before they configure the backend.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import glob
import os

from neox_jax import errors

# ---- the platform model code is traced for -------------------------------------------------------------------

_TARGET = contextvars.ContextVar("neox_jax_target_platform", default=None)


def target_platform() -> str:
    """The platform a step is being traced for: the default backend unless inside `compiling_for`."""
    import jax

    return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str):
    """Trace model code for `platform` ("cpu", "gpu", "tpu") whatever the host's default backend."""
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


# ---- devices this host does not have -------------------------------------------------------------------------

# Deviceless CUDA compilation needs a GpuTargetConfig: the fields the compiler reads (SM count, clocks, shared
# memory, L2, memory size and bandwidth, compute capability), from the vendors' datasheets.
_GPU = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {smem_core} threads_per_core_limit: 2048 core_count: {sms} fpus_per_core: {fpus}
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth} l2_cache_size: {l2} clock_rate_ghz: {clock} device_memory_size: {memory}
  shared_memory_per_block_optin: {smem_block} cuda_compute_capability {{ major: {cc} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 13 minor: 0 }}
device_description_str: "{name}"
"""
_A100 = dict(smem_core=167936, smem_block=166912, sms=108, fpus=64, l2=41943040, clock=1.41, cc=8)
_H100 = dict(smem_core=233472, smem_block=232448, sms=132, fpus=128, l2=52428800, clock=1.98, cc=9)
GPU_KINDS = {
    "a100-40gb": dict(_A100, name="NVIDIA A100-SXM4-40GB", memory=42505273344, bandwidth=1555200000000),
    "a100-80gb": dict(_A100, name="NVIDIA A100-SXM4-80GB", memory=85031714816, bandwidth=2039000000000),
    "h100-80gb": dict(_H100, name="NVIDIA H100 80GB HBM3", memory=84929347584, bandwidth=3352320000000),
    "h200": dict(_H100, name="NVIDIA H200", memory=150754820096, bandwidth=4800000000000),
}
TPU_HBM = {"v4": 32 * 2**30, "v5p": 95 * 2**30, "v5e": 16 * 2**30, "v5litepod": 16 * 2**30, "v6e": 32 * 2**30}


class TargetError(errors.InputError):
    """A --target the host cannot compile for, with what to install or type instead."""


@dataclasses.dataclass(frozen=True)
class Target:
    spec: str
    platform: str  # "cpu", "tpu" or "gpu": what model code is traced for
    device_count: int | None  # None: as many as the mesh needs (simulated CPUs)
    device_bytes: int | None


def parse(spec: str) -> Target:
    """Check a --target spec without touching any backend."""
    kind, _, rest = spec.partition(":")
    if spec == "cpu":
        return Target(spec, "cpu", None, None)
    if kind == "tpu" and rest.count(":") == 1:
        version, topology = rest.split(":")
        dims = topology.split("x")
        if all(d.isdigit() and int(d) > 0 for d in dims):
            count = 1
            for d in dims:
                count *= int(d)
            return Target(spec, "tpu", count, TPU_HBM.get(version))
    if kind == "gpu" and rest.count(":") == 1:
        name, count = rest.split(":")
        if name in GPU_KINDS and count.isdigit() and int(count) > 0:
            return Target(spec, "gpu", int(count), GPU_KINDS[name]["memory"])
    raise TargetError(f"--target {spec!r}: expected cpu, tpu:VERSION:TOPOLOGY (e.g. tpu:v5p:4x4x4) or "
                      f"gpu:KIND:COUNT with KIND one of {', '.join(GPU_KINDS)} (e.g. gpu:a100-40gb:96)")


def prepare_environment(target: Target) -> None:
    """Environment the plugin needs before jax starts (call before importing jax)."""
    if target.platform == "tpu":
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server to ask
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    if target.platform == "gpu":
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no driver or GPU to check against


def devices(target: Target, slices: int = 1):
    """The devices to build the mesh on (compile-only for TPU and GPU targets); for a TPU, `slices` slices of the
    topology (multi-slice over DCN). Simulated CPU devices stand in for any number of slices."""
    import jax

    if target.platform == "cpu":
        return jax.devices("cpu")
    if slices > 1 and target.platform != "tpu":
        raise TargetError(f"--target {target.spec}: several slices are a TPU layout (multi-slice over DCN); give a "
                          "tpu:VERSION:TOPOLOGY target, or cpu to simulate them")
    from jax.experimental import topologies

    try:
        if target.platform == "tpu":
            _, version, topology = target.spec.split(":")
            # v4 and v5p chips hold two cores; run as one device each ("megacore"), as on a real slice
            megacore = {"chip_config_name": "megacore"} if version in ("v4", "v5p") else {}
            return topologies.get_topology_desc(topology_name=f"{version}:{topology}", platform="tpu",
                                                num_slices=slices, **megacore).devices
        _, name, _ = target.spec.split(":")
        per_host = 8 if target.device_count % 8 == 0 else target.device_count
        return topologies.get_topology_desc(platform="cuda", target_config=_GPU.format(**GPU_KINDS[name]),
                                            topology=f"1x{target.device_count // per_host}x{per_host}").devices
    except Exception as e:  # each plugin fails its own way when absent
        raise TargetError(f"--target {target.spec}: cannot build {target.platform.upper()} devices here "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); {plugin_hint(target.platform)}") from None


def plugin_hint(platform: str) -> str:
    """How to get the compiler plugin for `platform` ("tpu" or "gpu"): a venv of its own (BUILD.md), never the
    training venv, where the plugin would become the default backend."""
    venv = "tpu" if platform == "tpu" else "cuda"
    return (f"compile-only plugins live in a venv of their own: run `make venv-{venv}`, then this command with "
            f".venv-{venv}/bin/python (BUILD.md)")


# ---- XLA flags -----------------------------------------------------------------------------------------------

GPU_FLAGS = {
    "--xla_gpu_enable_latency_hiding_scheduler": "true",
    "--xla_gpu_all_gather_combine_threshold_bytes": str(1 << 30),
    "--xla_gpu_reduce_scatter_combine_threshold_bytes": str(1 << 30),
    "--xla_gpu_all_reduce_combine_threshold_bytes": str(1 << 30),
}


def apply_xla_flags(platform: str | None = None) -> str:
    """Add GPU_FLAGS to XLA_FLAGS when running on GPU (must run before the first JAX computation)."""
    platform = platform or os.environ.get("JAX_PLATFORMS", "")
    if platform and "cuda" not in platform and "gpu" not in platform:
        return os.environ.get("XLA_FLAGS", "")
    if not platform and not _has_gpu():
        return os.environ.get("XLA_FLAGS", "")
    current = os.environ.get("XLA_FLAGS", "")
    present = {f.split("=")[0] for f in current.split()}
    extra = [f"{k}={v}" for k, v in GPU_FLAGS.items() if k not in present]
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
    return os.environ["XLA_FLAGS"]


def _has_gpu() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*"))


# ---- a CPU compile standing in for an accelerator ------------------------------------------------------------

# XLA:CPU has no 16-bit arithmetic: it converts 16-bit operands to fp32 inside loops, and its loop-invariant code
# motion then hoists those converts out of the loops, materialising fp32 copies of whole stacks of 16-bit arrays
# (a stage's weights, every stored pipeline input). GPU and TPU compilers do neither, so a CPU compile that
# stands in for an accelerator turns that pass off (measured on the 20B paper layout: 35.0 -> 26.7 GB).
CPU_AS_ACCELERATOR = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def stand_in(config, platform: str):
    """The config as compiled for `platform`: fp16 compute as bf16 on CPU (XLA:CPU has no fp16 dot) and TPU (no
    fp16 at all), the same bytes; on CPU, standing in for a GPU, attention "auto" (cuDNN flash attention there) as
    "chunked" (memory O(chunk x T) per head like flash attention, where XLA's keeps all T x T scores).
    Returns (config, notes); the config itself when nothing changes."""
    notes = []
    c = config.copy_and_resolve_references()
    if c.model.dtype == "float16" and platform in ("cpu", "tpu"):
        c.model.dtype = "bfloat16"
        notes.append("fp16 compute compiled as bf16 (same bytes): " + (
            "XLA:CPU lacks fp16 dots with fp32 accumulation" if platform == "cpu" else "TPUs compute in bf16"))
    if c.model.attention_impl == "auto" and platform == "cpu":
        c.model.attention_impl = "chunked"
        notes.append("attention 'auto' (cuDNN flash attention on GPU) compiled as 'chunked' on CPU: the same "
                     "O(chunk x T) memory per head, where XLA's attention would hold all T x T scores")
    return (c if notes else config), notes
