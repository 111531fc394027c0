#!/usr/bin/env bash
# CIFAR-10 report: MAE baseline.
# Every row in turn on this node: pretraining, then fine-tuning and a linear probe
# (scripts/finetune/bootmae_tiny_cifar10.sh, scripts/linear/bootmae_tiny_cifar10_linprobe.sh).
# Rows (scripts/ablations/tables.py; README "Ablations" says what each changes and costs):
#   0  none     no pretraining
#   1  mae      MAE
#   2  bootmae  BootMAE (the release's, for comparison; not in the report)
# A row whose pretraining (its effective run_pretraining.py arguments) was trained before, by this table or
# another, reuses it and its evaluation.
#   DATA_PATH=/data/cifar bash scripts/ablations/report_mae.sh              (GPUS GPUs, default 1)
#   DATA_PATH=/data/cifar bash scripts/ablations/report_mae.sh --rows bootmae
#   DATA_PATH=/data/cifar bash scripts/ablations/report_mae.sh --dry_run    (each distinct pretraining, GPU-hours)
#   SMOKE=1 bash scripts/ablations/report_mae.sh             (the same commands at toy size on the CPU)
# Each row writes $OUT/report_mae/<row>/metrics.json (OUT default output/ablations; smoke: $OUT/smoke);
# rerunning skips finished rows and resumes the rest. Then: python scripts/ablations/gather.py report_mae
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" scripts/ablations/run_table.py report_mae ${SMOKE:+--smoke} \
    ${DATA_PATH:+--data_path "$DATA_PATH"} \
    --nproc "${GPUS:-1}" --out "${OUT:-output/ablations}" "$@"
