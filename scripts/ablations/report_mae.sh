#!/usr/bin/env bash
# CIFAR-10 report: MAE baseline: every row, one after the other, on this node (pretraining + fine-tuning + linear probe (scripts/finetune/bootmae_tiny_cifar10.sh, scripts/linear/bootmae_tiny_cifar10_linprobe.sh)).
# Rows (scripts/ablations/tables.py):
#   0  none                   no pretraining
#   1  mae                    MAE
#   2  bootmae                BootMAE (the release's, for comparison; not in the report)
#   DATA_PATH=/data/cifar bash scripts/ablations/report_mae.sh                    ($GPUS GPUs, default 1)
#   ... bash scripts/ablations/report_mae.sh --rows none               (chosen rows; --dry_run prints the commands)
# Each row writes $OUT/report_mae/<row>/metrics.json (OUT default output/ablations); rerunning skips finished rows
# and resumes pretraining. Then: python scripts/ablations/gather.py report_mae
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" scripts/ablations/run_table.py report_mae \
    --data_path "${DATA_PATH:?set DATA_PATH to the CIFAR-10 folder (cifar-10-batches-py/)}" \
    ${MAE_CHECKPOINT:+--mae_checkpoint "$MAE_CHECKPOINT"} \
    --nproc "${GPUS:-1}" --out "${OUT:-output/ablations}" "$@"
