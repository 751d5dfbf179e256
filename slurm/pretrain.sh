#!/bin/bash
# BERT pretraining on Slurm, parameterised by MODEL (base|large). Use it through slurm/large.sh or
# slurm/base.sh, which hold the #SBATCH defaults of each model and exec this file. Two modes:
#
#   outside a job (no SLURM_JOB_ID)  -> submitter: sbatch phase 1 (seq 128), then phase 2 (seq 512) with
#                                       --dependency=afterok:<phase 1>; resources from the env variables
#                                       below, passed as sbatch flags (#SBATCH lines cannot read env vars).
#                                       PHASE=1 or PHASE=2 submits only that phase (phase 2 alone starts
#                                       from INIT_FROM, a phase-1 checkpoint folder).
#   inside a job (SLURM_JOB_ID set) -> job body: run PHASE (1, 2, or all = 1 then 2 in one job, the
#                                       default for a plain `sbatch slurm/large.sh`) with one srun task per
#                                       GPU. A stop on --signal (the ranks save at the next step and exit 0)
#                                       requeues the job, which resumes from checkpoints/latest.
#
# Settings (environment; defaults in brackets):
#   NODES GPUS_PER_NODE CPUS_PER_TASK TIME_LIMIT JOB_NAME   resources [from the wrapper]; GPUS_PER_NODE=0 is a
#                                       CPU node: no GPU request, TASKS_PER_NODE ranks per node [1]
#   TASKS_PER_NODE [GPUS_PER_NODE, or 1 on CPU nodes]   ranks per node (one per GPU: must equal GPUS_PER_NODE)
#   Inside a job the allocation wins (SLURM_JOB_NUM_NODES, SLURM_NTASKS_PER_NODE, SLURM_CPUS_PER_TASK).
#   SIGNAL [USR1; TERM with LAUNCHER=deepspeed]  SIGNAL_SECS [900]   warning signal before the time limit
#   OUT_DIR [runs/bert-$MODEL]: phase1/ and phase2/ below it are the trainer's output_dir (checkpoints,
#           tensorboard, metrics.jsonl) — fixed, so requeues continue the same TensorBoard run
#   LOG_DIR [$OUT_DIR/logs]: per-job Slurm log files %x-%j.out (appended across requeues)
#   DATA_DIR [shards]  DATA_PHASE1 [$DATA_DIR/seq128]  DATA_PHASE2 [$DATA_DIR/seq512]  (slurm/build_shards.sh)
#   RUN_CONFIG [configs/${MODEL}_phase1.yaml]  RUN_CONFIG_PHASE2 [configs/${MODEL}_phase2.yaml]
#   DS_CONFIG [ds_configs/zero2.json]  DS_CONFIG_PHASE2 [ds_configs/zero2_seq512.json]: the batch (256
#           sequences per step, accumulation derived for the rank count), optimizer and precision
#   INIT_FROM [$OUT_DIR/phase1/checkpoints]: phase 2's initial weights (used until phase 2 has a checkpoint)
#   TRAIN_OVERRIDES: extra "key.sub=value ..." for launcher/pretrain.py (both phases)
#   LAUNCHER [srun] | deepspeed (hostfile from the node list; DS_SSH=1 for pdsh instead of srun per node)
#   VENV, MODULES, PYTHON [python], MAX_RESTARTS [50], SBATCH_ARGS (extra sbatch flags, e.g. --partition=gpu)
#   DRY_RUN=1: print every command (sbatch calls, and per rank what each task runs) without running any.
set -euo pipefail
: "${REPO_DIR:?run slurm/large.sh or slurm/base.sh (they set REPO_DIR and the model defaults)}"
# shellcheck source=SCRIPTDIR/common.sh
source "$REPO_DIR/slurm/common.sh"

