#!/usr/bin/env bash
# Paper Table 5: fraction of the image fed to the momentum encoder: every row, one after the other, on this node (pretraining + fine-tuning (scripts/finetune/bootmae_base_finetune.sh)).
# Rows (scripts/ablations/tables.py):
#   0  mae                    MAE
#   1  frac_25                BootMAE, 25 % (sampled from the masked patches)
#   2  frac_50                BootMAE, 50 % (sampled from the masked patches)
#   3  frac_75                BootMAE, 75 % (all the masked patches)
#   4  frac_100               BootMAE, 100 % (the full image, default)
#   DATA_PATH=/data/imagenet bash scripts/ablations/paper_t5.sh                    ($GPUS GPUs, default 8)
#   ... bash scripts/ablations/paper_t5.sh --rows mae               (chosen rows; --dry_run prints the commands)
# Each row writes $OUT/paper_t5/<row>/metrics.json (OUT default output/ablations); rerunning skips finished rows
# and resumes pretraining. Then: python scripts/ablations/gather.py paper_t5
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" scripts/ablations/run_table.py paper_t5 \
    --data_path "${DATA_PATH:?set DATA_PATH to the ImageNet folder (train/, val/)}" \
    ${MAE_CHECKPOINT:+--mae_checkpoint "$MAE_CHECKPOINT"} \
    --nproc "${GPUS:-8}" --out "${OUT:-output/ablations}" "$@"
