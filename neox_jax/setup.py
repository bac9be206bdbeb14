"""Everything a run derives from its config and mesh, built once: `build(config, mesh) -> RunSetup`.

The resolved config (mesh.* the mesh's actual sizes) and model config (vocabulary padded for this tensor size), the
Flax module, the learning-rate schedule and the optimizer, the parameters' shapes with their logical axes, and where
every part of the train state lives (PartitionSpecs and their NamedShardings). The step builders, the trainer,
the layout report and the benchmarks take this object instead of re-deriving each piece from the config, so a run
traces the model's shapes once and computes its placement once. Building allocates nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding

from neox_jax import model as model_lib
from neox_jax import optim, sharding
from neox_jax.config import check_batch, resolve_model


@dataclasses.dataclass(frozen=True, eq=False)
class RunSetup:
    config: ml_collections.ConfigDict  # the run config, mesh.* resolved to the mesh's sizes (never -1)
    mesh: Mesh
    # config.model with padded_vocab_size fixed for this tensor-parallel size: the one model config the run builds,
    # counts and checks with. config.model keeps the field as given (0: pad for the mesh), as config.json saves it.
    model_config: ml_collections.ConfigDict
    net: model_lib.GPTNeoX  # the Flax module of model_config
    param_shapes: Any  # boxed ShapeDtypeStructs: each parameter's shape, dtype and logical axes
    schedule: optax.Schedule  # lr as a function of the optimizer's count of applied updates
    optimizer: optax.GradientTransformation
    placement: sharding.Placement  # PartitionSpecs of params, grads, master and optimizer state
    shardings: sharding.Placement  # the same as NamedShardings on `mesh`
    batch_sharding: NamedSharding  # a global batch: rows split over data x fsdp

    @property
    def stages(self) -> int:
        return sharding.num_stages(self.mesh)


def build(config, mesh: Mesh) -> RunSetup:
    """The run's derived objects for `config` (validated) on `mesh`; a config that does not fit the mesh is a
    ConfigError naming the field."""
    config = sharding.with_mesh_sizes(config, mesh)
    check_batch(config)
    m = resolve_model(config)
    schedule = optim.lr_schedule(config)
    optimizer = optim.make_optimizer(config, schedule)
    shapes = model_lib.param_shapes(m)
    place = sharding.placement(shapes, optimizer, mesh, config.zero_stage)
    return RunSetup(config=config, mesh=mesh, model_config=m, net=model_lib.GPTNeoX(m), param_shapes=shapes,
                    schedule=schedule, optimizer=optimizer, placement=place, shardings=place.on(mesh),
                    batch_sharding=sharding.batch_sharding(mesh))
