#!/usr/bin/env bash
# A private two-node Slurm cluster on this machine: real slurmctld and two slurmd (node1, node2), for trying
# slurm/*.sh on a laptop and for tests/test_slurm.py. Needs root and Debian's slurm-wlm (`apt-get install
# slurm-wlm`; scripts/setup.sh installs it when run as root). No munge: auth/none + cred/none, localhost only.
#
#   scripts/local_slurm.sh up        start it; prints `export SLURM_CONF=...` (eval "$(scripts/local_slurm.sh up)")
#   scripts/local_slurm.sh env       print that line again for the running cluster
#   scripts/local_slurm.sh status    sinfo + squeue
#   scripts/local_slurm.sh down      stop everything and remove what `up` added
#
# `up` writes slurm.conf, state, spool and logs into a new folder $LOCAL_SLURM_ROOT/bert-local-slurm.XXXXXX
# (default /tmp), gives node I the name nodeI and the loopback address 127.0.I.1 through /etc/hosts lines
# tagged "# bert-local-slurm" (only tagged lines are ever removed), starts the daemons and waits until sinfo
# shows every node idle. `down` (and `up`, before it starts, so a crashed earlier run cannot get in the way)
# ends every job process, slurmstepd and daemon of every such folder, removes the tagged lines and the
# folders. Processes are ours when their environment holds SLURM_CONF=<folder>/slurm.conf (the daemons are
# started with it; jobs inherit it from the clients) and they are a Slurm daemon or part of a job.
#
# Settings (environment): LOCAL_SLURM_NODES [2], LOCAL_SLURM_CPUS [nproc] per node, LOCAL_SLURM_PORT [16817]
# (slurmctld), LOCAL_SLURM_NODE_PORT [17000] (slurmd of node I listens on it + I), LOCAL_SLURM_ROOT [/tmp],
# LOCAL_SLURM_TIMEOUT [60] seconds for the nodes to come up.
#
# Settings of the generated slurm.conf that differ from Slurm's defaults on purpose (see docs/slurm.md):
# AuthInfo=cred_expire=5 (a requeued job waits cred_expire seconds before it may start again; default 120),
# SchedulerParameters=sched_interval=1 (pending jobs are tried every second instead of every 60),
# KillWait=15 (seconds between SIGTERM and SIGKILL at a cancel, requeue or time limit), SlurmctldDebug=debug2
# (its log shows every time-limit check, which tests/test_slurm.py uses to time the --signal warning).
set -euo pipefail

ROOT=${LOCAL_SLURM_ROOT:-${TMPDIR:-/tmp}}
PREFIX=bert-local-slurm
TAG="# $PREFIX"
HOSTS_FILE=/etc/hosts
NODES=${LOCAL_SLURM_NODES:-2}
CPUS=${LOCAL_SLURM_CPUS:-$(nproc)}
PORT=${LOCAL_SLURM_PORT:-16817}
NODE_PORT=${LOCAL_SLURM_NODE_PORT:-17000}
TIMEOUT=${LOCAL_SLURM_TIMEOUT:-60}

