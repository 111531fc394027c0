#!/usr/bin/env bash
# Paper Table 2: context injection: every row, one after the other, on this node (pretraining + fine-tuning (scripts/finetune/bootmae_base_finetune.sh)).
# Rows (scripts/ablations/tables.py):
#   0  ctx_none               BootMAE, context for neither decoder
#   1  ctx_pixel              BootMAE, context for the regressor only
#   2  ctx_both               BootMAE, context for regressor and predictor (default)
#   DATA_PATH=/data/imagenet bash scripts/ablations/paper_t2.sh                    ($GPUS GPUs, default 8)
#   ... bash scripts/ablations/paper_t2.sh --rows ctx_none               (chosen rows; --dry_run prints the commands)
# Each row writes $OUT/paper_t2/<row>/metrics.json (OUT default output/ablations); rerunning skips finished rows
# and resumes pretraining. Then: python scripts/ablations/gather.py paper_t2
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" scripts/ablations/run_table.py paper_t2 \
    --data_path "${DATA_PATH:?set DATA_PATH to the ImageNet folder (train/, val/)}" \
    ${MAE_CHECKPOINT:+--mae_checkpoint "$MAE_CHECKPOINT"} \
    --nproc "${GPUS:-8}" --out "${OUT:-output/ablations}" "$@"
