#!/usr/bin/env bash
# Fine-tune BootMAE ViT-B/16 (800-epoch pretraining) on ImageNet-1k. Paper: 84.2 % top-1.
# The release's recipe: 100 epochs (20 warm-up), AdamW lr 5e-3 for a total batch of 2048 (the lr is absolute,
# not scaled by the batch), layer decay 0.6, drop path 0.1, weight decay 0.05, RandAugment rand-m9-mstd0.5-inc1,
# mixup 0.8, cutmix 1.0, label smoothing 0.1, random erasing 0.25, model EMA 0.9998, DeepSpeed.
# Total batch 2048 = nodes x GPUs per node x --batch_size x --update_freq (the release: 8 GPUs x 256).
#   one node:  DATA_PATH=/data/imagenet FINETUNE=output/bootmae_base_800ep/checkpoint-799.pth \
#              bash scripts/finetune/bootmae_base_finetune.sh
#   several:   NNODES=2 NODE_RANK=0|1 MASTER_ADDR=<node 0 host> ... (run on every node)
# DATA_PATH holds train/<class>/ and val/<class>/. Extra flags are passed on (e.g. --amp fp16, the release's
# precision; the default is bf16 where the GPU has it). Re-running the same command resumes.
source "$(dirname "$0")/../launch.sh"
total_batch 2048 256
launch_nodes run_class_finetuning.py \
    --model bootmae_base_patch16_224 --data_path "${DATA_PATH:?set DATA_PATH to the ImageNet folder (train/, val/)}" \
    --input_size 224 --finetune "${FINETUNE:-output/bootmae_base_800ep/checkpoint-799.pth}" --model_key model \
    --output_dir "${OUTPUT_DIR:-output/bootmae_base_finetune}" --num_workers 8 \
    --batch_size "$BATCH" --update_freq "$ACCUM" --lr 5e-3 --warmup_epochs 20 --epochs 100 \
    --layer_decay 0.6 --backbone_decay 1 --drop_path 0.1 --abs_pos_emb --disable_rel_pos_bias \
    --weight_decay 0.05 --mixup 0.8 --cutmix 1.0 --smoothing 0.1 --aa rand-m9-mstd0.5-inc1 --reprob 0.25 \
    --nb_classes 1000 --enable_deepspeed --model_ema --model_ema_decay 0.9998 --dist_eval "$@"
