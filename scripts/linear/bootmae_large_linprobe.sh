#!/usr/bin/env bash
# Linear probe of BootMAE ViT-L/16 (800-epoch pretraining): paper 77.1 % top-1 on ImageNet-1k.
# The release's recipe: features after block 18 of 24, mean of the patch tokens + LayerNorm, BatchNorm +
# Linear head, LARS, blr 0.07 (lr = 0.07 x 16384 / 256 = 4.48), weight decay 0, 50 epochs with 10 warm-up,
# total batch 16384 = nodes x GPUs x --batch_size x --accum_iter (the release: 8 x 1024 x 2).
#   FINETUNE=out/bootmae_large_800ep/checkpoint-799.pth DATA_PATH=/data/imagenet bash scripts/linear/bootmae_large_linprobe.sh
#   several nodes: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=<node 0 host> ... (run on every node)
source "$(dirname "$0")/../launch.sh"
total_batch 16384 1024
launch_nodes main_linprobe.py \
    --finetune "${FINETUNE:?set FINETUNE to the pretraining checkpoint}" \
    --data_path "${DATA_PATH:?set DATA_PATH to the ImageNet folder (with train/ and val/)}" \
    --output_dir "${OUTPUT_DIR:-output/bootmae_large_linprobe}" \
    --model large_patch16_224 --depth 18 --global_pool \
    --batch_size "$BATCH" --accum_iter "$ACCUM" --blr 0.07 --weight_decay 0.0 \
    --epochs 50 --warmup_epochs 10 --dist_eval --num_workers 10 "$@"
