#!/bin/bash
# A one-node SLURM cluster on this machine, for trying the SLURM path (train.sbatch, sweep arrays, preemption,
# requeue) on a workstation and for the tests (tests/test_slurm.py).
#
#   scripts/slurm/local_cluster.sh start [STATE_DIR]    # writes STATE_DIR/slurm.conf, starts slurmctld + slurmd
#   export SLURM_CONF=STATE_DIR/slurm.conf              # then sbatch / squeue / scontrol talk to it
#   scripts/slurm/local_cluster.sh status [STATE_DIR]
#   scripts/slurm/local_cluster.sh stop [STATE_DIR]     # stops the two daemons it started (by their pid files)
#
# STATE_DIR defaults to $NEOX_SLURM_DIR, else .slurm-local. Needs the SLURM daemons (Debian/Ubuntu: apt install
# slurm-wlm) and root: slurmd starts jobs as their user. No munge: AuthType=auth/none and CredType=cred/none
# trust every local request, which is why the daemons listen on loopback only. The node has this machine's cores
# and OverSubscribe=FORCE, so several small jobs share it (a 2-core CI machine runs a 2-task job beside others).
# Ports: $NEOX_SLURM_PORT (slurmctld, default 6817) and the next one (slurmd).
set -euo pipefail

cmd=${1:-status}
state=$(mkdir -p "${2:-${NEOX_SLURM_DIR:-.slurm-local}}" && cd "${2:-${NEOX_SLURM_DIR:-.slurm-local}}" && pwd)
conf=$state/slurm.conf
port=${NEOX_SLURM_PORT:-6817}
node=$(hostname -s)
export SLURM_CONF=$conf

die() { echo "local_cluster.sh: $*" >&2; exit 2; }

write_conf() {
  local cpus mem
  cpus=$(getconf _NPROCESSORS_ONLN)  # not nproc: it reports OMP_NUM_THREADS when that is set (the tests set 1)
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  mkdir -p "$state/ctld" "$state/spool" "$state/log"
  cat >"$conf" <<EOF
# written by scripts/slurm/local_cluster.sh: a one-node cluster on loopback
ClusterName=neoxlocal
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=$(id -un)
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
JobRequeue=1
ReturnToService=2
KillWait=30
MinJobAge=600
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
EOF
}

running() {  # the daemon whose pid file is $1 is alive (and is a SLURM daemon, not a recycled pid)
  [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null && grep -q slurm "/proc/$(cat "$1")/comm" 2>/dev/null
}

node_state() { sinfo -h -N -o %T 2>/dev/null | head -1; }

start() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
    || die "slurmctld / slurmd not found: install SLURM (Debian/Ubuntu: apt install slurm-wlm)"
  [ "$(id -u)" = 0 ] || die "needs root: slurmd starts each job as the user who submitted it"
  if running "$state/slurmctld.pid" || running "$state/slurmd.pid"; then die "already running in $state (stop first)"; fi
  write_conf
  slurmctld -i   # -i: ignore job state left by an earlier cluster in this directory
  slurmd
  for _ in $(seq 60); do
    case $(node_state) in
      idle*|mixed*|allocated*) echo "SLURM cluster up: node $node ($(getconf _NPROCESSORS_ONLN) CPUs), partition local; export SLURM_CONF=$conf"
                               return 0 ;;
    esac
    sleep 0.5
  done
  die "the node did not come up within 30 s: see $state/log/slurmctld.log and slurmd.log"
}

stop() {
  local pid file
  if running "$state/slurmctld.pid"; then  # end the jobs first: their steps outlive the daemons otherwise
    scancel --full --quiet $(squeue -h -o %i 2>/dev/null) 2>/dev/null || true
    for _ in $(seq 100); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.3; done
  fi
  for file in "$state/slurmd.pid" "$state/slurmctld.pid"; do
    if running "$file"; then
      pid=$(cat "$file")
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$file"
  done
  echo "SLURM cluster in $state stopped"
}

case $cmd in
  start) start ;;
  stop) stop ;;
  status)
    if running "$state/slurmctld.pid" && running "$state/slurmd.pid"; then
      echo "running: node $node $(node_state); export SLURM_CONF=$conf"
    else
      echo "not running ($state)"; exit 1
    fi ;;
  *) die "unknown command '$cmd': expected start, stop or status" ;;
esac
