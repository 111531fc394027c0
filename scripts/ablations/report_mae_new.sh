#!/usr/bin/env bash
# CIFAR-10 report: MAE-new (L = L_fast + 0.2 L_slow, fast = EMA-MAE, slow = MAE-5): every row, one after the other, on this node (pretraining + fine-tuning + linear probe (scripts/finetune/bootmae_tiny_cifar10.sh, scripts/linear/bootmae_tiny_cifar10_linprobe.sh)).
# Rows (scripts/ablations/tables.py):
#   0  mae_5                  MAE-5
#   1  ema_mae                MAE-5-0.005 (EMA-MAE, tau 0.005, WSE 5)
#   2  mae_new                MAE-new (lambda 0.2)
#   DATA_PATH=/data/cifar bash scripts/ablations/report_mae_new.sh                    ($GPUS GPUs, default 1)
#   ... bash scripts/ablations/report_mae_new.sh --rows mae_5               (chosen rows; --dry_run prints the commands)
# Each row writes $OUT/report_mae_new/<row>/metrics.json (OUT default output/ablations); rerunning skips finished rows
# and resumes pretraining. Then: python scripts/ablations/gather.py report_mae_new
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" scripts/ablations/run_table.py report_mae_new \
    --data_path "${DATA_PATH:?set DATA_PATH to the CIFAR-10 folder (cifar-10-batches-py/)}" \
    ${MAE_CHECKPOINT:+--mae_checkpoint "$MAE_CHECKPOINT"} \
    --nproc "${GPUS:-1}" --out "${OUT:-output/ablations}" "$@"
