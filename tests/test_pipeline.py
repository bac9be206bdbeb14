"""Pipeline parallelism (the `stage` mesh axis): pipelined layouts reproduce the unpipelined 1-device run
(losses, params, gradients of every parameter, embedding and head included), layers sit on their stages,
and a config the pipeline cannot run is one clear error."""

import jax
import numpy as np
import pytest

from neox_jax import layout, loss, pipeline, setup, sharding, train
from neox_jax.config import ConfigError, validate
from neox_jax.pytree import path_name

from layout_checks import STEPS, batches, build, comparable, rel_err, run_steps  # noqa: F401
from tiny_configs import tiny_config

MICRO = 4
LAYOUTS = {  # name: (stage, data, tensor, zero_stage)
    "stage4_data2": (4, 2, 1, 0),
    "stage2_tensor2_data2_zero1": (2, 2, 2, 1),
}


def pipeline_config(stage=1, data=1, tensor=1, zero_stage=0, remat="none"):
    """The tiny run with 4 layers (so 4 stages of one layer, or 2 of two), 4 micro-batches of 4 sequences."""
    return tiny_config(data, 1, tensor, zero_stage, stage=stage, model=dict(num_layers=4, remat_policy=remat),
                       train=dict(micro_batches=MICRO))


@pytest.fixture(scope="module")
def reference():
    """The unpipelined run on one device: initial state, losses, final params, first-batch eval loss."""
    run = build(pipeline_config(), jax.devices()[:1])
    assert "stage" not in run.mesh.axis_names  # stage=1 is the plain mesh
    state = train.init_train_state(run, jax.random.PRNGKey(0))
    initial = jax.device_get(state)
    eval_loss = float(train.make_eval_step(run)(state.params, {"tokens": batches(1)[0]})["loss"])
    _, state, losses = run_steps(run, state)
    return initial, comparable(jax.device_get(state.params)), losses, eval_loss


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pipelined_layout_matches_unpipelined(layout, reference):
    stage, data, tensor, zero = LAYOUTS[layout]
    run = build(pipeline_config(stage, data, tensor, zero))
    mesh = run.mesh
    assert dict(mesh.shape) == {"stage": stage, "data": data, "fsdp": 1, "tensor": tensor}
    initial, ref_params, ref_losses, ref_eval = reference
    state = jax.device_put(initial, train.state_shardings(run))

    evaluate = train.make_eval_step(run)
    metrics = evaluate(state.params, sharding.global_batch({"tokens": batches(1)[0]}, mesh))
    assert float(metrics["loss"]) == pytest.approx(ref_eval, rel=1e-5)

    step, state, losses = run_steps(run, state)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    params = comparable(jax.device_get(state.params))
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(ref_params)):
        assert rel_err(got, want) <= 1e-5, path_name(path)
    assert step._cache_size() == 1

    # Each device holds its stage's contiguous layers (and its tensor slice); embedding and head are not
    # split over stages; ZeRO-1 moments split a further data ways.
    qkv = state.params["layers"]["attention"]["query_key_value"]["kernel"]  # [layers, embed, heads, 3, head_dim]
    assert qkv.addressable_shards[0].data.shape == (4 // stage, 64, 4 // tensor, 3, 16)
    for shard in qkv.addressable_shards:
        layers = shard.index[0]
        first = mesh.devices.reshape(stage, -1).tolist()
        owner = next(s for s, row in enumerate(first) if shard.device in row)
        assert (layers.start, layers.stop) == (owner * 4 // stage, (owner + 1) * 4 // stage)
    embed = state.params["embed_in"]
    assert embed.addressable_shards[0].data.shape == (512 // tensor, 64)
    mu = state.opt_state[1][0].mu["layers"]["attention"]["query_key_value"]["kernel"]
    assert mu.addressable_shards[0].data.size * stage * tensor * (data if zero == 1 else 1) == mu.size
    expected = train.state_shardings(run)
    for (path, arr), want in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(expected)):
        assert arr.sharding.is_equivalent_to(want, arr.ndim), (path_name(path), arr.sharding, want)


@pytest.mark.slow
def test_pipeline_gradients_match_unpipelined():
    """d(mean loss)/d(every param) through the pipeline, with per-stage remat, equals plain autodiff on one
    device: the embedding (fed to stage 0) and head (after the last stage) included."""
    tokens = batches(1, seed=1)[0]
    plain = build(pipeline_config(), jax.devices()[:1])
    params = train.init_train_state(plain, jax.random.PRNGKey(1)).params
    net = plain.net

    def plain_loss(p):
        return loss.cross_entropy(net.apply({"params": p}, tokens[:, :-1]), tokens[:, 1:])

    want = jax.device_get(jax.jit(jax.grad(plain_loss))(params))

    run = build(pipeline_config(stage=4, data=2, remat="full"))
    mesh = run.mesh

    def pipelined_loss(p, t):
        with sharding.activation_rules(mesh, 0):
            micro = train._micro_batches(t, MICRO, mesh)
            return pipeline.loss_sum(net, p, micro, mesh, loss.cross_entropy) / MICRO

    shardings = run.shardings.params
    got = jax.jit(jax.grad(pipelined_loss), in_shardings=(shardings, sharding.batch_sharding(mesh)))(
        jax.device_put(params, shardings), tokens)
    got = jax.device_get(got)
    for name in ("embed_in", "embed_out"):
        assert rel_err(got[name], want[name]) <= 1e-5, name
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(comparable(got))[0], jax.tree.leaves(comparable(want))):
        assert rel_err(g, w) <= 1e-5, path_name(path)


def test_layout_report_has_stages_and_bubble():
    report = layout.layout_report(build(pipeline_config(stage=4, data=2)))
    assert report["mesh"] == {"stage": 4, "data": 2, "fsdp": 1, "tensor": 1}
    assert report["pipeline"] == {"schedule": "gpipe", "stages": 4, "layers_per_stage": 1, "micro_batches": 4,
                                  "bubble_fraction": pytest.approx(3 / 7)}
    by_name = {e["name"]: e for e in report["params"]}
    assert by_name["layers/mlp/dense_h_to_4h/kernel"]["local_shape"] == [1, 64, 256]
    assert by_name["embed_out"]["local_shape"] == [64, 512]
    assert "bubble 42.9%" in layout.format_report(report)


@pytest.mark.parametrize("field,value,needle", [
    ("model.num_layers", 6, "mesh.stage: model.num_layers=6 cannot be split evenly into 4"),
    ("train.micro_batches", 2, "train.micro_batches: 2 micro-batches do not fill a 4-stage pipeline"),
])
def test_pipeline_that_cannot_run_is_one_clear_error(field, value, needle):
    config = pipeline_config(stage=4, data=2)
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=needle):
        validate(config)
    with pytest.raises(ConfigError, match=needle):  # also when the stage count comes from the mesh
        setup.build(config, sharding.make_mesh(config))
