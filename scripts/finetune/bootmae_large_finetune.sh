#!/usr/bin/env bash
# Fine-tune BootMAE ViT-L/16 (800-epoch pretraining) on ImageNet-1k. Paper: 85.9 % top-1.
# The release's recipe: 50 epochs (5 warm-up), AdamW lr 1.5e-3 for a total batch of 1024 (absolute lr), layer
# decay 0.75, drop path 0.1, weight decay 0.05, RandAugment, mixup 0.8, cutmix 1.0, label smoothing 0.1,
# random erasing 0.25, model EMA 0.9998, DeepSpeed.
# Total batch 1024 = nodes x GPUs per node x --batch_size x --update_freq (the release: 8 GPUs x 128).
#   one node:  DATA_PATH=/data/imagenet FINETUNE=output/bootmae_large_800ep/checkpoint-799.pth \
#              bash scripts/finetune/bootmae_large_finetune.sh
#   several:   NNODES=2 NODE_RANK=0|1 MASTER_ADDR=<node 0 host> ... (run on every node)
source "$(dirname "$0")/../launch.sh"
total_batch 1024 128
launch_nodes run_class_finetuning.py \
    --model bootmae_large_patch16_224 --data_path "${DATA_PATH:?set DATA_PATH to the ImageNet folder (train/, val/)}" \
    --input_size 224 --finetune "${FINETUNE:-output/bootmae_large_800ep/checkpoint-799.pth}" --model_key model \
    --output_dir "${OUTPUT_DIR:-output/bootmae_large_finetune}" --num_workers 8 \
    --batch_size "$BATCH" --update_freq "$ACCUM" --lr 1.5e-3 --warmup_epochs 5 --epochs 50 \
    --layer_decay 0.75 --backbone_decay 1 --drop_path 0.1 --abs_pos_emb --disable_rel_pos_bias \
    --weight_decay 0.05 --mixup 0.8 --cutmix 1.0 --smoothing 0.1 --aa rand-m9-mstd0.5-inc1 --reprob 0.25 \
    --nb_classes 1000 --enable_deepspeed --model_ema --model_ema_decay 0.9998 --dist_eval "$@"
