#!/usr/bin/env bash
# A real Slurm of one or two nodes on this machine, for the `slurm` tests and for trying the
# cluster path:
#
#   slurm/local_cluster.sh up [N]  # install slurm-wlm + munge if missing (root), configure, start N nodes (1 or 2)
#   slurm/local_cluster.sh status  # sinfo + the daemons this script started
#   slurm/local_cluster.sh down    # stop exactly the daemons `up` started (by pid)
#
# `up` writes /etc/slurm/slurm.conf for this host (CPUs and memory detected; a conf this script did
# not write is left alone and `up` refuses), starts munged (unless one already answers),
# slurmctld and one slurmd per node, and waits until every node is idle. Nodes are n1..nN, each a
# slurmd with its own port (17001, 17002) at 127.0.0.1: two nodes on one host are a real
# two-node cluster for srun/sbatch (ranks 0,1 on n1 and 2,3 on n2 with --ntasks-per-node=2;
# SLURMD_NODENAME tells them apart), though both claim the same cores. Spool, logs and pid files live in one
# state folder: $ATTNINF_SLURM_STATE (default ${XDG_STATE_HOME:-~/.local/state}/attninf-slurm).
# No accounting database: finished jobs stay visible in `scontrol show job` for MinJobAge
# (2 h) and every finished job is one line in $STATE/log/jobcomp.log.
set -euo pipefail

STATE=${ATTNINF_SLURM_STATE:-${XDG_STATE_HOME:-$HOME/.local/state}/attninf-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by attninf slurm/local_cluster.sh"
HOST=$(hostname -s)

die() { echo "local_cluster: $*" >&2; exit 2; }

install_if_missing() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return
  [[ $(id -u) -eq 0 ]] || die "slurm-wlm/munge are not installed and this is not root: apt-get install slurm-wlm munge"
  echo "local_cluster: installing slurm-wlm and munge"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null
}

write_conf() {
  if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; not touching it"
  fi
  local cpus mem_mb n=$1 nodes i
  cpus=$(nproc)
  mem_mb=$(awk -v n="$n" '/MemTotal/ {print int($2 / 1024 * 0.9 / n)}' /proc/meminfo)  # leave the OS 10%
  mkdir -p /etc/slurm "$STATE"/{ctld,log}
  nodes=$(seq -s, -f 'n%g' 1 "$n")
  for i in $(seq 1 "$n"); do mkdir -p "$STATE/slurmd/n$i"; done
  cat > "$CONF" <<EOF
$MARK (state: $STATE, $n node(s))
ClusterName=local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
MailProg=/bin/true
ReturnToService=2
MpiDefault=none
MinJobAge=7200
KillWait=10
JobRequeue=1
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.log
$(for i in $(seq 1 "$n"); do
  echo "NodeName=n$i NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((17000 + i)) CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
done)
PartitionName=debug Nodes=$nodes Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    echo "local_cluster: munge already answers; using it (not ours to stop)"; return
  fi
  mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
  [[ -f /etc/munge/munge.key ]] || mungekey -c >/dev/null
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 0700 /etc/munge
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/attninf-munged.pid
  for _ in $(seq 50); do [[ -s /run/munge/attninf-munged.pid ]] && break; sleep 0.1; done
  cp /run/munge/attninf-munged.pid "$STATE/munged.pid"
}

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

slurmd_pids() { ls "$STATE"/slurmd-n*.pid 2>/dev/null || true; }

up() {
  local n=${1:-1} i state
  [[ $n == 1 || $n == 2 ]] || die "nodes: 1 or 2, not '$n'"
  [[ $(id -u) -eq 0 ]] || die "run as root (the daemons run as root on this local cluster)"
  install_if_missing
  if alive "$STATE/slurmctld.pid" && [[ -n $(slurmd_pids) ]]; then
    echo "local_cluster: already up (slurmctld pid $(cat "$STATE/slurmctld.pid")); 'down' first to change it"
    return
  fi
  write_conf "$n"
  start_munge
  /usr/sbin/slurmctld -i   # -i: ignore stale state of an earlier run of this folder
  for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
  for i in $(seq 1 "$n"); do /usr/sbin/slurmd -N "n$i"; done
  for _ in $(seq 150); do
    state=$(sinfo -h -o '%t %D' 2>/dev/null | tr '\n' ' ' || true)
    [[ $state == "idle $n " ]] && { echo "local_cluster: up, $n node(s) idle ($(nproc) CPUs each); state in $STATE"; return; }
    sleep 0.2
  done
  die "nodes did not become idle (sinfo: '${state:-?}'); see $STATE/log/"
}

stop_pid() {  # $1 = pid file, $2 = name
  [[ -f $1 ]] || return 0
  local pid; pid=$(cat "$1")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    echo "local_cluster: stopped $2 (pid $pid)"
  fi
  rm -f "$1"
}

down() {
  local f
  for f in $(slurmd_pids) "$STATE/slurmd.pid"; do stop_pid "$f" "slurmd $(basename "$f" .pid)"; done
  stop_pid "$STATE/slurmctld.pid" slurmctld
  stop_pid "$STATE/munged.pid" munged
}

status() {
  for d in slurmctld slurmd-n1 slurmd-n2 munged; do
    if alive "$STATE/$d.pid"; then echo "$d: pid $(cat "$STATE/$d.pid")"; else echo "$d: not running (from here)"; fi
  done
  sinfo 2>/dev/null || true
}

case "${1:-}" in
  up) up "${2:-1}" ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up [1|2] | down | status" >&2; exit 2 ;;
esac
