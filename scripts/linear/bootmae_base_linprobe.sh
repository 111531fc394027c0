#!/usr/bin/env bash
# Linear probe of BootMAE ViT-B/16 (800-epoch pretraining): paper 66.1 % top-1 on ImageNet-1k.
# The release's recipe (MAE's): features after block 10 of 12, mean of the patch tokens + LayerNorm,
# BatchNorm + Linear head, LARS, blr 0.1 (lr = 0.1 x 16384 / 256 = 6.4), weight decay 0, 90 epochs with
# 10 warm-up, total batch 16384 = nodes x GPUs x --batch_size x --accum_iter (the release: 8 x 1024 x 2).
#   FINETUNE=out/bootmae_base_800ep/checkpoint-799.pth DATA_PATH=/data/imagenet bash scripts/linear/bootmae_base_linprobe.sh
#   several nodes: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=<node 0 host> ... (run on every node)
# DATA_PATH holds train/ and val/ in the ImageNet layout. Evaluate a saved head:
#   ... bash scripts/linear/bootmae_base_linprobe.sh --eval --resume $OUTPUT_DIR/checkpoint-best.pth
source "$(dirname "$0")/../launch.sh"
total_batch 16384 1024
launch_nodes main_linprobe.py \
    --finetune "${FINETUNE:?set FINETUNE to the pretraining checkpoint}" \
    --data_path "${DATA_PATH:?set DATA_PATH to the ImageNet folder (with train/ and val/)}" \
    --output_dir "${OUTPUT_DIR:-output/bootmae_base_linprobe}" \
    --model base_patch16_224 --depth 10 --global_pool \
    --batch_size "$BATCH" --accum_iter "$ACCUM" --blr 0.1 --weight_decay 0.0 \
    --epochs 90 --warmup_epochs 10 --dist_eval --num_workers 10 "$@"
