"""Compile the tiny model's train step for accelerators this host does not have, as tests/test_compile_targets.py
asks: `python tests/compile_targets.py tpu|gpu` with the Python of .venv-tpu or .venv-cuda (the plugins live in
venvs of their own). Prints one JSON object, case name -> what the compiler made of it: seconds, the attention
implementation traced, the custom kernels in the program, per-device peak bytes and the collectives (ICI / DCN,
by op) with the DCN bytes the analytic model expects, and the gradients' own bytes (no TPU tile padding).

Sequences are 256 tokens so that splash attention (auto on TPU) tiles them in 128-token blocks; every mesh puts
heads over a tensor axis, so the kernel runs inside shard_map as on a pod.
"""

import json
import os
import pathlib
import re
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import conftest  # noqa: E402,F401  (the tests' environment: CPU host, 8 simulated devices)

from neox_jax import targets  # noqa: E402

T = 256
# name -> (target, slices, mesh and zero stage, model fields)
CASES = {
    "tpu": {
        "splash, 1 slice": ("tpu:v5p:2x2x1", 1, dict(data=2, tensor=2), {}),
        "2 slices": ("tpu:v5e:2x2", 2, dict(data=2, fsdp=2, tensor=2, zero_stage=3), {}),
        "context axis": ("tpu:v5p:2x2x1", 1, dict(context=2, tensor=2), {}),
    },
    # cuDNN's flash attention (auto on a GPU) wants 16-bit activations
    "gpu": {"h100": ("gpu:h100-80gb:4", 1, dict(data=2, tensor=2), dict(dtype="bfloat16"))},
}


def compile_case(spec: str, slices: int, layout: dict, model_fields: dict) -> dict:
    from neox_jax import collectives, fit, memory, model, setup, sharding, train
    from neox_jax import config as cfg
    from tiny_configs import tiny_config

    target = targets.parse(spec)
    c = tiny_config(**layout, model=dict(max_position_embeddings=T, **model_fields), train=dict(seq_len=T, batch_size=8))
    c.mesh.slices = slices
    devices = targets.devices(target, slices)
    start = time.perf_counter()
    mesh = sharding.make_mesh(cfg.validate(c), devices)
    run = setup.build(c, mesh)
    with targets.compiling_for(target.platform):
        executable = train.compile_train_step(run)
    seconds = time.perf_counter() - start
    hlo = executable.as_text()
    found = collectives.summary(collectives.collectives(hlo, sharding.mesh_device_slices(mesh, devices, slices)))
    stats = executable.memory_analysis()
    return dict(
        seconds=round(seconds, 1), devices=len(devices),
        attention=model.attention_impl_for(c.model, target.platform, seq_len=T),
        kernels=sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo))),
        peak=fit.compiled_peak(stats),
        dcn_analytic=memory.dcn_bytes(run, target.platform) if slices > 1 else 0,
        dcn_gradients=memory.dcn_bytes(run, "cpu") if slices > 1 else 0, **found)


def main(platform: str) -> None:
    for spec, *_ in CASES[platform].values():
        targets.prepare_environment(targets.parse(spec))
    os.environ["JAX_PLATFORMS"] = "cpu"
    print(json.dumps({name: compile_case(*case) for name, case in CASES[platform].items()}))


if __name__ == "__main__":
    main(sys.argv[1])
