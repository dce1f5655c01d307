#!/usr/bin/env bash
# A one-node Slurm on this machine, for the cluster executor's tests and for trying `--executor slurm` locally.
#
#   bash scripts/slurm-local.sh start    # install slurm-wlm + munge if missing, configure, start, wait until idle
#   bash scripts/slurm-local.sh status   # what runs, and the SLURM_CONF to export
#   bash scripts/slurm-local.sh stop     # stop exactly the daemons `start` started, nothing else
#
# Everything it writes (slurm.conf, munge key and socket, logs, spool, pid files) lives in one folder,
# $EFFATTN_SLURM_DIR (default /tmp/effattn-slurm). The node declares $(nproc) CPUs unless EFFATTN_SLURM_CPUS says
# otherwise. The Slurm commands find this cluster through
#   export SLURM_CONF=$EFFATTN_SLURM_DIR/slurm.conf
# (status prints it); when /etc/slurm/slurm.conf does not exist, start also links it there so plain `sinfo` works,
# and stop removes that link again. Must run as root (the daemons run as root; the test fixture skips otherwise).
# start is idempotent: a cluster already up is left as it is; a half-started one is stopped and started again.
# Exit status: 0 done, 1 failed (the last lines of the daemons' logs are printed), 2 bad usage, 3 not possible here.
set -euo pipefail

dir="${EFFATTN_SLURM_DIR:-/tmp/effattn-slurm}"
conf="$dir/slurm.conf"
node="$(hostname -s)"
ctld_port="${EFFATTN_SLURM_CTLD_PORT:-6817}"
slurmd_port="${EFFATTN_SLURM_SLURMD_PORT:-6818}"
partition="${EFFATTN_SLURM_PARTITION:-debug}"
etc_link="/etc/slurm/slurm.conf"
daemons=(munged slurmctld slurmd)

log() { echo "slurm-local: $*" >&2; }
die() { log "$1"; exit "${2:-1}"; }

pid_of() { # pid of one of our daemons, when its pid file names a live process of that name
  local f="$dir/run/$1.pid" pid
  [ -s "$f" ] || return 1
  pid="$(tr -dc 0-9 <"$f")"
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$1" ] && echo "$pid"
}

node_state() { SLURM_CONF="$conf" timeout 10 sinfo -h -n "$node" -o %T 2>/dev/null | head -n1 || true; }

install_packages() {
  local missing=()
  command -v munged >/dev/null 2>&1 || missing+=(munge)
  { command -v slurmctld && command -v slurmd && command -v sinfo; } >/dev/null 2>&1 || missing+=(slurm-wlm)
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null 2>&1 || die "slurm-wlm/munge missing and no apt-get to install them" 3
  log "installing ${missing[*]} (about 20 s)"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >"$dir/log/apt.log" 2>&1; then
    apt-get update -q >>"$dir/log/apt.log" 2>&1 || true
    apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$dir/log/apt.log" 2>&1 \
      || { tail -n 5 "$dir/log/apt.log" >&2; die "apt-get install ${missing[*]} failed (log: $dir/log/apt.log)" 3; }
  fi
  # Debian's packages start their own system daemons when a service manager runs them; this script uses its own
}

write_conf() {
  local cpus mem_mb
  cpus="${EFFATTN_SLURM_CPUS:-$(nproc)}"
  mem_mb="$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)"
  cat >"$conf" <<EOF
# one-node Slurm written by scripts/slurm-local.sh (efficient-attn); state under $dir
ClusterName=effattn-local
SlurmctldHost=$node
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
# the node's CPUs as declared here (EFFATTN_SLURM_CPUS may declare more than the machine has, for tests of the
# plumbing whose tasks mostly wait on Python's start-up)
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.txt
# finished jobs stay visible to scontrol/squeue for an hour (there is no accounting database behind sacct)
MinJobAge=3600
MaxArraySize=100001
MaxJobCount=200000
KillWait=5
StateSaveLocation=$dir/spool/ctld
SlurmdSpoolDir=$dir/spool/d
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
NodeName=$node CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$partition Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munged() {
  pid_of munged >/dev/null && return 0
  if [ ! -s "$dir/munge/munge.key" ]; then
    (umask 077 && head -c 1024 /dev/urandom >"$dir/munge/munge.key")
  fi
  chmod 0600 "$dir/munge/munge.key"
  munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munge.seed" \
    || die "munged did not start (log: $dir/log/munged.log)"
}

start_slurm_daemon() { # name, extra args
  local name="$1"; shift
  pid_of "$name" >/dev/null && return 0
  SLURM_CONF="$conf" "$name" -f "$conf" "$@" || die "$name did not start (log: $dir/log/$name.log)"
}

show_logs() {
  local f
  for f in munged slurmctld slurmd; do
    [ -s "$dir/log/$f.log" ] && { log "--- last lines of $dir/log/$f.log"; tail -n 8 "$dir/log/$f.log" >&2; }
  done
  return 0
}

wait_idle() { # seconds
  local deadline=$((SECONDS + $1)) state
  while [ $SECONDS -lt $deadline ]; do
    state="$(node_state)"
    case "$state" in
      idle*|mixed*|allocated*) return 0 ;;
      down*|drain*) SLURM_CONF="$conf" scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  log "node $node not idle after $1 s (sinfo says '${state:-nothing}')"
  show_logs
  return 1
}

