# shellcheck shell=bash
# Helpers sourced by slurm/pretrain.sh and slurm/build_shards.sh (not a job script itself):
# logging, DRY_RUN, the environment block, the node list, per-rank launch through srun (or the deepspeed
# runner with a generated hostfile), and the stop -> requeue decision after a training step ends.
#
# Every setting is an environment variable with a default, so nothing here needs editing for a new
# cluster; the place for site-specific module loads is setup_environment() below (or MODULES=...).

log() { printf '[%s] %s\n' "$(date '+%F %T')" "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

is_dry() { [[ ${DRY_RUN:-0} == 1 ]]; }

# run CMD ARG...: run it, or under DRY_RUN=1 print it shell-quoted (copy-pasteable) after a '+'.
run() {
  if is_dry; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# split_words VAR_NAME STRING: a user list given as one string ("a b c") -> array (no glob expansion).
split_words() {
  local -n _out=$1
  read -r -a _out <<<"${2:-}"
}

# The repo's own files are found through REPO_DIR (exported by the wrapper scripts): under sbatch the job
# script runs from a spool copy, so its own path says nothing about where the repo is.
: "${REPO_DIR:?REPO_DIR must be set by the calling script}"

# ---------------------------------------------------------------------------------------------------------
# Environment block: runs in the batch shell; srun passes the environment on to every task.
# sbatch_submit LABEL DEPENDENCY_JOB_ID|"" SCRIPT [sbatch flags...] -> prints the new job id (a placeholder
# under DRY_RUN, when the command is printed instead). SBATCH_ARGS are added last, so the user's flags win.
sbatch_submit() {
  local label=$1 dep=$2 script=$3
  shift 3
  local -a cmd=(sbatch --parsable "$@") more
  [[ -n $dep ]] && cmd+=(--dependency="afterok:$dep")
  split_words more "${SBATCH_ARGS:-}"
  cmd+=("${more[@]}" "$script")
  if is_dry; then
    run "${cmd[@]}" >&3  # fd 3 = the submitter's stdout; this function's stdout is the job id
    echo "<$label-job-id>"
    return
  fi
  local out
  out=$("${cmd[@]}") || die "sbatch failed for $label"
  echo "${out%%;*}"  # --parsable prints "id" or "id;cluster"
}

setup_environment() {
  # Site-specific modules, e.g. MODULES="cuda/12.4 nccl/2.21" (or replace this block with your loads).
  if [[ -n ${MODULES:-} ]]; then
    command -v module >/dev/null 2>&1 || die "MODULES='$MODULES' is set but this shell has no 'module' command"
    local -a mods
    split_words mods "$MODULES"
    module load "${mods[@]}"
  fi
  # The Python environment: VENV=/path/to/.venv (or conda activate here). Without it, 'python' on PATH.
  if [[ -n ${VENV:-} ]]; then
    [[ -f $VENV/bin/activate ]] || die "VENV=$VENV: no bin/activate there (point VENV at a virtualenv)"
    # shellcheck disable=SC1091  # the venv's own script, not part of this repo
    source "$VENV/bin/activate"
  fi
  # One rank drives one GPU; its CPU work is data collation and the optimizer's host side. 8 ranks with
  # the default of one OpenMP thread per core each would oversubscribe the node 8x, so use the task's share.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  # NCCL: WARN prints real problems without per-collective noise (INFO when debugging a hang).
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  # A failed/killed rank makes the others' pending collectives abort instead of hanging until the job's
  # time limit; the first name is torch >= 2.2's, the second the older one.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
  # Multi-node fabric hints (site-specific; set them in the environment or uncomment):
  #   export NCCL_SOCKET_IFNAME=ib0        # interface for NCCL's bootstrap/socket traffic (not lo/docker0)
  #   export NCCL_IB_HCA=mlx5              # which InfiniBand adapters to use
  #   export NCCL_IB_DISABLE=0             # 1 only on clusters without InfiniBand (forces TCP sockets)
  #   export NCCL_NET_GDR_LEVEL=PHB        # GPUDirect RDMA when GPU and NIC share a PCIe host bridge
  #   export GLOO_SOCKET_IFNAME=eth0       # the same for gloo (CPU collectives); needed where the host name
  #                                        # resolves to a loopback address (Debian's "127.0.1.1 host" line)
  #                                        # and the nodes are separate machines
  export PYTHONUNBUFFERED=1  # log lines reach the per-job log file as they happen
  PYTHON=${PYTHON:-python}
  DEEPSPEED=${DEEPSPEED:-deepspeed}
}

# print_settings NAME...: echo the resolved value of each setting at the start of the log.
print_settings() {
  local name
  for name in "$@"; do
    printf '  %-32s %s\n' "$name" "${!name-<unset>}"
  done
}

# ---------------------------------------------------------------------------------------------------------
# The allocation. PREVIEW_HOSTS lets a DRY_RUN outside Slurm show the per-rank commands for example hosts.
job_hosts() {
  if [[ -n ${PREVIEW_HOSTS:-} ]]; then
    printf '%s\n' "$PREVIEW_HOSTS" | tr ' ' '\n'
    return
  fi
  [[ -n ${SLURM_JOB_NODELIST:-} ]] || die "SLURM_JOB_NODELIST is not set: not inside a Slurm allocation"
  scontrol show hostnames "$SLURM_JOB_NODELIST"
}

# allocation_tasks_per_node: tasks per node of this job. sbatch sets SLURM_NTASKS_PER_NODE only when
# --ntasks-per-node was given; SLURM_TASKS_PER_NODE is always there ("2(x4)": 2 on each of 4 nodes).
allocation_tasks_per_node() {
  if [[ -n ${SLURM_NTASKS_PER_NODE:-} ]]; then
    echo "$SLURM_NTASKS_PER_NODE"
  elif [[ ${SLURM_TASKS_PER_NODE:-} =~ ^([0-9]+)(\(x[0-9]+\))?$ ]]; then
    echo "${BASH_REMATCH[1]}"
  elif [[ -n ${SLURM_TASKS_PER_NODE:-} ]]; then
    die "the allocation has a different number of tasks on each node ($SLURM_TASKS_PER_NODE): submit with --ntasks-per-node"
  else
    echo "${TASKS_PER_NODE:-1}"
  fi
}

# resolve_allocation: HOSTS (array), NNODES, TASKS_PER_NODE, WORLD, CPUS_PER_TASK, MASTER_ADDR, MASTER_PORT
# (exported). Inside a job the allocation is the truth: the wrappers' defaults (NODES, GPUS_PER_NODE,
# CPUS_PER_TASK) only shape what the submitter asks for, so `sbatch -c 2 slurm/large.sh` starts its tasks with
# 2 CPUs, not the wrapper's 8 (which srun would refuse: more CPUs per task than the job has).
resolve_allocation() {
  local listing
  listing=$(job_hosts) || die "cannot expand the node list '${SLURM_JOB_NODELIST:-}' with scontrol"
  mapfile -t HOSTS <<<"$listing"
  NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-${NODES:-1}}}
  TASKS_PER_NODE=$(allocation_tasks_per_node)
  [[ $NNODES =~ ^[0-9]+$ && $TASKS_PER_NODE =~ ^[0-9]+$ ]] ||
    die "nodes ($NNODES) and tasks per node ($TASKS_PER_NODE) must be integers"
  ((${#HOSTS[@]} == NNODES)) ||
    die "the node list has ${#HOSTS[@]} hosts (${HOSTS[*]}) but the job has $NNODES nodes"
  WORLD=$((NNODES * TASKS_PER_NODE))
  # Since Slurm 22.05 srun no longer inherits the job's --cpus-per-task: launch_ranks passes it again.
  CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-}
  # Rank 0 runs on the first host (block distribution), so its TCP store listens there.
  export MASTER_ADDR=${HOSTS[0]}
  # Same rule as trainer/dist.py (20000 + job id mod 20000): two jobs sharing a node get different ports,
  # every task computes it without talking to the others, and a requeued job (same id) reuses it.
  [[ ${SLURM_JOB_ID:-} =~ ^[0-9]+$ ]] || die "SLURM_JOB_ID='${SLURM_JOB_ID:-}' is not a job number"
  export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
}

# slurm_time_secs TIME: a Slurm time limit (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S, UNLIMITED) in seconds.
slurm_time_secs() {
  local t=$1 d=0 h=0 m=0 s=0
  case $t in
    UNLIMITED | unlimited | INFINITE | infinite)
      echo 999999999
      return
      ;;
  esac
  if [[ $t =~ ^([0-9]+)-([0-9]+)(:([0-9]+)(:([0-9]+))?)?$ ]]; then
    d=${BASH_REMATCH[1]} h=${BASH_REMATCH[2]} m=${BASH_REMATCH[4]:-0} s=${BASH_REMATCH[6]:-0}
  elif [[ $t =~ ^([0-9]+)(:([0-9]+)(:([0-9]+))?)?$ ]]; then
    if [[ -n ${BASH_REMATCH[5]} ]]; then
      h=${BASH_REMATCH[1]} m=${BASH_REMATCH[3]} s=${BASH_REMATCH[5]}
    elif [[ -n ${BASH_REMATCH[3]} ]]; then
      m=${BASH_REMATCH[1]} s=${BASH_REMATCH[3]}
    else
      m=${BASH_REMATCH[1]}
    fi
  else
    return 1
  fi
  echo $((((10#$d * 24 + 10#$h) * 60 + 10#$m) * 60 + 10#$s))
}

# check_signal_lead TIME_LIMIT SIGNAL SECS: the --signal warning must come after the ranks are up. slurmctld
# tests time limits every 30 s and sends it at the first test with less than SECS + 30 s left: with SECS near
# or above the limit that is as the job starts, before the trainer has its handler, and every rank dies of it.
check_signal_lead() {
  local limit
  limit=$(slurm_time_secs "$1") || die "TIME_LIMIT='$1' is not a Slurm time (minutes, M:S, H:M:S, D-H:M:S)"
  [[ $3 =~ ^[0-9]+$ ]] || die "SIGNAL_SECS='$3' must be a number of seconds"
  (($3 + 60 <= limit)) ||
    die "SIGNAL_SECS=$3 leaves less than a minute of TIME_LIMIT=$1 ($limit s) before the warning: Slurm would send SIG$2 while the ranks start (they die of it); lower SIGNAL_SECS or raise TIME_LIMIT"
}

# write_hostfile PATH: the deepspeed runner's MPI-style hostfile, one "host slots=N" line per node.
write_hostfile() {
  local path=$1 host
  if is_dry; then
    printf '+ hostfile %q:\n' "$path"
    for host in "${HOSTS[@]}"; do printf '    %s slots=%s\n' "$host" "$TASKS_PER_NODE"; done
    return
  fi
  mkdir -p "$(dirname "$path")"
  : >"$path"
  for host in "${HOSTS[@]}"; do printf '%s slots=%s\n' "$host" "$TASKS_PER_NODE" >>"$path"; done
}

# launch_ranks HOSTFILE_DIR SCRIPT ARG...: start SCRIPT ARG... on every rank of the allocation; returns
# the launcher's exit status. resolve_allocation must have run.
#   LAUNCHER=srun (default): one srun task per GPU, each exporting RANK/LOCAL_RANK/WORLD_SIZE from its own
#     SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS, so every rank is a direct child of slurmstepd and receives
#     Slurm's --signal itself (the trainer turns it into an agreed stop + save).
#   LAUNCHER=deepspeed: the deepspeed runner with a hostfile from the node list, one runner per node
#     started by srun (--no_ssh --node_rank), or over pdsh/ssh from the batch shell with DS_SSH=1. Its
#     launcher does not forward SIGUSR1 and forwards SIGTERM rank by rank: use SIGNAL=TERM (see docs).
launch_ranks() {
  local hostfile_dir=$1
  shift
  local -a srun_opts=(--kill-on-bad-exit=1)
  [[ -n ${CPUS_PER_TASK:-} ]] && srun_opts+=(--cpus-per-task="$CPUS_PER_TASK")
  case ${LAUNCHER:-srun} in
    srun)
      # shellcheck disable=SC2016  # $SLURM_* must expand in each task's shell, not here
      run srun --nodes="$NNODES" --ntasks-per-node="$TASKS_PER_NODE" --ntasks="$WORLD" "${srun_opts[@]}" \
        bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"' \
        bash "$PYTHON" "$@" || return
      if is_dry; then
        local r
        for ((r = 0; r < WORLD; r++)); do
          printf '    [%s] env' "${HOSTS[r / TASKS_PER_NODE]}"
          printf ' %q' "RANK=$r" "LOCAL_RANK=$((r % TASKS_PER_NODE))" "WORLD_SIZE=$WORLD" \
            "MASTER_ADDR=$MASTER_ADDR" "MASTER_PORT=$MASTER_PORT" "$PYTHON" "$@"
          printf '\n'
        done
      fi
      ;;
    deepspeed)
      local hostfile=$hostfile_dir/hostfile-${SLURM_JOB_ID}
      write_hostfile "$hostfile"
      local -a ds=(--hostfile "$hostfile" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
        --num_nodes "$NNODES" --num_gpus "$TASKS_PER_NODE")
      if [[ ${DS_SSH:-0} == 1 ]]; then
        run "$DEEPSPEED" "${ds[@]}" "$@" || return
      else
        # shellcheck disable=SC2016  # $SLURM_NODEID must expand on each node
        run srun --nodes="$NNODES" --ntasks-per-node=1 --ntasks="$NNODES" "${srun_opts[@]}" \
          bash -c 'exec "$0" --no_ssh --node_rank="$SLURM_NODEID" "$@"' "$DEEPSPEED" "${ds[@]}" "$@" || return
      fi
      ;;
    *) die "LAUNCHER='$LAUNCHER': expected srun or deepspeed" ;;
  esac
}

# ---------------------------------------------------------------------------------------------------------
# training_state OUT_DIR -> prints "finished", "unfinished" or "empty" (no checkpoint yet). Finished means
# the latest checkpoint tag (step_NNNNNNN, written by the trainer at its last step) has reached
# train.max_steps of the resolved run config the trainer wrote to OUT_DIR/config.yaml.
training_state() {
  local out=$1
  [[ -f $out/checkpoints/latest ]] || { echo empty; return; }
  # plain 'python' of the environment, not $PYTHON: the latter is only what the ranks run
  python - "$out" <<'EOF'
import pathlib, re, sys
import yaml
out = pathlib.Path(sys.argv[1])
tag = (out / "checkpoints" / "latest").read_text().strip()
m = re.fullmatch(r"step_(\d+)", tag)
if not m:
    sys.exit(f"{out}/checkpoints/latest: tag {tag!r} is not of the form step_N")
try:
    max_steps = int(yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"])
except (OSError, KeyError, TypeError, ValueError) as e:
    sys.exit(f"{out}/config.yaml: cannot read train.max_steps ({e!r})")
print("finished" if int(m.group(1)) >= max_steps else "unfinished")
EOF
}

# check_max_restarts: MAX_RESTARTS [50] must be a non-negative integer before it reaches bash arithmetic
# (where "abc" would silently be 0 and "08" an octal error); checked at submission and before a requeue.
check_max_restarts() {
  [[ ${MAX_RESTARTS:-50} =~ ^[0-9]+$ ]] ||
    die "MAX_RESTARTS='${MAX_RESTARTS}' must be a non-negative integer (requeues after a stop before train.max_steps; default 50)"
}

# after_training OUT_DIR STATUS: a failed step fails the job (no requeue loop on a crash); a clean stop
# before max_steps (the trainer saved on SIGUSR1/SIGTERM) requeues the job, which resumes from latest.
after_training() {
  local out=$1 status=$2 state
  if ((status != 0)); then
    # srun names the culprit above: "srun: error: <node>: task <N>: <how it ended>" (task N = RANK N)
    log "training exited with status $status; not requeueing (the first 'srun: error: <node>: task <N>' line above names the rank that failed, task N = RANK N, and its node; fix the cause, then resubmit: it resumes from $out/checkpoints/latest)"
    exit "$status"
  fi
  if is_dry; then
    printf '+ # then: finished (latest step >= train.max_steps) -> next phase; else scontrol requeue %s\n' "$SLURM_JOB_ID"
    return 0
  fi
  state=$(training_state "$out") || die "cannot tell whether $out finished (see the message above)"
  case $state in
    finished) log "finished: $out/checkpoints/$(cat "$out/checkpoints/latest")" ;;
    unfinished)
      local restarts=${SLURM_RESTART_COUNT:-0}
      check_max_restarts
      ((10#$restarts < 10#${MAX_RESTARTS:-50})) ||
        die "stopped early again after $restarts restarts (MAX_RESTARTS=${MAX_RESTARTS:-50}); not requeueing"
      log "stopped at $(cat "$out/checkpoints/latest") before train.max_steps; requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))"
      run scontrol requeue "$SLURM_JOB_ID"
      exit 0
      ;;
    *) die "training exited 0 but left no checkpoint in $out/checkpoints; not requeueing" ;;
  esac
}
