"""Multi-host start-up: `jax.distributed.initialize` from explicit flags or the cluster's environment.

A single process (a laptop, one GPU machine, CI) needs nothing: `initialize()` is then a no-op. Under SLURM,
Open MPI or on a TPU pod slice, JAX's own cluster detection supplies the coordinator, process count and id.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("neox_jax")

# Environment variables whose presence (with more than one process) means a multi-process launch.
_CLUSTER_SIZE_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES")


def launched_multi_process() -> bool:
    if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1:
        return True
    return any(int(os.environ.get(v, "1") or 1) > 1 for v in _CLUSTER_SIZE_VARS)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Join the multi-controller runtime when launched as several processes; log the topology once."""
    explicit = coordinator_address is not None or num_processes is not None
    if explicit or launched_multi_process():
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    if jax.process_index() == 0:
        log.info("processes %d, devices %d global / %d local (%s)", jax.process_count(), jax.device_count(),
                 jax.local_device_count(), jax.devices()[0].device_kind)
