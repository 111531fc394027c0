#!/usr/bin/env bash
# Paper Table 5: fraction of the image fed to the momentum encoder.
# Every row in turn on this node: pretraining, then fine-tuning (scripts/finetune/bootmae_base_finetune.sh).
# Rows (scripts/ablations/tables.py; README "Ablations" says what each changes and costs):
#   0  mae       MAE
#   1  frac_25   BootMAE, 25 % (sampled from the masked patches)
#   2  frac_50   BootMAE, 50 % (sampled from the masked patches)
#   3  frac_75   BootMAE, 75 % (all the masked patches)
#   4  frac_100  BootMAE, 100 % (the full image, default)
# A row whose pretraining (its effective run_pretraining.py arguments) was trained before, by this table or
# another, reuses it and its evaluation.
#   DATA_PATH=/data/imagenet bash scripts/ablations/paper_t5.sh              (GPUS GPUs, default 8)
#   DATA_PATH=/data/imagenet bash scripts/ablations/paper_t5.sh --rows frac_100
#   DATA_PATH=/data/imagenet bash scripts/ablations/paper_t5.sh --dry_run    (each distinct pretraining, GPU-hours)
#   SMOKE=1 bash scripts/ablations/paper_t5.sh             (the same commands at toy size on the CPU)
# Each row writes $OUT/paper_t5/<row>/metrics.json (OUT default output/ablations; smoke: $OUT/smoke);
# rerunning skips finished rows and resumes the rest. Then: python scripts/ablations/gather.py paper_t5
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" scripts/ablations/run_table.py paper_t5 ${SMOKE:+--smoke} \
    ${DATA_PATH:+--data_path "$DATA_PATH"} \
    --nproc "${GPUS:-8}" --out "${OUT:-output/ablations}" "$@"
