#!/usr/bin/env bash
# CIFAR-10 report: EMA-MAE (target = (1 - tau) target + tau online after every epoch, after a pixel-only warm-up of
# WSE epochs).
# Every row in turn on this node: pretraining, then fine-tuning and a linear probe
# (scripts/finetune/bootmae_tiny_cifar10.sh, scripts/linear/bootmae_tiny_cifar10_linprobe.sh).
# Rows (scripts/ablations/tables.py; README "Ablations" says what each changes and costs):
#   0  tau_0.005_wse_0   EMA-MAE, tau 0.005, WSE 0
#   1  tau_0.005_wse_5   EMA-MAE, tau 0.005, WSE 5
#   2  tau_0.005_wse_20  EMA-MAE, tau 0.005, WSE 20
#   3  tau_0.1_wse_5     EMA-MAE, tau 0.1, WSE 5
#   4  tau_0.3_wse_5     EMA-MAE, tau 0.3, WSE 5
# A row whose pretraining (its effective run_pretraining.py arguments) was trained before, by this table or
# another, reuses it and its evaluation.
#   DATA_PATH=/data/cifar bash scripts/ablations/report_ema_mae.sh              (GPUS GPUs, default 1)
#   DATA_PATH=/data/cifar bash scripts/ablations/report_ema_mae.sh --rows tau_0.3_wse_5
#   DATA_PATH=/data/cifar bash scripts/ablations/report_ema_mae.sh --dry_run    (each distinct pretraining, GPU-hours)
#   SMOKE=1 bash scripts/ablations/report_ema_mae.sh             (the same commands at toy size on the CPU)
# Each row writes $OUT/report_ema_mae/<row>/metrics.json (OUT default output/ablations; smoke: $OUT/smoke);
# rerunning skips finished rows and resumes the rest. Then: python scripts/ablations/gather.py report_ema_mae
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" scripts/ablations/run_table.py report_ema_mae ${SMOKE:+--smoke} \
    ${DATA_PATH:+--data_path "$DATA_PATH"} \
    --nproc "${GPUS:-1}" --out "${OUT:-output/ablations}" "$@"
