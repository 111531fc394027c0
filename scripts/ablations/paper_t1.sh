#!/usr/bin/env bash
# Paper Table 1: bootstrapped feature prediction.
# Every row in turn on this node: pretraining, then fine-tuning (scripts/finetune/bootmae_base_finetune.sh).
# Rows (scripts/ablations/tables.py; README "Ablations" says what each changes and costs):
#   0  mae_1600        MAE, 1600 epochs
#   1  mae_800         MAE, 800 epochs
#   2  mae_300         MAE, 300 epochs
#   3  boot_noctx_300  MAE w bootstrapped feature prediction (no context injection), 300 epochs
# A row whose pretraining (its effective run_pretraining.py arguments) was trained before, by this table or
# another, reuses it and its evaluation.
#   DATA_PATH=/data/imagenet bash scripts/ablations/paper_t1.sh              (GPUS GPUs, default 8)
#   DATA_PATH=/data/imagenet bash scripts/ablations/paper_t1.sh --rows boot_noctx_300
#   DATA_PATH=/data/imagenet bash scripts/ablations/paper_t1.sh --dry_run    (each distinct pretraining, GPU-hours)
#   SMOKE=1 bash scripts/ablations/paper_t1.sh             (the same commands at toy size on the CPU)
# Each row writes $OUT/paper_t1/<row>/metrics.json (OUT default output/ablations; smoke: $OUT/smoke);
# rerunning skips finished rows and resumes the rest. Then: python scripts/ablations/gather.py paper_t1
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" scripts/ablations/run_table.py paper_t1 ${SMOKE:+--smoke} \
    ${DATA_PATH:+--data_path "$DATA_PATH"} \
    --nproc "${GPUS:-8}" --out "${OUT:-output/ablations}" "$@"
