#!/usr/bin/env bash
# Paper Table 3: masking strategy for pixel and feature targets (MAE, 300 epochs).
# Every row in turn on this node: pretraining, then fine-tuning (scripts/finetune/bootmae_base_finetune.sh).
# Rows (scripts/ablations/tables.py; README "Ablations" says what each changes and costs):
#   0  pixel_random     pixel target, random masking
#   1  pixel_block      pixel target, block-wise masking
#   2  pixel_release    pixel target, release-style masking (not in the paper)
#   3  feature_random   feature target (fixed MAE encoder), random masking
#   4  feature_block    feature target (fixed MAE encoder), block-wise masking
#   5  feature_release  feature target (fixed MAE encoder), release-style masking (not in the paper)
# A row whose pretraining (its effective run_pretraining.py arguments) was trained before, by this table or
# another, reuses it and its evaluation.
# The feature-target rows predict Table 1's MAE-800 encoder: it is trained first when missing
# (MAE_CHECKPOINT=/path/mae_800.pth gives another).
#   DATA_PATH=/data/imagenet bash scripts/ablations/paper_t3.sh              (GPUS GPUs, default 8)
#   DATA_PATH=/data/imagenet bash scripts/ablations/paper_t3.sh --rows feature_release
#   DATA_PATH=/data/imagenet bash scripts/ablations/paper_t3.sh --dry_run    (each distinct pretraining, GPU-hours)
#   SMOKE=1 bash scripts/ablations/paper_t3.sh             (the same commands at toy size on the CPU)
# Each row writes $OUT/paper_t3/<row>/metrics.json (OUT default output/ablations; smoke: $OUT/smoke);
# rerunning skips finished rows and resumes the rest. Then: python scripts/ablations/gather.py paper_t3
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" scripts/ablations/run_table.py paper_t3 ${SMOKE:+--smoke} \
    ${DATA_PATH:+--data_path "$DATA_PATH"} \
    ${MAE_CHECKPOINT:+--mae_checkpoint "$MAE_CHECKPOINT"} \
    --nproc "${GPUS:-8}" --out "${OUT:-output/ablations}" "$@"
