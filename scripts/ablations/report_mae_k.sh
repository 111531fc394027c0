#!/usr/bin/env bash
# CIFAR-10 report: MAE-K (target = frozen copy of the online encoder, refreshed every K epochs): every row, one after the other, on this node (pretraining + fine-tuning + linear probe (scripts/finetune/bootmae_tiny_cifar10.sh, scripts/linear/bootmae_tiny_cifar10_linprobe.sh)).
# Rows (scripts/ablations/tables.py):
#   0  k_1                    MAE-1
#   1  k_2                    MAE-2
#   2  k_4                    MAE-4
#   3  k_10                   MAE-10
#   4  k_20                   MAE-20
#   DATA_PATH=/data/cifar bash scripts/ablations/report_mae_k.sh                    ($GPUS GPUs, default 1)
#   ... bash scripts/ablations/report_mae_k.sh --rows k_1               (chosen rows; --dry_run prints the commands)
# Each row writes $OUT/report_mae_k/<row>/metrics.json (OUT default output/ablations); rerunning skips finished rows
# and resumes pretraining. Then: python scripts/ablations/gather.py report_mae_k
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" scripts/ablations/run_table.py report_mae_k \
    --data_path "${DATA_PATH:?set DATA_PATH to the CIFAR-10 folder (cifar-10-batches-py/)}" \
    ${MAE_CHECKPOINT:+--mae_checkpoint "$MAE_CHECKPOINT"} \
    --nproc "${GPUS:-1}" --out "${OUT:-output/ablations}" "$@"