all_running() { local d; for d in "${daemons[@]}"; do pid_of "$d" >/dev/null || return 1; done; }

cmd_start() {
  [ "$(id -u)" -eq 0 ] || die "must run as root (the daemons run as root); current user is $(id -un)" 3
  mkdir -p "$dir"/{log,run,munge,spool/ctld,spool/d}
  chmod 0755 "$dir" "$dir/run" "$dir/log"
  chmod 0700 "$dir/munge"
  if all_running && [ -n "$(node_state)" ]; then
    wait_idle 30 || exit 1
    log "already running (SLURM_CONF=$conf)"
    return 0
  fi
  # a half-started cluster (one daemon died): stop what is ours and start clean
  cmd_stop quiet
  install_packages
  write_conf
  if [ -L "$etc_link" ] && [ "$(readlink "$etc_link")" = "$conf" ]; then
    echo "$etc_link" >"$dir/run/etc-link"  # ours, left behind by a start whose stop never ran
  elif [ ! -e "$etc_link" ] && [ ! -L "$etc_link" ]; then
    mkdir -p "$(dirname "$etc_link")"
    ln -s "$conf" "$etc_link" && echo "$etc_link" >"$dir/run/etc-link"
  fi
  start_munged
  start_slurm_daemon slurmctld -i  # -i: ignore stale state from an earlier run of this folder
  start_slurm_daemon slurmd
  wait_idle 60 || { cmd_stop quiet; exit 1; }
  log "up: node $node idle in partition $partition (export SLURM_CONF=$conf)"
}

stop_daemons() { # names; SIGTERM to all of them, then SIGKILL to any still alive after 10 s
  local name pid pids=() i
  for name in "$@"; do
    if pid="$(pid_of "$name")"; then kill -TERM "$pid" 2>/dev/null || true; pids+=("$pid"); fi
  done
  for pid in "${pids[@]}"; do
    for i in $(seq 1 100); do
      [ -d "/proc/$pid" ] || break
      sleep 0.1
    done
    [ -d "/proc/$pid" ] && kill -KILL "$pid" 2>/dev/null || true
  done
  for name in "$@"; do rm -f "$dir/run/$name.pid"; done
}

cmd_stop() {
  [ -d "$dir/run" ] || return 0
  # jobs first, so no step daemon outlives its slurmd
  if pid_of slurmctld >/dev/null; then
    SLURM_CONF="$conf" timeout 10 scancel --quiet --partition="$partition" >/dev/null 2>&1 || true
    local i
    for i in $(seq 1 100); do
      [ -z "$(SLURM_CONF="$conf" timeout 10 squeue -h -p "$partition" -t PD,R,CG,S -o %i 2>/dev/null)" ] && break
      sleep 0.1
    done
  fi
  stop_daemons slurmd slurmctld
  stop_daemons munged
  if [ -s "$dir/run/etc-link" ]; then
    local link; link="$(cat "$dir/run/etc-link")"
    [ -L "$link" ] && [ "$(readlink "$link")" = "$conf" ] && rm -f "$link"
    rm -f "$dir/run/etc-link"
  fi
  [ "${1:-}" = quiet ] || log "stopped"
}

cmd_status() {
  local d pid rc=0
  for d in "${daemons[@]}"; do
    if pid="$(pid_of "$d")"; then echo "$d: running (pid $pid)"; else echo "$d: not running"; rc=1; fi
  done
  if pid_of slurmctld >/dev/null; then echo "node $node: $(node_state | grep . || echo unreachable)"; fi
  echo "export SLURM_CONF=$conf"
  return $rc
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status   (state in \$EFFATTN_SLURM_DIR, default /tmp/effattn-slurm)" >&2; exit 2 ;;
esac
