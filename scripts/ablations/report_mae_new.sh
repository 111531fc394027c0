#!/usr/bin/env bash
# CIFAR-10 report: MAE-new (L = L_fast + 0.2 L_slow, fast = EMA-MAE, slow = MAE-5).
# Every row in turn on this node: pretraining, then fine-tuning and a linear probe
# (scripts/finetune/bootmae_tiny_cifar10.sh, scripts/linear/bootmae_tiny_cifar10_linprobe.sh).
# Rows (scripts/ablations/tables.py; README "Ablations" says what each changes and costs):
#   0  mae_5    MAE-5
#   1  ema_mae  MAE-5-0.005 (EMA-MAE, tau 0.005, WSE 5)
#   2  mae_new  MAE-new (lambda 0.2)
# A row whose pretraining (its effective run_pretraining.py arguments) was trained before, by this table or
# another, reuses it and its evaluation.
#   DATA_PATH=/data/cifar bash scripts/ablations/report_mae_new.sh              (GPUS GPUs, default 1)
#   DATA_PATH=/data/cifar bash scripts/ablations/report_mae_new.sh --rows mae_new
#   DATA_PATH=/data/cifar bash scripts/ablations/report_mae_new.sh --dry_run    (each distinct pretraining, GPU-hours)
#   SMOKE=1 bash scripts/ablations/report_mae_new.sh             (the same commands at toy size on the CPU)
# Each row writes $OUT/report_mae_new/<row>/metrics.json (OUT default output/ablations; smoke: $OUT/smoke);
# rerunning skips finished rows and resumes the rest. Then: python scripts/ablations/gather.py report_mae_new
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" scripts/ablations/run_table.py report_mae_new ${SMOKE:+--smoke} \
    ${DATA_PATH:+--data_path "$DATA_PATH"} \
    --nproc "${GPUS:-1}" --out "${OUT:-output/ablations}" "$@"