MODEL=${MODEL:?MODEL must be base or large (set by slurm/base.sh / slurm/large.sh)}
PHASE=${PHASE:-all}
NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
if [[ $GPUS_PER_NODE == 0 ]]; then TASKS_PER_NODE=${TASKS_PER_NODE:-1}; else TASKS_PER_NODE=${TASKS_PER_NODE:-$GPUS_PER_NODE}; fi
CPUS_PER_TASK=${CPUS_PER_TASK:-}
TIME_LIMIT=${TIME_LIMIT:-24:00:00}
JOB_NAME=${JOB_NAME:-bert-$MODEL}
LAUNCHER=${LAUNCHER:-srun}
if [[ $LAUNCHER == deepspeed ]]; then SIGNAL=${SIGNAL:-TERM}; else SIGNAL=${SIGNAL:-USR1}; fi
# 15 min: the longest step at seq 512 plus a full ZeRO checkpoint of BERT-large (~4 GB of optimizer
# state per 1/N shard) to a shared file system, with margin.
SIGNAL_SECS=${SIGNAL_SECS:-900}
OUT_DIR=${OUT_DIR:-$REPO_DIR/runs/bert-$MODEL}
LOG_DIR=${LOG_DIR:-$OUT_DIR/logs}
DATA_DIR=${DATA_DIR:-$REPO_DIR/shards}
DATA_PHASE1=${DATA_PHASE1:-$DATA_DIR/seq128}
DATA_PHASE2=${DATA_PHASE2:-$DATA_DIR/seq512}
RUN_CONFIG=${RUN_CONFIG:-$REPO_DIR/configs/${MODEL}_phase1.yaml}
RUN_CONFIG_PHASE2=${RUN_CONFIG_PHASE2:-$REPO_DIR/configs/${MODEL}_phase2.yaml}
DS_CONFIG=${DS_CONFIG:-$REPO_DIR/ds_configs/zero2.json}
DS_CONFIG_PHASE2=${DS_CONFIG_PHASE2:-$REPO_DIR/ds_configs/zero2_seq512.json}
INIT_FROM=${INIT_FROM:-$OUT_DIR/phase1/checkpoints}
TRAIN_OVERRIDES=${TRAIN_OVERRIDES:-}
SETTINGS=(MODEL PHASE NODES GPUS_PER_NODE TASKS_PER_NODE CPUS_PER_TASK TIME_LIMIT JOB_NAME LAUNCHER SIGNAL SIGNAL_SECS
  OUT_DIR LOG_DIR DATA_PHASE1 DATA_PHASE2 RUN_CONFIG RUN_CONFIG_PHASE2 DS_CONFIG DS_CONFIG_PHASE2 INIT_FROM
  TRAIN_OVERRIDES REPO_DIR)

# ---------------------------------------------------------------------------------------------------------
# Job body
phase_dir() { echo "$OUT_DIR/phase$1"; }

# train_phase 1|2: run one phase to its end or to a stop; requeues the job on a stop (does not return then).
train_phase() {
  local phase=$1 out cfg data ds state
  local -a extra=()
  out=$(phase_dir "$phase")
  if [[ $phase == 1 ]]; then
    cfg=$RUN_CONFIG data=$DATA_PHASE1 ds=$DS_CONFIG
  else
    cfg=$RUN_CONFIG_PHASE2 data=$DATA_PHASE2 ds=$DS_CONFIG_PHASE2
    # Phase 2 starts from phase 1's weights only until it has its own checkpoint; after a requeue it
    # resumes (weights, optimizer, schedule, data position) from its own latest instead, and init_from
    # is cleared so the YAML's value cannot load phase-1 weights over it.
    if [[ -f $out/checkpoints/latest ]]; then
      extra+=("train.init_from=null")
    else
      is_dry || [[ -f $INIT_FROM/latest ]] ||
        die "phase 2 starts from a phase-1 checkpoint, but $INIT_FROM/latest does not exist (set INIT_FROM=<phase-1 output_dir>/checkpoints)"
      extra+=("train.init_from=$INIT_FROM")
    fi
  fi
  if ! is_dry; then
    state=$(training_state "$out") || die "cannot read the state of $out"
    if [[ $state == finished ]]; then
      log "phase $phase already finished in $out; skipping"
      return 0
    fi
    mkdir -p "$out"
  fi
  local -a overrides
  split_words overrides "$TRAIN_OVERRIDES"
  log "phase $phase: $WORLD ranks on ${HOSTS[*]} -> $out"
  local status=0
  launch_ranks "$out" "$REPO_DIR/launcher/pretrain.py" --deepspeed "$ds" --config "$cfg" \
    "train.output_dir=$out" "data.train=$data" "data.valid=$data" train.resume=auto \
    "${extra[@]}" "${overrides[@]}" || status=$?
  after_training "$out" "$status"
}

job_body() {
  setup_environment
  resolve_allocation
  log "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${HOSTS[*]}: $WORLD ranks ($NNODES node(s) x $TASKS_PER_NODE task(s), ${CPUS_PER_TASK:-default} CPU(s) per task), master $MASTER_ADDR:$MASTER_PORT"
  # the allocation's values, not the wrapper's defaults (NODES, GPUS_PER_NODE are what a submission asks for)
  local -a shown=()
  local name
  for name in "${SETTINGS[@]}"; do
    case $name in NODES | GPUS_PER_NODE | TASKS_PER_NODE | CPUS_PER_TASK) ;; *) shown+=("$name") ;; esac
  done
  print_settings NNODES TASKS_PER_NODE CPUS_PER_TASK SLURM_GPUS_PER_NODE "${shown[@]}" OMP_NUM_THREADS NCCL_DEBUG \
    TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_SOCKET_IFNAME NCCL_IB_HCA GLOO_SOCKET_IFNAME VENV PYTHON
  case $PHASE in
    1 | 2) train_phase "$PHASE" ;;
    all) train_phase 1 && train_phase 2 ;;
    *) die "PHASE='$PHASE': expected 1, 2 or all" ;;
  esac
  log "done: phase(s) $PHASE of $OUT_DIR"
}

