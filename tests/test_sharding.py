"""Mesh construction, the logical rules (Megatron tensor parallel, ZeRO-3 fsdp), ZeRO-1 placement, batches,
the layout report and scripts/inspect_sharding.py. Shapes only (jax.eval_shape): nothing here trains."""

import dataclasses
import json
import runpy
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from conftest import ROOT
from layout_checks import build
from neox_jax import layout, model, sharding
from neox_jax import config as cfg
from neox_jax.config import ConfigError
from neox_jax.pytree import path_name
from tiny_configs import tiny_config


def specs_by_name(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, P))[0]
    return {path_name(p): tuple(s) for p, s in flat}


def padded(spec, ndim):
    return tuple(spec) + (None,) * (ndim - len(spec))


def test_mesh_fills_minus_one_and_uses_auto_axes():
    mesh = sharding.make_mesh(tiny_config(data=-1, tensor=2))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert sharding.make_mesh(tiny_config(data=1, fsdp=1, tensor=1), jax.devices()[:1]).size == 1


@pytest.mark.parametrize("sizes,needle", [((3, 1, -1), "mesh.data=3"), ((2, 2, 1), "4 devices but 8"),
                                          ((1, 1, 16), "mesh.tensor=16")])
def test_mesh_that_does_not_fit_is_one_clear_error(sizes, needle):
    with pytest.raises(ConfigError, match="mesh") as e:
        sharding.make_mesh(tiny_config(*sizes))
    assert needle in str(e.value) and "8" in str(e.value)


# Megatron-style tensor parallelism written out per parameter: (spec at tensor=4, ZeRO-0).
MEGATRON = {
    "embed_in": ("tensor", None),  # vocab-parallel embedding
    "embed_out": (None, "tensor"),  # vocab-parallel head
    "layers/attention/query_key_value/kernel": (None, None, "tensor", None, None),  # column-parallel (heads out)
    "layers/attention/query_key_value/bias": (None, "tensor", None, None),
    "layers/attention/dense/kernel": (None, "tensor", None, None),  # row-parallel (heads in)
    "layers/attention/dense/bias": (None, None),
    "layers/mlp/dense_h_to_4h/kernel": (None, None, "tensor"),  # column-parallel
    "layers/mlp/dense_h_to_4h/bias": (None, "tensor"),
    "layers/mlp/dense_4h_to_h/kernel": (None, "tensor", None),  # row-parallel
    "layers/mlp/dense_4h_to_h/bias": (None, None),
    "layers/input_layernorm/scale": (None, None),
    "final_layer_norm/bias": (None,),
}


def test_tensor_parallel_is_megatron_style():
    run = build(tiny_config(data=2, tensor=4))
    specs = specs_by_name(sharding.param_specs(run.param_shapes, run.mesh, 0))
    for name, want in MEGATRON.items():
        assert padded(specs[name], len(want)) == want, name


def test_zero3_adds_fsdp_on_embed_dims():
    run = build(tiny_config(data=1, fsdp=2, tensor=4, zero_stage=3))
    specs = specs_by_name(sharding.param_specs(run.param_shapes, run.mesh, 3))
    assert padded(specs["embed_in"], 2) == ("tensor", "fsdp")
    assert padded(specs["layers/attention/query_key_value/kernel"], 5) == (None, "fsdp", "tensor", None, None)
    assert padded(specs["layers/mlp/dense_4h_to_h/kernel"], 3) == (None, "tensor", "fsdp")
    assert padded(specs["final_layer_norm/scale"], 1) == ("fsdp",)


def test_activation_rules_give_batch_to_data_and_fsdp():
    rules = sharding.logical_rules(3)
    assert tuple(nn.logical_to_mesh_axes(("batch", "length", "embed"), rules)) == (("data", "fsdp"), None, None)
    assert tuple(nn.logical_to_mesh_axes(("batch", "length", "vocab"), rules)) == (("data", "fsdp"), None, "tensor")


def test_indivisible_parameter_names_param_and_axis():
    c = tiny_config(data=1, tensor=8)  # 4 heads over tensor=8
    with pytest.raises(ConfigError, match=r"mesh.tensor: parameter layers/attention/.*heads.*not divisible"):
        build(c)


