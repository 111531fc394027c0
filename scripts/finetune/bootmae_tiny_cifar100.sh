#!/usr/bin/env bash
# Fine-tune BootMAE-Tiny (DeiT-Tiny-sized encoder) on CIFAR-100 at 32 px in 4 px patches.
# Expected number: none -- the paper reports no CIFAR result; this is a small-scale recipe (BEiT's fine-tuning
# recipe at CIFAR scale: 100 epochs, 5 warm-up, absolute lr 1e-3 for batch 256, layer decay 0.75), not tuned here.
# The encoder comes from scripts/pretrain/bootmae_tiny_cifar10.sh (pretrained on CIFAR-10's training images;
# for CIFAR-100 pretrain with --data_set cifar100 to stay within one data set). At 32 px the training crop is
# a random 32 px crop with 4 px padding and evaluation uses the full image, as in the release.
# Needs torchvision's on-disk format: $DATA_PATH/cifar-100-python/.
#   DATA_PATH=/data/cifar bash scripts/finetune/bootmae_tiny_cifar100.sh          (one GPU)
#   NPROC=2 ... for torchrun on two GPUs (the per-process batch halves)
source "$(dirname "$0")/../launch.sh"
launch_local run_class_finetuning.py \
    --data_set cifar100 --data_path "${DATA_PATH:?set DATA_PATH to the folder holding cifar-100-python}" \
    --model bootmae_tiny_patch16_224 --input_size 32 --patch_size 4 \
    --finetune "${FINETUNE:-output/bootmae_tiny_cifar10/checkpoint-last.pth}" --model_key model \
    --output_dir "${OUTPUT_DIR:-output/bootmae_tiny_cifar100_finetune}" \
    --batch_size $(( 256 / NPROC )) --lr 1e-3 --min_lr 1e-6 --warmup_epochs 5 --epochs 100 \
    --layer_decay 0.75 --drop_path 0.1 --weight_decay 0.05 \
    --mixup 0.8 --cutmix 1.0 --smoothing 0.1 --aa rand-m9-mstd0.5-inc1 --reprob 0.25 \
    --nb_classes 100 --model_ema --model_ema_decay 0.9998 --num_workers 8 --save_ckpt_freq 0 "$@"
