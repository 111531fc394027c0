#!/usr/bin/env bash
# The CIFAR-10 report's comparison scaled down to two CPU cores (about 40 minutes): MAE vs BootMAE vs MAE-K vs
# EMA-MAE vs no pretraining, two seeds, kNN and linear probe; see benchmarks/cifar10_ablation.py and README
# "Ablations". The GPU recipe in the report's setting is scripts/ablations/report_*.sh.
#   bash scripts/ablations/cifar10_cpu.sh                       (data: ../shared/data/cifar10, train.npz / test.npz)
#   bash scripts/ablations/cifar10_cpu.sh --data_path DIR --seeds 0 1 2
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" benchmarks/cifar10_ablation.py "$@"
