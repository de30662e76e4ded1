#!/usr/bin/env bash
# Multi-node training under Slurm: one `accelerate launch` per node, 8 GPUs each, rendezvous on the first
# node. Usage (the recipe's distributed section picks DDP / DeepSpeed ZeRO / FSDP2):
#
#   sbatch --nodes 8 scripts/slurm_train.sh recipes/llama2-7b.yaml [key=value ...]
#
# Preemption: Slurm sends SIGTERM (here 120 s before the time limit, see --signal); adapt finishes the
# step, writes a checkpoint and exits 143; requeue the job and it resumes (resume=auto is passed below).
#SBATCH --job-name=adapt-train
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: sbatch --nodes N scripts/slurm_train.sh RECIPE [key=value ...]" >&2
    exit 2
fi
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} TOKENIZERS_PARALLELISM=false

# srun starts one launcher per node; each starts GPUS_PER_NODE training processes. Slurm's SIGTERM goes
# to the job step (the launchers), which forward it to every training process; all checkpoint at one step.
srun --kill-on-bad-exit=1 bash -c "accelerate launch \
    --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
    --machine_rank \$SLURM_NODEID --main_process_ip $MASTER_ADDR --main_process_port $MASTER_PORT \
    --rdzv_backend static --same_network \
    -m adapt train $* resume=auto"
