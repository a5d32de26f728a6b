#!/bin/bash
# One training process per Slurm task: map Slurm's task variables to the env:// rendezvous that
# deepspeed.init_distributed / torch.distributed read, then exec the command (exec keeps the PID, so the
# signals srun forwards reach the Python process itself).
set -euo pipefail
export RANK="${SLURM_PROCID:?task.sh runs under srun}"
export WORLD_SIZE="${SLURM_NTASKS:?task.sh runs under srun}"
export LOCAL_RANK="${SLURM_LOCALID:?task.sh runs under srun}"
export LOCAL_WORLD_SIZE="${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE%%(*}}"
export NODE_RANK="${SLURM_NODEID:-0}"
export MASTER_ADDR="${MASTER_ADDR:?set MASTER_ADDR in the batch script}"
export MASTER_PORT="${MASTER_PORT:?set MASTER_PORT in the batch script}"
exec "$@"
