"""Multi-slice meshes (`mesh.slices`) on simulated CPU slices, and the collective report that says which
collectives cross slices (DCN) and which stay inside one (ICI): the three spellings of device groups, loop trip
counts, and a compiled step's gradient reduction found crossing slices exactly when the data axis spans them."""

import jax
import numpy as np
import pytest

from neox_jax import collectives, layout, sharding
from neox_jax import config as cfg
from neox_jax.config import ConfigError

from tiny_configs import tiny_config


def test_data_axis_spans_the_slices_and_tensor_stays_inside():
    c = tiny_config(4, 1, 2)
    c.mesh.slices = 2
    mesh = sharding.make_mesh(c)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    of = dict(zip(jax.devices(), sharding.device_slices(jax.devices(), 2)))
    grid = np.vectorize(lambda d: of[d])(mesh.devices)
    assert (grid[:2] == 0).all() and (grid[2:] == 1).all()  # data 0-1 in slice 0, 2-3 in slice 1
    c.mesh.update(dict(slice_axis="fsdp", data=2, fsdp=2))
    grid = np.vectorize(lambda d: of[d])(sharding.make_mesh(c).devices)
    assert (grid[:, 0] == 0).all() and (grid[:, 1] == 1).all()


@pytest.mark.parametrize("mesh, needle", [
    (dict(data=1, tensor=8, slices=2), r"mesh.slices: 2 slices need mesh.data \(here 1\) to be a multiple of 2: only "
                                       r"mesh.slice_axis \(data\) may cross slices, mesh.tensor=8 stay inside one"),
    (dict(data=8, slices=3), r"mesh.slices: 3 slices do not divide the 8 devices"),
    (dict(data=8, slices=0), r"mesh.slices: must be a positive integer"),
    (dict(data=8, slices=2, slice_axis="tensor"), r"mesh.slice_axis: 'tensor' is not one of data, fsdp"),
])
def test_layouts_that_cannot_span_slices_are_one_error(mesh, needle):
    c = tiny_config()
    c.mesh.update(mesh)
    with pytest.raises(ConfigError, match=needle):
        sharding.make_mesh(cfg.validate(c))


def test_device_groups_in_every_spelling():
    assert collectives.groups("replica_groups={{0,1},{2,3}}, x", 4) == [[0, 1], [2, 3]]
    assert collectives.groups("replica_groups={}, x", 4) == [[0, 1, 2, 3]]
    assert collectives.groups("replica_groups=[2,4]<=[8], x", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert collectives.groups("replica_groups=[4,2]<=[2,4]T(1,0), x", 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    # devices laid out as a 2 x 4 mesh, the groups along its second axis, then along its first
    mesh = "replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, use"
    assert collectives.groups(mesh, 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    mesh = "replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, use"
    assert collectives.groups(mesh, 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    mesh = "replica_groups=mesh['axis_0'=2,'axis_1'=4], device_ids=([4,2]T(1,0)) {'axis_1'}, use"
    assert collectives.groups(mesh, 8) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert collectives.groups("source_target_pairs={{0,1},{1,2}}, x", 4) == [[0, 1], [1, 2]]


HLO = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ar = f32[8]{0} all-reduce(f32[8]{0} %x), replica_groups={{0,1},{2,3}}, to_apply=%add
  ROOT %t = (s32[], f32[8]) tuple(%i, %ar)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  ROOT %lt = pred[] compare(%a, %b), direction=LT
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"6"}}
  %ag = bf16[4,8]{1,0} all-gather(bf16[2,8]{1,0} %y), replica_groups={{0,2},{1,3}}, dimensions={0}
  %s = (f32[16]{0}, u32[], token[]) send(%z, %tok), frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}
  ROOT %r = f32[8]{0} get-tuple-element(%w), index=1
}
"""


def test_collectives_count_loop_trips_and_find_what_crosses_slices():
    found = {c.name: c for c in collectives.collectives(HLO, [0, 0, 1, 1])}
    assert (found["ar"].count, found["ar"].bytes, found["ar"].dcn) == (6, 32, False)
    assert (found["ag"].count, found["ag"].bytes, found["ag"].group, found["ag"].dcn) == (1, 64, 2, True)
    assert (found["s"].op, found["s"].bytes, found["s"].dcn) == ("all-reduce", 64, True)
    s = collectives.summary(list(found.values()))
    assert (s["ici"], s["dcn"]) == (6 * 32, 64 + 64)


@pytest.mark.slow
def test_compiled_step_reduces_gradients_across_slices_only_when_data_spans_them():
    """data 4 x tensor 2 on two simulated slices: the gradient all-reduce over data crosses slices (XLA:CPU
    reduces flat, so at least the gradient's bytes); on one slice nothing does. Tensor-parallel collectives never."""
    reports = {}
    for slices in (1, 2):
        c = tiny_config(4, 1, 2, 0)
        c.mesh.slices = slices
        reports[slices] = layout.inspect(c, jax.devices()[:8])["collectives"]
    assert reports[1]["dcn"] == 0 and reports[1]["dcn_analytic"] == 0
    two = reports[2]
    assert two["dcn_analytic"] > 0 and two["dcn"] >= two["dcn_analytic"]
    assert "all-reduce dcn" in two["by_op"] and "all-reduce ici" in two["by_op"]  # data across, tensor inside
    assert two["ici"] + two["dcn"] == pytest.approx(reports[1]["ici"], rel=0.05)
    # every collective listed, the largest first, summing to the totals; the text report shows the largest
    each = two["each"]
    assert sum(e["bytes"] * e["count"] for e in each if e["dcn"]) == two["dcn"]
    assert [e["bytes"] * e["count"] for e in each] == sorted((e["bytes"] * e["count"] for e in each), reverse=True)
    text = "\n".join(layout.format_collectives(two))
    assert f"largest of {len(each)}" in text and each[0]["name"] in text
