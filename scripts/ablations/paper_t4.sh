#!/usr/bin/env bash
# Paper Table 4: (a) regressor and predictor depth, (b) regressor width.
# Every row in turn on this node: pretraining, then fine-tuning (scripts/finetune/bootmae_base_finetune.sh).
# Rows (scripts/ablations/tables.py; README "Ablations" says what each changes and costs):
#   0  depth_1    (a) depth 1
#   1  depth_2    (a) depth 2 (default)
#   2  depth_4    (a) depth 4
#   3  depth_8    (a) depth 8
#   4  width_256  (b) regressor width 256
#   5  width_384  (b) regressor width 384
#   6  width_512  (b) regressor width 512 (default)
#   7  width_768  (b) regressor width 768
# A row whose pretraining (its effective run_pretraining.py arguments) was trained before, by this table or
# another, reuses it and its evaluation.
#   DATA_PATH=/data/imagenet bash scripts/ablations/paper_t4.sh              (GPUS GPUs, default 8)
#   DATA_PATH=/data/imagenet bash scripts/ablations/paper_t4.sh --rows width_768
#   DATA_PATH=/data/imagenet bash scripts/ablations/paper_t4.sh --dry_run    (each distinct pretraining, GPU-hours)
#   SMOKE=1 bash scripts/ablations/paper_t4.sh             (the same commands at toy size on the CPU)
# Each row writes $OUT/paper_t4/<row>/metrics.json (OUT default output/ablations; smoke: $OUT/smoke);
# rerunning skips finished rows and resumes the rest. Then: python scripts/ablations/gather.py paper_t4
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" scripts/ablations/run_table.py paper_t4 ${SMOKE:+--smoke} \
    ${DATA_PATH:+--data_path "$DATA_PATH"} \
    --nproc "${GPUS:-8}" --out "${OUT:-output/ablations}" "$@"
