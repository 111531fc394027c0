#!/usr/bin/env bash
# Paper Table 8: encoder block injected into each decoder (ViT-B: block 1, 6, 12): every row, one after the other, on this node (pretraining + fine-tuning (scripts/finetune/bootmae_base_finetune.sh)).
# Rows (scripts/ablations/tables.py):
#   0  pix_high_fea_low       regressor high-level (block 12), predictor low-level (block 1)
#   1  pix_high_fea_middle    regressor high-level (block 12), predictor middle-level (block 6)
#   2  pix_high_fea_high      regressor high-level (block 12), predictor high-level (block 12)
#   3  pix_middle_fea_low     regressor middle-level (block 6), predictor low-level (block 1)
#   4  pix_middle_fea_middle  regressor middle-level (block 6), predictor middle-level (block 6)
#   5  pix_middle_fea_high    regressor middle-level (block 6), predictor high-level (block 12)
#   6  pix_low_fea_low        regressor low-level (block 1), predictor low-level (block 1)
#   7  pix_low_fea_middle     regressor low-level (block 1), predictor middle-level (block 6)
#   8  pix_low_fea_high       regressor low-level (block 1), predictor high-level (block 12)
#   DATA_PATH=/data/imagenet bash scripts/ablations/paper_t8.sh                    ($GPUS GPUs, default 8)
#   ... bash scripts/ablations/paper_t8.sh --rows pix_high_fea_low               (chosen rows; --dry_run prints the commands)
# Each row writes $OUT/paper_t8/<row>/metrics.json (OUT default output/ablations); rerunning skips finished rows
# and resumes pretraining. Then: python scripts/ablations/gather.py paper_t8
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" scripts/ablations/run_table.py paper_t8 \
    --data_path "${DATA_PATH:?set DATA_PATH to the ImageNet folder (train/, val/)}" \
    ${MAE_CHECKPOINT:+--mae_checkpoint "$MAE_CHECKPOINT"} \
    --nproc "${GPUS:-8}" --out "${OUT:-output/ablations}" "$@"
