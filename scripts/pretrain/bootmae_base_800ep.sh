#!/usr/bin/env bash
# BootMAE ViT-B/16, 800 epochs on ImageNet-1k (paper: 84.2 % fine-tuned, 66.1 % linear probe).
# Total batch 4096 = nodes x GPUs per node x --batch_size x --update_freq (the paper: 16 V100 x 256).
#   one node:     DATA_PATH=/data/imagenet OUTPUT_DIR=out/bootmae_base bash scripts/pretrain/bootmae_base_800ep.sh
#   several:      NNODES=2 NODE_RANK=0|1 MASTER_ADDR=<node 0 host> ... (run on every node)
# The release's flags: --epochs 801 as its script (the cosine spans 801 epochs; the release fine-tuned and
# probed checkpoint-799.pth, after 800 epochs; the 801st only adds checkpoint-800.pth), --min_lr 1e-4 as its
# ViT-B line; what it leaves unset has its parser's value here too (no drop path, crop scale 0.2, ...).
source "$(dirname "$0")/../launch.sh"
total_batch 4096 256
launch_nodes run_pretraining.py \
    --data_path "${DATA_PATH:?set DATA_PATH to the ImageNet folder (with train/)}" \
    --output_dir "${OUTPUT_DIR:-output/bootmae_base_800ep}" \
    --model bootmae_base \
    --model_ema --model_ema_decay 0.999 --model_ema_dynamic \
    --batch_size "$BATCH" --update_freq "$ACCUM" --lr 1.5e-4 --min_lr 1e-4 \
    --epochs 801 --warmup_epochs 40 \
    --mask_num 147 --num_mask_patches 120 --feature_weight 1 --weight_mask \
    --num_workers 10 "$@"