# ---------------------------------------------------------------------------------------------------------
# Submitter
# submit PHASE DEPENDENCY_JOB_ID|"" -> prints the new job id. The job script is pretrain.sh itself, which
# has no #SBATCH lines: every resource is one of the flags below. (Submitting the wrapper would add its
# header's defaults, e.g. --gpus-per-node=8, to a CPU job that asked for none.) REPO_DIR, MODEL and every
# setting reach the job through --export=ALL.
submit() {
  local phase=$1 dep=$2
  local -a flags=(--job-name="$JOB_NAME-phase$phase" --nodes="$NODES")
  ((GPUS_PER_NODE > 0)) && flags+=(--gpus-per-node="$GPUS_PER_NODE")
  flags+=(--ntasks-per-node="$TASKS_PER_NODE" --time="$TIME_LIMIT" --signal="$SIGNAL@$SIGNAL_SECS" --requeue
    --open-mode=append --output="$LOG_DIR/%x-%j.out" --export="ALL,PHASE=$phase")
  [[ -n $CPUS_PER_TASK ]] && flags+=(--cpus-per-task="$CPUS_PER_TASK")
  sbatch_submit "phase$phase" "$dep" "$REPO_DIR/slurm/pretrain.sh" "${flags[@]}"
}

# preview_body PHASE: under DRY_RUN, what the job would run, on example hosts node1..nodeN.
preview_body() {
  local hosts=() i
  for ((i = 1; i <= NODES; i++)); do hosts+=("node$i"); done
  printf '\n# job body of phase %s, shown for an example allocation (hosts %s, job id 1000):\n' "$1" "${hosts[*]}"
  (PHASE=$1 SLURM_JOB_ID=1000 SLURM_JOB_NUM_NODES=$NODES SLURM_NTASKS_PER_NODE=$TASKS_PER_NODE \
    SLURM_CPUS_PER_TASK=$CPUS_PER_TASK PREVIEW_HOSTS="${hosts[*]}" job_body)
}

submitter() {
  check_max_restarts
  [[ $GPUS_PER_NODE =~ ^[0-9]+$ ]] || die "GPUS_PER_NODE='$GPUS_PER_NODE' must be a number (0 for CPU nodes)"
  [[ $TASKS_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "TASKS_PER_NODE='$TASKS_PER_NODE' must be a positive number"
  ((GPUS_PER_NODE == 0 || TASKS_PER_NODE == GPUS_PER_NODE)) ||
    die "TASKS_PER_NODE=$TASKS_PER_NODE with GPUS_PER_NODE=$GPUS_PER_NODE: one rank per GPU (leave TASKS_PER_NODE unset)"
  # Absolute paths: the job must see exactly what is echoed here, whatever its working directory.
  local name
  for name in OUT_DIR LOG_DIR DATA_PHASE1 DATA_PHASE2 RUN_CONFIG RUN_CONFIG_PHASE2 DS_CONFIG DS_CONFIG_PHASE2 INIT_FROM; do
    [[ ${!name} == /* ]] || printf -v "$name" '%s' "$PWD/${!name}"
  done
  export "${SETTINGS[@]}"
  exec 3>&1
  log "submitting BERT-$MODEL phase(s) $PHASE:"
  print_settings "${SETTINGS[@]}"
  local missing=()
  for name in RUN_CONFIG RUN_CONFIG_PHASE2 DS_CONFIG DS_CONFIG_PHASE2; do
    [[ -f ${!name} ]] || missing+=("$name=${!name}")
  done
  ((${#missing[@]} == 0)) || die "missing file(s): ${missing[*]}"
  check_signal_lead "$TIME_LIMIT" "$SIGNAL" "$SIGNAL_SECS"
  is_dry || mkdir -p "$LOG_DIR"
  local p1="" p2=""
  case $PHASE in
    all)
      p1=$(submit 1 "")
      p2=$(submit 2 "$p1")
      log "phase 1: job $p1; phase 2: job $p2 (starts after $p1 succeeds; init from $INIT_FROM)"
      ;;
    1)
      p1=$(submit 1 "")
      log "phase 1: job $p1"
      ;;
    2)
      is_dry || [[ -f $INIT_FROM/latest ]] || [[ -f $(phase_dir 2)/checkpoints/latest ]] ||
        die "phase 2 alone needs a phase-1 checkpoint: $INIT_FROM/latest not found (set INIT_FROM=<phase-1 output_dir>/checkpoints)"
      p2=$(submit 2 "")
      log "phase 2: job $p2 (init from $INIT_FROM)"
      ;;
    *) die "PHASE='$PHASE': expected 1, 2 or all" ;;
  esac
  log "logs: $LOG_DIR/<job-name>-<job-id>.out   TensorBoard: tensorboard --logdir $OUT_DIR"
  if is_dry; then
    [[ -n $p1 ]] && preview_body 1
    [[ -n $p2 ]] && preview_body 2
  fi
  return 0
}

if [[ -n ${SLURM_JOB_ID:-} ]]; then
  job_body
else
  submitter
fi
