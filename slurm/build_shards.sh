#!/bin/bash
# Shards at scale: tokenizer training, then an array job building disjoint slices of the corpus in
# parallel, then a dependent merge into the one shard folder the training loader reads.
#
#   bash slurm/build_shards.sh           submit:  tokenizer job
#                                                  -> per SEQ_LEN: array job (task I builds slice I of NUM_SLICES)
#                                                  -> merge job (afterok on the whole array)
#   sbatch slurm/build_shards.sh         (from the repo root) every stage serially in one job (STAGE=all)
#   DRY_RUN=1 bash slurm/build_shards.sh print the sbatch chain and every command each task would run
#
# Slice I holds the corpus blocks with index % NUM_SLICES == I (python -m data.build --num-slices
# --slice-index): disjoint, and every random draw is seeded from (SEED, global block index, split, pass),
# so each task has its own deterministic seed stream and the merged folder holds exactly the examples of a
# single-process build. Task I writes its own folder parts/seqL/slice-I (its own shard range); the merge
# renumbers the shards in slice order and writes one manifest.
#
# Settings (environment; defaults in brackets):
#   INPUTS ["hf:wikimedia/wikipedia:20231101.en hf:bookcorpus/bookcorpus"]  corpus specs, space-separated; a
#     Wikipedia dump works too (enwiki-DATE-pages-articles-multistream.xml.bz2 with its -index.txt.bz2 beside
#     it): each array task then decompresses only the bz2 streams of its own slice
#   DATA_DIR [shards]: tokenizer/, seq128/, seq512/ (what slurm/large.sh reads), parts/, logs/
#   TOKENIZER: an existing tokenizer (folder, tokenizer.json or vocab.txt) -> no tokenizer job. Without it, a
#     tokenizer already trained in DATA_DIR/tokenizer (an earlier submission) is reused, never retrained: the
#     slices and both sequence lengths must share one vocabulary. Delete that folder to train a new one.
#   VOCAB_SIZE [30522]  TOKENIZER_ARGS: extra flags of python -m data.tokenizer
#   SEQ_LENS ["128 512"]  NUM_SLICES [32]  SEED [12345]  DUPE_FACTOR [5]
#   BUILD_ARGS: extra flags of python -m data.build (later flags win, e.g. "--max-predictions 76")
#   CPUS_PER_TASK [32] (= data.build --workers)  TIME_LIMIT [04:00:00] per job  SBATCH_ARGS  VENV  MODULES
#SBATCH --job-name=bert-shards
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
[[ -f $REPO_DIR/slurm/common.sh ]] || { echo "error: $REPO_DIR/slurm/common.sh not found: submit from the repo root or set REPO_DIR" >&2; exit 1; }
export REPO_DIR
# shellcheck source=SCRIPTDIR/common.sh
source "$REPO_DIR/slurm/common.sh"

INPUTS=${INPUTS:-hf:wikimedia/wikipedia:20231101.en hf:bookcorpus/bookcorpus}
DATA_DIR=${DATA_DIR:-$REPO_DIR/shards}
TOKENIZER_GIVEN=${TOKENIZER:+1}
TOKENIZER=${TOKENIZER:-$DATA_DIR/tokenizer}
VOCAB_SIZE=${VOCAB_SIZE:-30522}
TOKENIZER_ARGS=${TOKENIZER_ARGS:-}
SEQ_LENS=${SEQ_LENS:-128 512}
NUM_SLICES=${NUM_SLICES:-32}
SEED=${SEED:-12345}
DUPE_FACTOR=${DUPE_FACTOR:-5}
BUILD_ARGS=${BUILD_ARGS:-}
CPUS_PER_TASK=${CPUS_PER_TASK:-32}
TIME_LIMIT=${TIME_LIMIT:-04:00:00}
JOB_NAME=${JOB_NAME:-bert-shards}
LOG_DIR=${LOG_DIR:-$DATA_DIR/logs}
STAGE=${STAGE:-all}
SETTINGS=(INPUTS DATA_DIR TOKENIZER TOKENIZER_GIVEN VOCAB_SIZE TOKENIZER_ARGS SEQ_LENS NUM_SLICES SEED
  DUPE_FACTOR BUILD_ARGS CPUS_PER_TASK TIME_LIMIT JOB_NAME LOG_DIR REPO_DIR)
