#!/usr/bin/env bash
# torchrun on one node (or several: NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0>):
#   bash semantic_segmentation/dist_train.sh CONFIG GPUS [--pretrained CKPT] [--work-dir DIR] [--amp] ...
set -euo pipefail
CONFIG=${1:?usage: dist_train.sh CONFIG GPUS [args...]}
GPUS=${2:?usage: dist_train.sh CONFIG GPUS [args...]}
shift 2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PYTHON" -m torch.distributed.run \
    --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" \
    --master_port "${MASTER_PORT:-29500}" --nproc_per_node "$GPUS" \
    "$ROOT/semantic_segmentation/train.py" "$CONFIG" --launcher pytorch "$@"
