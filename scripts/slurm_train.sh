#!/bin/bash
# Multi-node training under Slurm: one torchrun per node, each starting one process per
# GPU; torchrun's c10d rendezvous on the first node joins them (README "Distributed
# training"). Submit from the repository root:
#
#   sbatch --nodes=2 scripts/slurm_train.sh --config configs/gpt2-small.toml \
#          --parallel.dp_replicate=2 --parallel.dp_shard=-1
#
# Arguments after the script name go to `scaletrain train`. A requeued or resubmitted
# job with the same RUN resumes from its newest checkpoint (checkpoint.resume = "auto").
#SBATCH --job-name=scaletrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one torchrun launcher per node
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=TERM@120            # SIGTERM 2 min before the limit: save, then exit
#SBATCH --output=slurm-%j.out

set -euo pipefail
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
RUN=${RUN:-runs/slurm-${SLURM_JOB_NAME}}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${PORT:-29500}

# Threads per process: the node's cores split over its ranks (data loading is threads).
export OMP_NUM_THREADS=$(( SLURM_CPUS_PER_TASK / GPUS_PER_NODE ))

srun --kill-on-bad-exit=1 .venv/bin/python -m torch.distributed.run \
    --nnodes="$SLURM_NNODES" --nproc-per-node="$GPUS_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$HEAD:$PORT" --rdzv-id="$SLURM_JOB_ID" \
    -m scaletrain train --run.dir="$RUN" "$@"
