#!/usr/bin/env bash
# Paper Table 9: MAE with pixel or (fixed MAE) feature targets.
# Every row in turn on this node: pretraining, then fine-tuning (scripts/finetune/bootmae_base_finetune.sh).
# Rows (scripts/ablations/tables.py; README "Ablations" says what each changes and costs):
#   0  pixel_300    MAE, pixel target, 300 epochs
#   1  pixel_800    MAE, pixel target, 800 epochs
#   2  pixel_1600   MAE, pixel target, 1600 epochs
#   3  feature_300  MAE, feature target, 300 epochs
#   4  feature_800  MAE, feature target, 800 epochs
# A row whose pretraining (its effective run_pretraining.py arguments) was trained before, by this table or
# another, reuses it and its evaluation.
# The feature-target rows predict Table 1's MAE-800 encoder: it is trained first when missing
# (MAE_CHECKPOINT=/path/mae_800.pth gives another).
#   DATA_PATH=/data/imagenet bash scripts/ablations/paper_t9.sh              (GPUS GPUs, default 8)
#   DATA_PATH=/data/imagenet bash scripts/ablations/paper_t9.sh --rows feature_800
#   DATA_PATH=/data/imagenet bash scripts/ablations/paper_t9.sh --dry_run    (each distinct pretraining, GPU-hours)
#   SMOKE=1 bash scripts/ablations/paper_t9.sh             (the same commands at toy size on the CPU)
# Each row writes $OUT/paper_t9/<row>/metrics.json (OUT default output/ablations; smoke: $OUT/smoke);
# rerunning skips finished rows and resumes the rest. Then: python scripts/ablations/gather.py paper_t9
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" scripts/ablations/run_table.py paper_t9 ${SMOKE:+--smoke} \
    ${DATA_PATH:+--data_path "$DATA_PATH"} \
    ${MAE_CHECKPOINT:+--mae_checkpoint "$MAE_CHECKPOINT"} \
    --nproc "${GPUS:-8}" --out "${OUT:-output/ablations}" "$@"
