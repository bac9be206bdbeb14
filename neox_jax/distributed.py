"""Multi-host start-up: `jax.distributed.initialize` from explicit flags or the cluster's environment.

A single process (a laptop, one GPU machine, CI) needs nothing: `initialize()` is then a no-op. Under SLURM or
Open MPI JAX's own cluster detection supplies the coordinator, process count and id; on a TPU pod set
NEOX_JAX_DISTRIBUTED=1 (the TPU workers' environment does not always say it is a multi-host slice). Explicit
flags (`--coordinator_address host:port --num_processes N --process_id I`) work anywhere, including several
processes on one machine over loopback (the CPU collectives then go through gloo).

The runtime's heartbeat is what bounds a dead peer: when a process dies, the coordination service notices within
`heartbeat_timeout` seconds and the others stop with an error instead of waiting in a collective forever.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import threading

import jax

from neox_jax import errors

log = logging.getLogger("neox_jax")

# Environment variables whose value (> 1) means a multi-process launch that JAX can detect by itself.
_CLUSTER_SIZE_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
FORCE_VAR = "NEOX_JAX_DISTRIBUTED"  # "1": call jax.distributed.initialize() with auto-detection (TPU pods)
# Explicit settings from the environment, for launchers that export variables rather than pass flags.
ENV_ADDRESS, ENV_NUM, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
# Seconds; defaults are JAX's. A short heartbeat finds a dead peer sooner but may misfire on an overloaded host.
ENV_INIT_TIMEOUT, ENV_HEARTBEAT = "NEOX_JAX_INIT_TIMEOUT", "NEOX_JAX_HEARTBEAT_TIMEOUT"


class DistributedError(errors.UserError, RuntimeError):
    """The multi-process runtime could not start, or lost a peer: the message names the flag or the cause."""


@dataclasses.dataclass(frozen=True)
class Topology:
    process_index: int
    process_count: int
    local_devices: int
    global_devices: int
    platform: str
    device_kind: str

    def describe(self) -> str:
        per = f"{self.local_devices} local" if self.process_count > 1 else "all local"
        return (f"topology: {self.process_count} process(es), {self.global_devices} {self.platform} devices "
                f"({per}, {self.device_kind}); this is process {self.process_index}")


def topology() -> Topology:
    return Topology(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
                    jax.devices()[0].platform, jax.devices()[0].device_kind)


def launched_multi_process(environ=None) -> bool:
    """Whether the environment says this process is one of several (so `initialize()` must join them)."""
    env = os.environ if environ is None else environ
    if env.get(FORCE_VAR, "") not in ("", "0"):
        return True
    if env.get(ENV_ADDRESS):
        return True
    if env.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1:
        return True
    return any(_int_or(env.get(v), 1) > 1 for v in _CLUSTER_SIZE_VARS)


def _int_or(value, default: int) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        return default


def env_int(name: str) -> int | None:
    """The integer value of environment variable `name`; None when unset or empty; an error naming it otherwise."""
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def check_flags(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
    """One error naming the flag when the explicit settings are incomplete or inconsistent."""
    given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
             "--process_id": process_id}
    missing = [k for k, v in given.items() if v is None]
    if missing and len(missing) < 3:
        raise DistributedError(
            f"{', '.join(missing)} not given: a multi-process launch without cluster auto-detection needs all of "
            "--coordinator_address HOST:PORT (process 0's address), --num_processes N and --process_id I")
    if missing:
        return
    host, sep, port = coordinator_address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(f"--coordinator_address={coordinator_address!r}: expected HOST:PORT "
                               "(process 0's address and a free port, e.g. 10.0.0.1:12345)")
    if num_processes < 1:
        raise DistributedError(f"--num_processes={num_processes}: must be at least 1")
    if not 0 <= process_id < num_processes:
        raise DistributedError(f"--process_id={process_id}: must be in [0, {num_processes}) for "
                               f"--num_processes={num_processes}")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, initialization_timeout: int | None = None,
               heartbeat_timeout: int | None = None) -> Topology:
    """Join the multi-controller runtime when flags are given or the launch has several processes; returns the
    topology, printed once (by process 0) for multi-process runs.

    `initialization_timeout` (default $NEOX_JAX_INIT_TIMEOUT or 300): seconds to wait for all processes to
    connect; `heartbeat_timeout` (default $NEOX_JAX_HEARTBEAT_TIMEOUT or 100): seconds after which a silent
    process counts as dead and the runtime stops the others with an error ("... another task died").
    Must run before any JAX computation.
    """
    if initialization_timeout is None:
        initialization_timeout = env_int(ENV_INIT_TIMEOUT) or 300
    if heartbeat_timeout is None:
        heartbeat_timeout = env_int(ENV_HEARTBEAT) or 100
    coordinator_address = coordinator_address or os.environ.get(ENV_ADDRESS) or None
    num_processes = num_processes if num_processes is not None else env_int(ENV_NUM)
    process_id = process_id if process_id is not None else env_int(ENV_ID)
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
    auto = launched_multi_process()
    if explicit and (not auto or None not in (coordinator_address, num_processes, process_id)):
        check_flags(coordinator_address, num_processes, process_id)
    if explicit or auto:
        _join(coordinator_address, num_processes, process_id, initialization_timeout, heartbeat_timeout)
    topo = topology()
    if topo.process_count > 1:
        if topo.process_index == 0:
            print(topo.describe(), flush=True)
    else:
        log.info(topo.describe())
    return topo


def _join(coordinator_address, num_processes, process_id, initialization_timeout, heartbeat_timeout) -> None:
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        # cross-process collectives on CPU (several processes on one machine, CI) need an implementation; gloo
        # is JAX 0.10's default already, and a JAX without the option has no other choice
        try:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except (AttributeError, KeyError):
            pass
    where = coordinator_address or "the address auto-detected from the cluster environment"
    who = f"process {'?' if process_id is None else process_id} on {socket.gethostname()}"
    advice = (f"could not join the {num_processes or '?'}-process run through coordinator {where} within "
              f"{initialization_timeout}s ({who}); check that every process was started with the same "
              "--coordinator_address and --num_processes, distinct --process_id values, and that process 0's "
              "port is reachable" + ("" if coordinator_address else " (under SLURM: one srun task per process)"))
    # JAX aborts the process (an uncatchable C++ fatal error) when the connection times out: a watchdog 30 s
    # ahead of JAX's own deadline says what went wrong instead.
    watchdog = threading.Timer(initialization_timeout, _give_up, args=(f"FATAL: {advice}",))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=initialization_timeout + 30,
                                   heartbeat_timeout_seconds=heartbeat_timeout)
    except (RuntimeError, ValueError, jax.errors.JaxRuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "already" in first or "backend" in first.lower() and "initialized" in first:
            raise DistributedError(f"jax.distributed.initialize must run before any JAX computation ({first})") \
                from e
        raise DistributedError(f"{advice} ({first})") from e
    finally:
        watchdog.cancel()


def _give_up(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    os._exit(2)


def is_peer_failure(error: BaseException) -> bool:
    """Whether a runtime error in a multi-process run is the loss of another process (not a local bug)."""
    if jax.process_count() == 1 or not isinstance(error, jax.errors.JaxRuntimeError):
        return False
    text = str(error).lower()
    return any(w in text for w in ("gloo", "connection", "heartbeat", "unavailable", "peer", "socket",
                                   "deadline", "coordination", "closed", "reset"))


def abort_peer_failure(error: BaseException, workdir: str | None = None) -> None:
    """Print one clear line for a lost peer and leave at once: a normal exit would wait for the dead process
    in the runtime's shutdown barrier."""
    first = str(error).strip().splitlines()[0][:300]
    where = f"; the last completed checkpoint in {workdir} is intact" if workdir else ""
    print(f"FATAL: process {jax.process_index()} of {jax.process_count()} lost contact with another process "
          f"(it died or the network failed): {first}{where}; restart all processes to resume", file=sys.stderr,
          flush=True)
    os._exit(1)