def test_zero1_shards_moments_and_falls_back_when_nothing_divides():
    mesh = sharding.make_mesh(tiny_config(data=4, tensor=2))
    boxed = {"w": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((8, 6), np.float32), ("embed", "mlp")),
             "odd": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((3, 6), np.float32), ("embed", "mlp"))}
    place = sharding.placement(boxed, optax.adam(1e-3), mesh, zero_stage=1)
    opt = specs_by_name(place.opt_state)
    assert padded(opt["0/mu/w"], 2) == (("data", "fsdp"), "tensor")
    assert padded(opt["0/nu/odd"], 2) == (None, "tensor")  # 3 and 6/2 are not divisible by 4
    assert padded(specs_by_name(place.params)["w"], 2) == (None, "tensor")
    assert place.replicated_moments == ("odd",)
    run = build(tiny_config(data=4, tensor=2, zero_stage=1))
    run = dataclasses.replace(run, param_shapes=boxed, optimizer=optax.adam(1e-3), placement=place)
    assert any("odd" in n and "replicated" in n for n in layout.layout_report(run)["notes"])


def test_batch_helpers():
    c = tiny_config(data=4, fsdp=2)
    mesh = sharding.make_mesh(c)
    tokens = np.arange(16 * 17, dtype=np.int32).reshape(16, 17)
    batch = sharding.global_batch({"tokens": tokens}, mesh)
    assert batch["tokens"].sharding.is_equivalent_to(sharding.batch_sharding(mesh), 2)
    assert batch["tokens"].sharding.shard_shape((16, 17)) == (2, 17)
    np.testing.assert_array_equal(np.asarray(batch["tokens"]), tokens)
    c.train.batch_size, c.train.micro_batches = 24, 2  # 12 per micro-batch over 8 devices
    with pytest.raises(ConfigError, match="train.batch_size"):
        cfg.check_batch(sharding.with_mesh_sizes(c, mesh))


def test_layout_report_bytes_and_compare():
    run = build(tiny_config(data=2, tensor=4, zero_stage=1))
    report = layout.layout_report(run)
    assert report["param_count"] == model.count_params(run.model_config)
    by_name = {e["name"]: e for e in report["params"]}
    emb = by_name["embed_in"]
    assert emb["logical"] == ["vocab", "embed"] and emb["local_shape"] == [512 // 4, 64]
    assert emb["bytes"] == 512 * 64 * 4 and emb["local_bytes"] == emb["bytes"] // 4
    # Every param is split 4 ways or replicated; ZeRO-1 moments (2 per param) split a further 2 ways.
    total = report["per_device_bytes"]
    assert sum(e["bytes"] for e in report["params"]) == 4 * report["param_count"]
    assert total["params"] == sum(e["bytes"] // (4 if "tensor" in e["spec"] else 1) for e in report["params"])
    moments = sum(e["local_bytes"] for e in report["optimizer"] if e["shape"])
    assert moments == total["params"]  # mu and nu, each half of a param's per-device bytes
    other = layout.layout_report(build(tiny_config(data=8)))
    diff = layout.compare_reports(report, other)
    assert {e["name"] for e in diff["params_changed"]} >= {"embed_in", "embed_out"}
    assert diff["per_device_bytes"]["params"][1] == 4 * report["param_count"]
    assert "embed_in" in layout.format_report(report) and "->" in layout.format_comparison(diff)


@pytest.mark.slow
def test_inspect_sharding_script_json(capsys):
    cmd = [sys.executable, str(ROOT / "scripts" / "inspect_sharding.py"), "--config", str(ROOT / "configs" / "pythia.py") + ":14m",
           "--mesh", "data=2,tensor=2", "--zero_stage", "1", "--compare", "fsdp=4,zero_stage=3", "--format", "json",
           "--batch_size", "8", "--config.train.seq_len=32", "--config.model.num_layers=2"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    first, second = result["layout"], result["compare"][0]["layout"]
    assert first["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2} and second["zero_stage"] == 3
    assert first["compiled"]["temp"] > 0
    per_device = first["per_device_bytes"]
    assert per_device["total: compiled peak estimate"] > per_device["params"] + per_device["optimizer"]
    # ZeRO-3 over 4 devices holds a quarter of the params per device (in the state's dtype: 16-bit, as trained).
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[second["params"][0]["dtype"]]
    assert second["per_device_bytes"]["params"] == pytest.approx(itemsize * second["param_count"] / 4, rel=1e-3)
    # The refused layout in this process (the error comes before any compile; the run above was the process).
    main = runpy.run_path(cmd[1], run_name="inspect_sharding")["main"]
    with pytest.raises(SystemExit) as bad:
        main(cmd[2:4] + ["--mesh", "tensor=8", "--nocompile"])
    err = capsys.readouterr().err
    assert bad.value.code != 0 and "not divisible by mesh tensor" in err, err[-2000:]
