#!/usr/bin/env bash
# BootMAE-Tiny (DeiT-Tiny sized encoder) on CIFAR-10 at 32 px with 4 px patches (8x8 grid, 48 of 64
# masked, block budget 39), batch 512, 200 epochs: the setting of the CIFAR-10 bootstrapped-MAE report.
# Inputs use the release's 0.5/0.5 normalisation (the report used CIFAR-10's own mean/std; the targets are
# per-patch normalised pixels and LayerNorm-ed features, so this shift of the input barely matters).
# Needs CIFAR-10 in torchvision's on-disk format: $DATA_PATH/cifar-10-batches-py/.
#   DATA_PATH=/data/cifar bash scripts/pretrain/bootmae_tiny_cifar10.sh            (one GPU)
#   NPROC=2 ... for torchrun on two GPUs (the per-process batch halves)
source "$(dirname "$0")/../launch.sh"
launch_local run_pretraining.py \
    --data_set cifar10 --data_path "${DATA_PATH:?set DATA_PATH to the folder holding cifar-10-batches-py}" \
    --output_dir "${OUTPUT_DIR:-output/bootmae_tiny_cifar10}" \
    --model bootmae_tiny --input_size 32 --patch_size 4 --drop_path 0.0 \
    --mask_num 48 --num_mask_patches 39 --min_mask_patches_per_block 4 --max_mask_patches_per_block 16 \
    --batch_size $(( 512 / NPROC )) --epochs 200 --warmup_epochs 10 --lr 1.5e-4 --min_lr 1e-6 \
    --feature_weight 1 --weight_mask --model_ema_decay 0.999 \
    --model_ema_warmup_epochs 25 --model_ema_dynamic --model_ema_dynamic_epochs 100 \
    --num_workers 8 --save_ckpt_freq 50 "$@"
