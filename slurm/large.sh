#!/bin/bash
# BERT-large, the paper's recipe on BookCorpus + Wikipedia: phase 1 at seq 128, then phase 2 at seq 512
# initialised from phase 1 (configs/large_phase{1,2}.yaml). Everything is in slurm/pretrain.sh; this file
# only holds BERT-large's resource defaults. At these defaults it trains the paper's batch: 256 sequences
# per step = ds_configs/zero2.json's train_batch_size, i.e. micro 32 x 8 GPUs in phase 1 and, with
# ds_configs/zero2_seq512.json in phase 2, micro 8 x accumulation 4 x 8 GPUs. More nodes keep the 256
# (accumulation is derived) as long as micro x ranks divides it: 4 nodes x 8 GPUs need
# TRAIN_OVERRIDES=ds.train_micro_batch_size_per_gpu=8.
#
#   bash slurm/large.sh                 submit phase 1 and phase 2 (afterok dependency); env overrides:
#                                       NODES=8 GPUS_PER_NODE=4 TIME_LIMIT=12:00:00 OUT_DIR=... bash slurm/large.sh
#   PHASE=2 INIT_FROM=runs/x/phase1/checkpoints bash slurm/large.sh     phase 2 alone from a phase-1 checkpoint
#   sbatch slurm/large.sh               (from the repo root) both phases in one requeueing job, #SBATCH below
#   DRY_RUN=1 bash slurm/large.sh       print the sbatch calls and what every rank would run
#   CPU nodes: GPUS_PER_NODE=0 TASKS_PER_NODE=1 NODES=2 CPUS_PER_TASK=4 bash slurm/large.sh, or
#              sbatch -N2 --ntasks-per-node=1 -c4 --gpus-per-node=0 slurm/large.sh (overrides the GPU line below)
#
# The #SBATCH values equal the defaults below (tests/test_slurm.py checks it). `bash slurm/large.sh` does not
# use them: it passes every resource as an sbatch flag built from the environment (and submits
# slurm/pretrain.sh, which has no #SBATCH lines, so a CPU job gets no GPU request from here).
#SBATCH --job-name=bert-large
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@900
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
export MODEL=large JOB_NAME=${JOB_NAME:-bert-large} NODES=${NODES:-1} GPUS_PER_NODE=${GPUS_PER_NODE:-8}
export CPUS_PER_TASK=${CPUS_PER_TASK:-8} TIME_LIMIT=${TIME_LIMIT:-24:00:00}
# Under sbatch this file runs from a spool copy: the repo is the submit directory (or REPO_DIR).
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
[[ -f $REPO_DIR/slurm/pretrain.sh ]] || { echo "error: $REPO_DIR/slurm/pretrain.sh not found: submit from the repo root or set REPO_DIR" >&2; exit 1; }
export REPO_DIR
exec bash "$REPO_DIR/slurm/pretrain.sh" "$@"
