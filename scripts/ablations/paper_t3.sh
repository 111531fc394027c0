#!/usr/bin/env bash
# Paper Table 3: masking strategy for pixel and feature targets (MAE, 300 epochs): every row, one after the other, on this node (pretraining + fine-tuning (scripts/finetune/bootmae_base_finetune.sh)).
# Rows (scripts/ablations/tables.py):
#   0  pixel_random           pixel target, random masking
#   1  pixel_block            pixel target, block-wise masking
#   2  pixel_release          pixel target, release-style masking (not in the paper)
#   3  feature_random         feature target (fixed MAE encoder), random masking
#   4  feature_block          feature target (fixed MAE encoder), block-wise masking
#   5  feature_release        feature target (fixed MAE encoder), release-style masking (not in the paper)
#   DATA_PATH=/data/imagenet MAE_CHECKPOINT=/ckpt/mae_vit_base_800ep.pth bash scripts/ablations/paper_t3.sh                    ($GPUS GPUs, default 8)
#   ... bash scripts/ablations/paper_t3.sh --rows pixel_random               (chosen rows; --dry_run prints the commands)
# Each row writes $OUT/paper_t3/<row>/metrics.json (OUT default output/ablations); rerunning skips finished rows
# and resumes pretraining. Then: python scripts/ablations/gather.py paper_t3
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" scripts/ablations/run_table.py paper_t3 \
    --data_path "${DATA_PATH:?set DATA_PATH to the ImageNet folder (train/, val/)}" \
    ${MAE_CHECKPOINT:+--mae_checkpoint "$MAE_CHECKPOINT"} \
    --nproc "${GPUS:-8}" --out "${OUT:-output/ablations}" "$@"
