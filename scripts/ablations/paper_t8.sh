#!/usr/bin/env bash
# Paper Table 8: encoder block injected into each decoder (ViT-B: block 1, 6, 12).
# Every row in turn on this node: pretraining, then fine-tuning (scripts/finetune/bootmae_base_finetune.sh).
# Rows (scripts/ablations/tables.py; README "Ablations" says what each changes and costs):
#   0  pix_high_fea_low       regressor high-level (block 12), predictor low-level (block 1)
#   1  pix_high_fea_middle    regressor high-level (block 12), predictor middle-level (block 6)
#   2  pix_high_fea_high      regressor high-level (block 12), predictor high-level (block 12)
#   3  pix_middle_fea_low     regressor middle-level (block 6), predictor low-level (block 1)
#   4  pix_middle_fea_middle  regressor middle-level (block 6), predictor middle-level (block 6)
#   5  pix_middle_fea_high    regressor middle-level (block 6), predictor high-level (block 12)
#   6  pix_low_fea_low        regressor low-level (block 1), predictor low-level (block 1)
#   7  pix_low_fea_middle     regressor low-level (block 1), predictor middle-level (block 6)
#   8  pix_low_fea_high       regressor low-level (block 1), predictor high-level (block 12)
# A row whose pretraining (its effective run_pretraining.py arguments) was trained before, by this table or
# another, reuses it and its evaluation.
#   DATA_PATH=/data/imagenet bash scripts/ablations/paper_t8.sh              (GPUS GPUs, default 8)
#   DATA_PATH=/data/imagenet bash scripts/ablations/paper_t8.sh --rows pix_low_fea_high
#   DATA_PATH=/data/imagenet bash scripts/ablations/paper_t8.sh --dry_run    (each distinct pretraining, GPU-hours)
#   SMOKE=1 bash scripts/ablations/paper_t8.sh             (the same commands at toy size on the CPU)
# Each row writes $OUT/paper_t8/<row>/metrics.json (OUT default output/ablations; smoke: $OUT/smoke);
# rerunning skips finished rows and resumes the rest. Then: python scripts/ablations/gather.py paper_t8
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" scripts/ablations/run_table.py paper_t8 ${SMOKE:+--smoke} \
    ${DATA_PATH:+--data_path "$DATA_PATH"} \
    --nproc "${GPUS:-8}" --out "${OUT:-output/ablations}" "$@"
