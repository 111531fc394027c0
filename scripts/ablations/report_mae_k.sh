#!/usr/bin/env bash
# CIFAR-10 report: MAE-K (target = frozen copy of the online encoder, refreshed every K epochs).
# Every row in turn on this node: pretraining, then fine-tuning and a linear probe
# (scripts/finetune/bootmae_tiny_cifar10.sh, scripts/linear/bootmae_tiny_cifar10_linprobe.sh).
# Rows (scripts/ablations/tables.py; README "Ablations" says what each changes and costs):
#   0  k_1   MAE-1
#   1  k_2   MAE-2
#   2  k_4   MAE-4
#   3  k_10  MAE-10
#   4  k_20  MAE-20
# A row whose pretraining (its effective run_pretraining.py arguments) was trained before, by this table or
# another, reuses it and its evaluation.
#   DATA_PATH=/data/cifar bash scripts/ablations/report_mae_k.sh              (GPUS GPUs, default 1)
#   DATA_PATH=/data/cifar bash scripts/ablations/report_mae_k.sh --rows k_20
#   DATA_PATH=/data/cifar bash scripts/ablations/report_mae_k.sh --dry_run    (each distinct pretraining, GPU-hours)
#   SMOKE=1 bash scripts/ablations/report_mae_k.sh             (the same commands at toy size on the CPU)
# Each row writes $OUT/report_mae_k/<row>/metrics.json (OUT default output/ablations; smoke: $OUT/smoke);
# rerunning skips finished rows and resumes the rest. Then: python scripts/ablations/gather.py report_mae_k
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" scripts/ablations/run_table.py report_mae_k ${SMOKE:+--smoke} \
    ${DATA_PATH:+--data_path "$DATA_PATH"} \
    --nproc "${GPUS:-1}" --out "${OUT:-output/ablations}" "$@"