[[ $NUM_SLICES =~ ^[1-9][0-9]*$ ]] || die "NUM_SLICES='$NUM_SLICES' must be a positive integer"

input_flags() {
  local -a specs
  local spec
  split_words specs "$INPUTS"
  ((${#specs[@]} > 0)) || die "INPUTS is empty: give corpus specs (files, folders, hf:NAME...)"
  for spec in "${specs[@]}"; do printf '%s\n' --input "$spec"; done
}

part_dir() { printf '%s/parts/seq%s/slice-%04d' "$DATA_DIR" "$1" "$2"; }  # SEQ_LEN SLICE

# A tokenizer trained by an earlier run of this script (not TOKENIZER=...): reused, never overwritten.
trained_tokenizer_exists() { [[ -z $TOKENIZER_GIVEN && -f $TOKENIZER/tokenizer.json ]]; }

# ---------------------------------------------------------------------------------------------------------
# Stages (run inside a job, or printed under DRY_RUN)
stage_tokenizer() {
  if trained_tokenizer_exists; then
    log "reusing the existing tokenizer $TOKENIZER (not retrained; delete it to train a new one)"
    return 0
  fi
  local -a inputs extra
  mapfile -t inputs < <(input_flags)
  split_words extra "$TOKENIZER_ARGS"
  run python -m data.tokenizer "${inputs[@]}" --out "$TOKENIZER" --vocab-size "$VOCAB_SIZE" "${extra[@]}"
}

# stage_build SEQ_LEN SLICE
stage_build() {
  local len=$1 slice=$2
  local -a inputs extra
  mapfile -t inputs < <(input_flags)
  split_words extra "$BUILD_ARGS"
  # Masked positions per sequence scale with its length, as Google/NVIDIA's recipe: 20 at 128, 80 at 512
  # (= len * 5 / 32, i.e. 15% of the tokens plus headroom for rounding).
  run python -m data.build "${inputs[@]}" --tokenizer "$TOKENIZER" --out "$(part_dir "$len" "$slice")" \
    --max-seq-len "$len" --max-predictions $((len * 5 / 32)) --dupe-factor "$DUPE_FACTOR" --seed "$SEED" \
    --num-slices "$NUM_SLICES" --slice-index "$slice" --workers "${SLURM_CPUS_PER_TASK:-$CPUS_PER_TASK}" \
    --no-progress "${extra[@]}"
}

# stage_merge SEQ_LEN
stage_merge() {
  local len=$1 i out=$DATA_DIR/seq$1
  local -a parts=()
  for ((i = 0; i < NUM_SLICES; i++)); do parts+=("$(part_dir "$len" "$i")"); done
  if ! is_dry && [[ -f $out/manifest.json ]]; then
    log "$out/manifest.json exists: seq $len already merged"
    return 0
  fi
  run python -m data.merge "$out" "${parts[@]}"
}

job_body() {
  setup_environment
  log "job ${SLURM_JOB_ID:-(preview)} stage $STAGE${SEQ_LEN:+ seq $SEQ_LEN}${SLURM_ARRAY_TASK_ID:+ slice $SLURM_ARRAY_TASK_ID}"
  print_settings "${SETTINGS[@]}" STAGE SEQ_LEN SLURM_ARRAY_TASK_ID OMP_NUM_THREADS VENV
  input_flags >/dev/null  # dies here (not in a subshell below) when INPUTS is empty
  local len i
  local -a lens
  case $STAGE in
    tokenizer) stage_tokenizer ;;
    build)
      [[ -n ${SEQ_LEN:-} && -n ${SLURM_ARRAY_TASK_ID:-} ]] || die "STAGE=build needs SEQ_LEN and an array task id"
      stage_build "$SEQ_LEN" "$SLURM_ARRAY_TASK_ID"
      ;;
    merge)
      [[ -n ${SEQ_LEN:-} ]] || die "STAGE=merge needs SEQ_LEN"
      stage_merge "$SEQ_LEN"
      ;;
    all)  # one job does everything in order (plain `sbatch slurm/build_shards.sh`)
      [[ -n $TOKENIZER_GIVEN ]] || stage_tokenizer
      split_words lens "$SEQ_LENS"
      for len in "${lens[@]}"; do
        for ((i = 0; i < NUM_SLICES; i++)); do stage_build "$len" "$i"; done
        stage_merge "$len"
      done
      ;;
    *) die "STAGE='$STAGE': expected tokenizer, build, merge or all" ;;
  esac
  log "stage $STAGE done"
}

