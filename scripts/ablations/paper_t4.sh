#!/usr/bin/env bash
# Paper Table 4: (a) regressor and predictor depth, (b) regressor width: every row, one after the other, on this node (pretraining + fine-tuning (scripts/finetune/bootmae_base_finetune.sh)).
# Rows (scripts/ablations/tables.py):
#   0  depth_1                (a) depth 1
#   1  depth_2                (a) depth 2 (default)
#   2  depth_4                (a) depth 4
#   3  depth_8                (a) depth 8
#   4  width_256              (b) regressor width 256
#   5  width_384              (b) regressor width 384
#   6  width_512              (b) regressor width 512 (default)
#   7  width_768              (b) regressor width 768
#   DATA_PATH=/data/imagenet bash scripts/ablations/paper_t4.sh                    ($GPUS GPUs, default 8)
#   ... bash scripts/ablations/paper_t4.sh --rows depth_1               (chosen rows; --dry_run prints the commands)
# Each row writes $OUT/paper_t4/<row>/metrics.json (OUT default output/ablations); rerunning skips finished rows
# and resumes pretraining. Then: python scripts/ablations/gather.py paper_t4
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" scripts/ablations/run_table.py paper_t4 \
    --data_path "${DATA_PATH:?set DATA_PATH to the ImageNet folder (train/, val/)}" \
    ${MAE_CHECKPOINT:+--mae_checkpoint "$MAE_CHECKPOINT"} \
    --nproc "${GPUS:-8}" --out "${OUT:-output/ablations}" "$@"