say() { printf 'local_slurm: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

need_root() {
  [[ $(id -u) == 0 ]] || die "must run as root (it starts slurmd, which runs jobs, and edits $HOSTS_FILE)"
  local b
  for b in slurmctld slurmd sinfo; do
    command -v "$b" >/dev/null || die "$b not found: install Slurm with 'apt-get install slurm-wlm'"
  done
}

# ---------------------------------------------------------------------------------------------------------
# Processes of a cluster folder

ancestors() {  # this shell and its parents: never ours to kill (an salloc shell running `down`, say)
  local pid=$$
  while [[ -n $pid && $pid != 0 ]]; do
    echo "$pid"
    pid=$(awk '/^PPid:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
  done
}

# cluster_pids DIR: daemons (slurmctld, slurmscriptd, slurmd), slurmstepd and job processes (SLURM_JOB_ID
# set) whose environment holds SLURM_CONF=DIR/slurm.conf.
cluster_pids() {
  local f pid comm
  local -A skip=()
  for pid in $(ancestors); do skip[$pid]=1; done
  # one grep over every environment (NUL-separated entries, -z -x: whole entries only)
  while IFS= read -r f; do
    pid=${f#/proc/}
    pid=${pid%/environ}
    [[ -n ${skip[$pid]:-} ]] && continue
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || continue
    case $comm in
      slurmctld | slurmscriptd | slurmd | slurmstepd) echo "$pid" ;;
      *) grep -qz '^SLURM_JOB_ID=' "$f" 2>/dev/null && echo "$pid" ;;
    esac
  done < <(grep -lzxF "SLURM_CONF=$1/slurm.conf" /proc/[0-9]*/environ 2>/dev/null)
  return 0
}

# stop_cluster DIR: end every process of DIR (TERM, then KILL after 5 s), then remove DIR.
stop_cluster() {
  local dir=$1 i
  local -a pids
  mapfile -t pids < <(cluster_pids "$dir")
  if ((${#pids[@]})); then
    say "stopping ${#pids[@]} process(es) of $dir"
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      mapfile -t pids < <(cluster_pids "$dir")
      ((${#pids[@]})) || break
      sleep 0.1
    done
    if ((${#pids[@]})); then
      kill -KILL "${pids[@]}" 2>/dev/null || true
      for ((i = 0; i < 50; i++)); do
        mapfile -t pids < <(cluster_pids "$dir")
        ((${#pids[@]})) || break
        sleep 0.1
      done
      ((${#pids[@]} == 0)) || die "processes of $dir survived SIGKILL: ${pids[*]}"
    fi
  fi
  rm -rf "$dir"
}

remove_host_lines() {
  grep -q -- "$TAG\$" "$HOSTS_FILE" 2>/dev/null || return 0
  local tmp
  tmp=$(mktemp)
  grep -v -- "$TAG\$" "$HOSTS_FILE" >"$tmp" || true
  cat "$tmp" >"$HOSTS_FILE"  # in place: /etc/hosts is often a bind mount that cannot be replaced
  rm -f "$tmp"
}

clusters() {
  local d
  for d in "$ROOT/$PREFIX".*; do
    [[ -d $d ]] && echo "$d"
  done
  return 0
}

down_all() {
  local d
  while IFS= read -r d; do stop_cluster "$d"; done < <(clusters)
  remove_host_lines
}

# ---------------------------------------------------------------------------------------------------------
write_conf() {
  local dir=$1 i
  cat >"$dir/slurm.conf" <<EOF
# Written by scripts/local_slurm.sh: a private cluster on this machine (auth/none: localhost only).
ClusterName=bertlocal
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$PORT
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=5
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
PlugStackConfig=$dir/plugstack.conf
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
SlurmctldDebug=debug2
SlurmdDebug=debug
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=15
MinJobAge=900
EOF
  for ((i = 1; i <= NODES; i++)); do
    printf 'NodeName=node%d NodeAddr=127.0.%d.1 NodeHostname=localhost Port=%d CPUs=%d State=UNKNOWN\n' \
      "$i" "$i" $((NODE_PORT + i)) "$CPUS" >>"$dir/slurm.conf"
  done
  printf 'PartitionName=local Nodes=node[1-%d] Default=YES MaxTime=INFINITE State=UP\n' "$NODES" >>"$dir/slurm.conf"
  : >"$dir/plugstack.conf"
}

log_tails() {
  local dir=$1 f
  for f in "$dir"/log/*.log; do
    [[ -f $f ]] || continue
    say "--- last lines of $f"
    tail -n 15 "$f" >&2
  done
}

up() {
  need_root
  [[ $NODES =~ ^[1-9]$ ]] || die "LOCAL_SLURM_NODES=$NODES: 1 to 9 nodes"
  [[ -w $HOSTS_FILE ]] || die "$HOSTS_FILE is not writable: the node names could not be added"
  down_all
  local dir i
  dir=$(mktemp -d "$ROOT/$PREFIX.XXXXXX")
  chmod 755 "$dir"
  mkdir -p "$dir/state" "$dir/spool" "$dir/log"
  write_conf "$dir"
  [[ -z $(tail -c1 "$HOSTS_FILE") ]] || echo >>"$HOSTS_FILE"
  for ((i = 1; i <= NODES; i++)); do printf '127.0.%d.1 node%d %s\n' "$i" "$i" "$TAG" >>"$HOSTS_FILE"; done
  export SLURM_CONF=$dir/slurm.conf
  # Daemons start with SLURM_CONF in their environment: that is how `down` recognises them and their steps.
  slurmctld -f "$SLURM_CONF" -i || { log_tails "$dir"; down_all; die "slurmctld did not start"; }
  for ((i = 1; i <= NODES; i++)); do
    slurmd -f "$SLURM_CONF" -N "node$i" || { log_tails "$dir"; down_all; die "slurmd -N node$i did not start"; }
  done
  local t0=$SECONDS idle
  while :; do
    idle=$(timeout 10 sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | grep -c . || true)
    ((idle == NODES)) && break
    if ((SECONDS - t0 > TIMEOUT)); then
      say "nodes not idle after ${TIMEOUT}s:"
      timeout 10 sinfo -N -l >&2 || true
      log_tails "$dir"
      down_all
      die "the local cluster did not come up"
    fi
    sleep 0.3
  done
  say "up: $NODES nodes idle after $((SECONDS - t0))s ($dir)"
  echo "export SLURM_CONF=$SLURM_CONF"
}

live_dir() {
  local d
  while IFS= read -r d; do
    [[ -f $d/slurmctld.pid ]] && kill -0 "$(cat "$d/slurmctld.pid")" 2>/dev/null && { echo "$d"; return 0; }
  done < <(clusters)
  return 1
}

case ${1:-} in
  up) up ;;
  down)
    need_root
    down_all
    say "down: no local cluster left"
    ;;
  env)
    d=$(live_dir) || die "no local cluster is running (scripts/local_slurm.sh up)"
    echo "export SLURM_CONF=$d/slurm.conf"
    ;;
  status)
    d=$(live_dir) || die "no local cluster is running (scripts/local_slurm.sh up)"
    SLURM_CONF=$d/slurm.conf sinfo -N -l
    SLURM_CONF=$d/slurm.conf squeue
    ;;
  *)
    echo "usage: $0 up|down|env|status" >&2
    exit 2
    ;;
esac
