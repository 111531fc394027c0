#!/usr/bin/env bash
# Paper Table 2: context injection.
# Every row in turn on this node: pretraining, then fine-tuning (scripts/finetune/bootmae_base_finetune.sh).
# Rows (scripts/ablations/tables.py; README "Ablations" says what each changes and costs):
#   0  ctx_none   BootMAE, context for neither decoder
#   1  ctx_pixel  BootMAE, context for the regressor only
#   2  ctx_both   BootMAE, context for regressor and predictor (default)
# A row whose pretraining (its effective run_pretraining.py arguments) was trained before, by this table or
# another, reuses it and its evaluation.
#   DATA_PATH=/data/imagenet bash scripts/ablations/paper_t2.sh              (GPUS GPUs, default 8)
#   DATA_PATH=/data/imagenet bash scripts/ablations/paper_t2.sh --rows ctx_both
#   DATA_PATH=/data/imagenet bash scripts/ablations/paper_t2.sh --dry_run    (each distinct pretraining, GPU-hours)
#   SMOKE=1 bash scripts/ablations/paper_t2.sh             (the same commands at toy size on the CPU)
# Each row writes $OUT/paper_t2/<row>/metrics.json (OUT default output/ablations; smoke: $OUT/smoke);
# rerunning skips finished rows and resumes the rest. Then: python scripts/ablations/gather.py paper_t2
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" scripts/ablations/run_table.py paper_t2 ${SMOKE:+--smoke} \
    ${DATA_PATH:+--data_path "$DATA_PATH"} \
    --nproc "${GPUS:-8}" --out "${OUT:-output/ablations}" "$@"
