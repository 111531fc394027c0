#!/usr/bin/env bash
# torchrun on one node (or several: NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0>):
#   bash detection/dist_train.sh CONFIG GPUS [--pretrained CKPT] [--work-dir DIR] [--amp] ...
exec bash "$(dirname "$0")/../scripts/downstream.sh" detection dist_train "$@"
