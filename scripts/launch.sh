#!/usr/bin/env bash
# The torchrun / slurm set-up every recipe shares. A recipe sources this file and calls one launcher with its
# entry point (a path from the repository root) and flags:
#   launch_nodes ENTRY FLAGS...   torchrun over NNODES nodes x GPUS processes (NODE_RANK, MASTER_ADDR, MASTER_PORT;
#                                 run it on every node), one OpenMP thread per process (LAUNCH_THREADS to change)
#   launch_local ENTRY FLAGS...   torchrun --standalone with NPROC processes on this machine (OMP_NUM_THREADS: 4)
#   launch_slurm ENTRY FLAGS...   srun, one task per GPU of the allocation; the entry points read SLURM_PROCID /
#                                 SLURM_NTASKS / SLURM_LOCALID, MASTER_ADDR is the allocation's first node
#   total_batch TOTAL BATCH       BATCH images per process unless BATCH is set, and ACCUM, the steps to accumulate so
#                                 that NNODES x GPUS x BATCH x ACCUM = TOTAL (at least 1)
# Sourcing it sets -euo pipefail and moves to the repository root it lies in (a slurm job sources it from the
# folder it was submitted from), unless LAUNCH_NO_CD is set; PYTHON is the interpreter (.venv/bin/python unless set).
set -euo pipefail
LAUNCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ -n "${LAUNCH_NO_CD:-}" ] || cd "$LAUNCH_ROOT"
PYTHON=${PYTHON:-$LAUNCH_ROOT/.venv/bin/python}
NNODES=${NNODES:-1}; NODE_RANK=${NODE_RANK:-0}; GPUS=${GPUS:-8}; NPROC=${NPROC:-1}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}; MASTER_PORT=${MASTER_PORT:-29500}

total_batch() {
    BATCH=${BATCH:-$2}
    ACCUM=$(( $1 / (NNODES * GPUS * BATCH) ))
    [ "$ACCUM" -ge 1 ] || ACCUM=1
}

launch_nodes() {
    OMP_NUM_THREADS=${LAUNCH_THREADS:-1} exec "$PYTHON" -m torch.distributed.run \
        --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS" \
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$@"
}

launch_local() {
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} exec "$PYTHON" -m torch.distributed.run --standalone \
        --nproc_per_node "$NPROC" "$@"
}

launch_slurm() {
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    export MASTER_ADDR MASTER_PORT OMP_NUM_THREADS=1
    exec srun "$PYTHON" "$@"
}
