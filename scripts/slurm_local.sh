#!/usr/bin/env bash
# A private one-node Slurm on this machine, for the real-Slurm test (tests/slurm/) and for trying slurm/ by hand.
#
#   scripts/slurm_local.sh install          # apt-get slurm-wlm + munge when missing (Debian/Ubuntu, as root)
#   scripts/slurm_local.sh start DIR        # write DIR/slurm.conf, start munged, slurmctld, slurmd (as root)
#   export SLURM_CONF=DIR/slurm.conf        # point sbatch/srun/scontrol/squeue at it
#   scripts/slurm_local.sh stop DIR         # cancel its jobs, stop its daemons, kill what is left of them
#
# Environment: KILL_WAIT (slurm.conf KillWait, seconds from SIGTERM to SIGKILL; default 30 like Slurm's).
#
# Everything lives under DIR: config, munge key and socket, state, spool, logs and pid files; the ports are
# picked free at start. So it neither needs nor touches /etc/slurm, /etc/munge or a system munged, and `stop`
# ends only the processes this instance started (by the pids it recorded, and the slurmstepd processes that
# hold files under DIR), never processes found by name.
set -euo pipefail

usage() { echo "usage: $0 install | start DIR | stop DIR | status DIR" >&2; exit 2; }

need_root() {
  [[ $(id -u) -eq 0 ]] || { echo "$0: the Slurm daemons of this one-node test cluster run as root; run as root" >&2; exit 1; }
}

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
      && command -v sbatch >/dev/null; then
    return 0
  fi
  need_root
  echo "slurm_local: installing slurm-wlm and munge (apt-get)" >&2
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }

write_conf() {
  local dir=$1 host=$2
  local ctld_port slurmd_port
  ctld_port=$(free_port)
  slurmd_port=$(free_port)
  while [[ $slurmd_port == "$ctld_port" ]]; do slurmd_port=$(free_port); done
  cat >"$dir/slurm.conf" <<EOF
# Written by scripts/slurm_local.sh: one node (this machine), everything under $dir.
ClusterName=ofalocal
SlurmctldHost=$host
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (120 s by default)
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: the test machine may be a container. pgid tracking signals a step's process group.
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
# The time between a job's SIGTERM (preemption, scancel, time limit) and its SIGKILL: what a preempted job has to
# checkpoint. 30 s is Slurm's default (KILL_WAIT overrides it: a heavily loaded test machine may need longer).
KillWait=${KILL_WAIT:-30}
MinJobAge=600
SlurmdTimeout=60
InactiveLimit=0
NodeName=$host CPUs=$(nproc) State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  local dir=$1 host
  need_root
  host=$(hostname -s)
  mkdir -p "$dir"/{munge,state,spool,log}
  chmod 700 "$dir" "$dir/munge"
  dir=$(cd "$dir" && pwd)
  write_conf "$dir" "$host"
  if [[ ! -s $dir/munge/munge.key ]]; then
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge/munge.key"
  fi
  # --force: munged otherwise refuses a key and socket directory below /tmp (group/world-writable ancestors)
  munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munge.seed"
  export SLURM_CONF=$dir/slurm.conf
  slurmctld -i      # -i: ignore state left by an earlier instance in this DIR
  slurmd
  # wait until the node is up (ReturnToService=2 brings it back from DOWN on registration)
  local i state
  for i in $(seq 1 60); do
    state=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
    if [[ $state == idle* ]]; then
      echo "slurm_local: up (node $host idle); export SLURM_CONF=$dir/slurm.conf" >&2
      return 0
    fi
    sleep 1
  done
  echo "slurm_local: the node did not become idle (state '${state:-?}'); logs in $dir/log" >&2
  tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
  return 1
}

pid_of() { [[ -s $1 ]] && cat "$1" || true; }

kill_pid() {   # kill_pid PID NAME: TERM, wait up to 10 s, then KILL
  local pid=$1 name=$2 i
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
  echo "slurm_local: $name ($pid) did not stop; killing it" >&2
  kill -KILL "$pid" 2>/dev/null || true
}

stepd_pids() {   # slurmstepd processes of this instance: they keep their sockets under DIR/spool open
  local dir=$1 p
  for p in /proc/[0-9]*; do
    [[ $(cat "$p/comm" 2>/dev/null) == slurmstepd ]] || continue
    if ls -l "$p/fd" 2>/dev/null | grep -q -- "-> $dir/"; then echo "${p#/proc/}"; fi
  done
}

stop() {
  local dir=$1 pid i
  [[ -d $dir ]] || return 0
  dir=$(cd "$dir" && pwd)
  export SLURM_CONF=$dir/slurm.conf
  local ctld
  ctld=$(pid_of "$dir/slurmctld.pid")
  if [[ -n $ctld ]] && kill -0 "$ctld" 2>/dev/null; then
    scancel --full --quiet --signal=KILL --state=RUNNING "--user=$(id -un)" 2>/dev/null || true
    scancel --quiet "--user=$(id -un)" 2>/dev/null || true
    for i in $(seq 1 30); do
      [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
      sleep 1
    done
  fi
  kill_pid "$(pid_of "$dir/slurmd.pid")" slurmd
  kill_pid "$ctld" slurmctld
  for pid in $(stepd_pids "$dir"); do kill_pid "$pid" slurmstepd; done
  kill_pid "$(pid_of "$dir/munge/munged.pid")" munged
}

status() {
  local dir=$1
  dir=$(cd "$dir" && pwd)
  for f in "$dir/slurmctld.pid" "$dir/slurmd.pid" "$dir/munge/munged.pid"; do
    pid=$(pid_of "$f")
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then echo "$(basename "$f" .pid) $pid running"
    else echo "$(basename "$f" .pid) stopped"; fi
  done
}

case "${1:-}" in
  install) install ;;
  start) [[ $# -eq 2 ]] || usage; install; start "$2" ;;
  stop) [[ $# -eq 2 ]] || usage; stop "$2" ;;
  status) [[ $# -eq 2 ]] || usage; status "$2" ;;
  *) usage ;;
esac
