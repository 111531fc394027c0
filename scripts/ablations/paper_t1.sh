#!/usr/bin/env bash
# Paper Table 1: bootstrapped feature prediction: every row, one after the other, on this node (pretraining + fine-tuning (scripts/finetune/bootmae_base_finetune.sh)).
# Rows (scripts/ablations/tables.py):
#   0  mae_1600               MAE, 1600 epochs
#   1  mae_800                MAE, 800 epochs
#   2  mae_300                MAE, 300 epochs
#   3  boot_noctx_300         MAE w bootstrapped feature prediction (no context injection), 300 epochs
#   DATA_PATH=/data/imagenet bash scripts/ablations/paper_t1.sh                    ($GPUS GPUs, default 8)
#   ... bash scripts/ablations/paper_t1.sh --rows mae_1600               (chosen rows; --dry_run prints the commands)
# Each row writes $OUT/paper_t1/<row>/metrics.json (OUT default output/ablations); rerunning skips finished rows
# and resumes pretraining. Then: python scripts/ablations/gather.py paper_t1
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" scripts/ablations/run_table.py paper_t1 \
    --data_path "${DATA_PATH:?set DATA_PATH to the ImageNet folder (train/, val/)}" \
    ${MAE_CHECKPOINT:+--mae_checkpoint "$MAE_CHECKPOINT"} \
    --nproc "${GPUS:-8}" --out "${OUT:-output/ablations}" "$@"
