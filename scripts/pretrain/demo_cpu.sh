#!/usr/bin/env bash
# BootMAE-Tiny on the embedded demo photos (scikit-image's sample photographs), on CPU.
# A few minutes on 2 cores; leaves checkpoints, log.txt, TensorBoard events and reconstruction.png in
# $OUTPUT_DIR (default output/demo). Extra flags are passed on, e.g. --epochs 2.
source "$(dirname "$0")/../launch.sh"
OUTPUT_DIR=${OUTPUT_DIR:-output/demo}
# 112 px images: a 7x7 grid of 16 px patches, 37 of 49 masked (75 %), block budget 30 (the release's
# 120/147 ratio), blocks of 4-16 patches. A higher lr than the ImageNet recipe suits the small batch.
exec "$PYTHON" run_pretraining.py \
    --data_set demo --demo_size 384 \
    --model bootmae_tiny --input_size 112 \
    --mask_num 37 --num_mask_patches 30 --min_mask_patches_per_block 4 --max_mask_patches_per_block 16 \
    --batch_size 32 --epochs 6 --warmup_epochs 1 --lr 1.5e-3 --min_lr 1e-5 \
    --feature_weight 1 --weight_mask --model_ema_decay 0.999 \
    --num_workers 2 --device cpu --save_ckpt_freq 3 --print_freq 4 \
    --output_dir "$OUTPUT_DIR" "$@"
