#!/usr/bin/env bash
# CIFAR-10 report: EMA-MAE (target = (1 - tau) target + tau online after every epoch, after a pixel-only warm-up of WSE epochs): every row, one after the other, on this node (pretraining + fine-tuning + linear probe (scripts/finetune/bootmae_tiny_cifar10.sh, scripts/linear/bootmae_tiny_cifar10_linprobe.sh)).
# Rows (scripts/ablations/tables.py):
#   0  tau_0.005_wse_0        EMA-MAE, tau 0.005, WSE 0
#   1  tau_0.005_wse_5        EMA-MAE, tau 0.005, WSE 5
#   2  tau_0.005_wse_20       EMA-MAE, tau 0.005, WSE 20
#   3  tau_0.1_wse_5          EMA-MAE, tau 0.1, WSE 5
#   4  tau_0.3_wse_5          EMA-MAE, tau 0.3, WSE 5
#   DATA_PATH=/data/cifar bash scripts/ablations/report_ema_mae.sh                    ($GPUS GPUs, default 1)
#   ... bash scripts/ablations/report_ema_mae.sh --rows tau_0.005_wse_0               (chosen rows; --dry_run prints the commands)
# Each row writes $OUT/report_ema_mae/<row>/metrics.json (OUT default output/ablations); rerunning skips finished rows
# and resumes pretraining. Then: python scripts/ablations/gather.py report_ema_mae
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" scripts/ablations/run_table.py report_ema_mae \
    --data_path "${DATA_PATH:?set DATA_PATH to the CIFAR-10 folder (cifar-10-batches-py/)}" \
    ${MAE_CHECKPOINT:+--mae_checkpoint "$MAE_CHECKPOINT"} \
    --nproc "${GPUS:-1}" --out "${OUT:-output/ablations}" "$@"
