#!/usr/bin/env bash
# torchrun on one node (or several: NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0>):
#   bash detection/dist_test.sh CONFIG CHECKPOINT GPUS [--work-dir DIR] ...
set -euo pipefail
CONFIG=${1:?usage: dist_test.sh CONFIG CHECKPOINT GPUS [args...]}
CHECKPOINT=${2:?usage: dist_test.sh CONFIG CHECKPOINT GPUS [args...]}
GPUS=${3:?usage: dist_test.sh CONFIG CHECKPOINT GPUS [args...]}
shift 3
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PYTHON" -m torch.distributed.run \
    --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" \
    --master_port "${MASTER_PORT:-29500}" --nproc_per_node "$GPUS" \
    "$ROOT/detection/test.py" "$CONFIG" "$CHECKPOINT" --launcher pytorch "$@"
