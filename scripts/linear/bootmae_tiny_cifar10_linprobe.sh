#!/usr/bin/env bash
# Linear probe on CIFAR-10 of the BootMAE-Tiny encoder from scripts/pretrain/bootmae_tiny_cifar10.sh
# (32 px images, 4 px patches). Not a paper setting: the ImageNet recipe (all 12 blocks here, mean pooling +
# LayerNorm, BN + Linear head, LARS blr 0.1, weight decay 0, 10 warm-up epochs) at total batch 1024 for
# 100 epochs, which suits 50k training images (48 steps per epoch); the evaluation takes the whole 32 px image (--crop_pct 1).
# Needs CIFAR-10 in torchvision's on-disk format under $DATA_PATH (never downloaded from here).
#   FINETUNE=output/bootmae_tiny_cifar10/checkpoint-199.pth DATA_PATH=/data/cifar bash scripts/linear/bootmae_tiny_cifar10_linprobe.sh
#   NPROC=2 ... for torchrun on two GPUs (the per-process batch halves)
source "$(dirname "$0")/../launch.sh"
launch_local main_linprobe.py \
    --finetune "${FINETUNE:?set FINETUNE to the pretraining checkpoint}" \
    --data_set cifar10 --data_path "${DATA_PATH:?set DATA_PATH to the folder holding the CIFAR-10 batches}" \
    --output_dir "${OUTPUT_DIR:-output/bootmae_tiny_cifar10_linprobe}" \
    --model bootmae_tiny --input_size 32 --patch_size 4 --crop_pct 1.0 --global_pool \
    --batch_size $(( 1024 / NPROC )) --blr 0.1 --weight_decay 0.0 --epochs 100 --warmup_epochs 10 \
    --dist_eval --num_workers 8 "$@"