# ---------------------------------------------------------------------------------------------------------
# Submitter
# submit NAME DEPENDENCY|"" EXPORTS [sbatch flags...] -> prints the job id
submit() {
  local name=$1 dep=$2 exports=$3
  shift 3
  sbatch_submit "$name" "$dep" "$REPO_DIR/slurm/build_shards.sh" --job-name="$JOB_NAME-$name" --nodes=1 \
    --ntasks=1 --cpus-per-task="$CPUS_PER_TASK" --time="$TIME_LIMIT" --open-mode=append \
    --export="ALL,$exports" "$@"
}

submitter() {
  local name
  for name in DATA_DIR TOKENIZER LOG_DIR; do
    [[ ${!name} == /* ]] || printf -v "$name" '%s' "$PWD/${!name}"
  done
  export "${SETTINGS[@]}"
  exec 3>&1
  log "submitting the shard build:"
  print_settings "${SETTINGS[@]}"
  input_flags >/dev/null
  if [[ -n $TOKENIZER_GIVEN ]]; then
    [[ -e $TOKENIZER ]] || die "TOKENIZER=$TOKENIZER does not exist"
  fi
  is_dry || mkdir -p "$LOG_DIR"
  local tok="" arr merge len
  local -a lens
  split_words lens "$SEQ_LENS"
  if trained_tokenizer_exists; then
    log "tokenizer: reusing the existing $TOKENIZER (no tokenizer job; delete it to train a new one)"
  elif [[ -z $TOKENIZER_GIVEN ]]; then
    tok=$(submit tokenizer "" STAGE=tokenizer --output="$LOG_DIR/%x-%j.out")
    log "tokenizer: job $tok -> $TOKENIZER"
  fi
  for len in "${lens[@]}"; do
    [[ $len =~ ^[0-9]+$ ]] || die "SEQ_LENS: '$len' is not a sequence length"
    arr=$(submit "seq$len-build" "$tok" "STAGE=build,SEQ_LEN=$len" --array="0-$((NUM_SLICES - 1))" \
      --output="$LOG_DIR/%x-%A_%a.out")
    merge=$(submit "seq$len-merge" "$arr" "STAGE=merge,SEQ_LEN=$len" --output="$LOG_DIR/%x-%j.out")
    log "seq $len: array job $arr ($NUM_SLICES slices) -> merge job $merge -> $DATA_DIR/seq$len"
  done
  if is_dry; then
    printf '\n# what the jobs run:\n'
    [[ -n $TOKENIZER_GIVEN ]] || stage_tokenizer
    local i
    for len in "${lens[@]}"; do
      for ((i = 0; i < NUM_SLICES; i++)); do stage_build "$len" "$i"; done
      stage_merge "$len"
    done
  fi
  return 0
}

if [[ -n ${SLURM_JOB_ID:-} ]]; then
  job_body
else
  submitter
fi
