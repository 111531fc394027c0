#!/usr/bin/env bash
# torchrun on one node (or several: NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0>):
#   bash semantic_segmentation/dist_test.sh CONFIG CHECKPOINT GPUS [--tta] [--work-dir DIR] ...
exec bash "$(dirname "$0")/../scripts/downstream.sh" semantic_segmentation dist_test "$@"
