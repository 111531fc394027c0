#!/usr/bin/env bash
# Paper Table 9: MAE with pixel or (fixed MAE) feature targets: every row, one after the other, on this node (pretraining + fine-tuning (scripts/finetune/bootmae_base_finetune.sh)).
# Rows (scripts/ablations/tables.py):
#   0  pixel_300              MAE, pixel target, 300 epochs
#   1  pixel_800              MAE, pixel target, 800 epochs
#   2  pixel_1600             MAE, pixel target, 1600 epochs
#   3  feature_300            MAE, feature target, 300 epochs
#   4  feature_800            MAE, feature target, 800 epochs
#   DATA_PATH=/data/imagenet MAE_CHECKPOINT=/ckpt/mae_vit_base_800ep.pth bash scripts/ablations/paper_t9.sh                    ($GPUS GPUs, default 8)
#   ... bash scripts/ablations/paper_t9.sh --rows pixel_300               (chosen rows; --dry_run prints the commands)
# Each row writes $OUT/paper_t9/<row>/metrics.json (OUT default output/ablations); rerunning skips finished rows
# and resumes pretraining. Then: python scripts/ablations/gather.py paper_t9
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" scripts/ablations/run_table.py paper_t9 \
    --data_path "${DATA_PATH:?set DATA_PATH to the ImageNet folder (train/, val/)}" \
    ${MAE_CHECKPOINT:+--mae_checkpoint "$MAE_CHECKPOINT"} \
    --nproc "${GPUS:-8}" --out "${OUT:-output/ablations}" "$@"
