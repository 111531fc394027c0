"""The flags of run_pretraining.py and their checks (run before anything is built or written). The release's
command lines mean the same run: flags they leave unset default to its parser's values."""
import argparse
import os

import ablation_flags
import knn
import modeling_bootmae
import utils
from datasets import DATA_PIPELINES
from engine_for_pretraining import PIXEL_NORMS


def get_args_parser():
    p = argparse.ArgumentParser("BootMAE pretraining", add_help=False)
    p.add_argument("--batch_size", default=256, type=int, help="images per process and step")
    p.add_argument("--epochs", default=800, type=int, help="epochs of the lr and weight-decay schedules")
    p.add_argument("--update_freq", default=1, type=int, help="gradient accumulation steps")
    p.add_argument("--save_ckpt_freq", default=20, type=int,
                   help="also keep checkpoint-N.pth every N epochs and after the last, and redraw the "
                        "reconstruction (0: checkpoint-last.pth only; reconstruction at the end)")
    p.add_argument("--print_freq", default=10, type=int, help="steps between log lines (the only host syncs)")

    # model
    p.add_argument("--model", default="bootmae_base", type=str,
                   help="bootmae_tiny | bootmae_small | bootmae_base | bootmae_large | bootmae_huge")
    p.add_argument("--input_size", default=224, type=int, help="image side in pixels")
    p.add_argument("--patch_size", default=None, type=int,
                   help="patch side (default: the model's, 16; 14 for huge); e.g. 4 for 32px CIFAR images")
    p.add_argument("--drop_path", default=0.0, type=float,
                   help="stochastic depth of the encoder (the release pretrains without: 0)")
    p.add_argument("--decoder_dim", default=None, type=int, help="pixel regressor width (default 512)")
    p.add_argument("--decoder_depth", default=None, type=int, help="blocks per decoder (default 2)")

    ablation_flags.add_ablation_args(p)  # README "Ablations"; defaults: the release's BootMAE

    # masking
    p.add_argument("--mask_type", default="release", choices=["release", "block", "random"],
                   help="release: block-wise up to --num_mask_patches, random top-up to --mask_num, 0-3 swaps")
    p.add_argument("--mask_num", default=147, type=int, help="masked patches per image (75 %% of 196)")
    p.add_argument("--num_mask_patches", default=120, type=int, help="block-wise budget of the release mode")
    p.add_argument("--min_mask_patches_per_block", default=16, type=int)
    p.add_argument("--max_mask_patches_per_block", default=60, type=int)

    # losses and momentum encoder
    p.add_argument("--feature_weight", default=1.0, type=float,
                   help="weight of the feature-prediction loss; 0 = MAE: no feature predictor, no target encoder")
    p.add_argument("--weight_mask", action="store_true", help="weigh block centres up to 2x in the losses")
    p.add_argument("--pixel_norm", default="channel", choices=PIXEL_NORMS,
                   help="pixel target: each patch normalised per channel (the release), over the whole patch (the "
                        "MAE paper's norm_pix_loss) or raw pixels")
    p.add_argument("--model_ema", action="store_true", default=True,
                   help="momentum encoder for the feature targets (on by default; BootMAE needs it)")
    p.add_argument("--no_model_ema", action="store_false", dest="model_ema")
    p.add_argument("--model_ema_decay", default=0.999, type=float, help="starting EMA momentum")
    p.add_argument("--model_ema_dynamic", action="store_true",
                   help="after reaching 0.9999, raise the momentum further to 0.99999 (ViT-B recipe)")
    p.add_argument("--model_ema_warmup_epochs", default=100, type=int,
                   help="epochs over which the momentum goes from --model_ema_decay to 0.9999")
    p.add_argument("--model_ema_dynamic_epochs", default=400, type=int,
                   help="epoch at which --model_ema_dynamic reaches 0.99999")

    # optimisation
    p.add_argument("--lr", default=1.5e-4, type=float, help="base lr; actual lr = lr * total batch / 256")
    p.add_argument("--min_lr", default=1e-5, type=float,
                   help="final lr of the cosine, absolute (the release's 1e-5; its ViT-B script sets 1e-4)")
    p.add_argument("--warmup_epochs", default=40, type=int)
    p.add_argument("--warmup_lr", default=0.0, type=float,
                   help="lr at the start of warm-up (the release's warm-up starts at 0; its --warmup_lr is unused)")
    p.add_argument("--weight_decay", default=0.05, type=float)
    p.add_argument("--weight_decay_end", default=None, type=float, help="cosine weight decay end (default: constant)")
    p.add_argument("--clip_grad", default=None, type=float, help="gradient norm clip (default: none)")
    p.add_argument("--no_fused_adamw", action="store_false", dest="fused_adamw",
                   help="torch's default AdamW instead of the fused kernel (same update, slower)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the online model, the momentum encoder's forward and the losses (same "
                        "mathematics). Default: on for CUDA (a ViT-B step 1.43x faster on an H100; the first step "
                        "compiles for about 2 minutes), off on CPU (no gain there); --no-compile turns it off")
    p.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"],
                   help="autocast precision (default: bf16 on CUDA if supported, else fp16; none on CPU)")

    # data
    p.add_argument("--data_set", default="image_folder", choices=["image_folder", "cifar10", "cifar100", "npz", "demo"],
                   help="npz: --data_path holds train.npz with arrays images [n, H, W, 3] uint8 and labels")
    p.add_argument("--data_path", default=None, type=str, help="ImageNet-style folder (its train/ is used)")
    p.add_argument("--min_crop_scale", "--resize_scale", dest="min_crop_scale", default=0.2, type=float,
                   help="smallest area fraction of the random-resized crop (the release's --resize_scale 0.2)")
    p.add_argument("--data_pipeline", default="pil", choices=list(DATA_PIPELINES),
                   help="pil: workers decode, crop and normalise with PIL as the release; fast: workers decode with "
                        "libjpeg-turbo and crop, resize and flip in uint8, normalised on the device; gpu: workers "
                        "read the JPEG bytes, the GPU decodes (nvJPEG), crops, resizes, flips and normalises. Same "
                        "crops, flips and masks in all three (README 'Input pipeline')")
    utils.add_loader_args(p)  # --demo_size --imagenet_default_mean_and_std --num_workers --[no_]pin_mem

    # run
    utils.add_run_args(p, "checkpoint to resume from (ours or the release's)")
    p.add_argument("--log_all_ranks", action="store_true", help="every rank prints its epoch summary")
    knn.add_knn_args(p)  # --knn_freq, --knn_data_set, --knn_data_path, --knn_k, --knn_temperature, ...
    return p


# what each numeric flag may be (utils.check_flags); the ablation flags whose bounds depend on other flags are
# checked in ablation_flags.check_ablation_args
FLAG_RANGES = (
    ("batch_size", ">= 1"), ("epochs", ">= 1"), ("update_freq", ">= 1"), ("print_freq", ">= 1"),
    ("input_size", ">= 1"), ("patch_size", ">= 1"), ("drop_path", "[0, 1)", "stochastic depth rate"),
    ("decoder_depth", ">= 1"), ("pixel_weight", ">= 0"), ("feature_weight", ">= 0"),
    ("feature_ramp", "[0, 1]", "a fraction of training"), ("slow_weight", ">= 0"), ("pixel_warmup_epochs", ">= 0"),
    ("mask_num", ">= 1"), ("num_mask_patches", ">= 1"), ("min_mask_patches_per_block", ">= 1"),
    ("max_mask_patches_per_block", ">= 1"), ("model_ema_decay", "[0, 1)", "EMA momentum; the release's 0.999"),
    ("model_ema_warmup_epochs", ">= 0"), ("model_ema_dynamic_epochs", ">= 0"),
    ("lr", "> 0", "base lr"), ("min_lr", ">= 0", "final lr of the cosine"), ("warmup_epochs", ">= 0"),
    ("warmup_lr", ">= 0"), ("weight_decay", ">= 0"), ("weight_decay_end", ">= 0"),
    ("clip_grad", "> 0", "a gradient norm; leave it out for no clipping"),
    ("min_crop_scale", "(0, 1]", "an area fraction"), ("knn_batch_size", ">= 1"),
)


def check_args(args):
    """Refuse inconsistent settings before anything is built or written."""
    utils.check_flags(args, FLAG_RANGES)
    utils.check_run_args(args)
    utils.check_output_path("--metrics_json", args.metrics_json, folder=False)
    if args.mask_type != "random" and args.min_mask_patches_per_block > args.max_mask_patches_per_block:
        raise utils.UsageError(f"--min_mask_patches_per_block {args.min_mask_patches_per_block} exceeds "
                               f"--max_mask_patches_per_block {args.max_mask_patches_per_block}; lower the minimum "
                               f"or raise the maximum (the release: 16 and 60)")
    size = args.model.removeprefix("bootmae_")
    if not args.model.startswith("bootmae_") or size not in modeling_bootmae.MODEL_SIZES:
        raise utils.UsageError(f"unknown --model {args.model}; choose one of "
                               + ", ".join(f"bootmae_{k}" for k in modeling_bootmae.MODEL_SIZES))
    model_cfg = modeling_bootmae.MODEL_SIZES[size]
    patch = args.patch_size or model_cfg["patch_size"]
    if args.input_size % patch:
        raise utils.UsageError(f"--input_size {args.input_size} is not divisible by the patch size {patch} of "
                               f"{args.model}; use a multiple of {patch}")
    num_patches = (args.input_size // patch) ** 2
    if not 0 < args.mask_num < num_patches:
        raise utils.UsageError(f"--mask_num {args.mask_num} must be between 1 and {num_patches - 1} (the "
                               f"{args.input_size}px input has {num_patches} patches); 75 % is "
                               f"{round(0.75 * num_patches)}")
    if args.mask_type == "release" and args.num_mask_patches > args.mask_num:
        raise utils.UsageError(f"--num_mask_patches {args.num_mask_patches} (block budget) exceeds --mask_num "
                               f"{args.mask_num}; lower it (the release uses 120 of 147)")
    if args.feature_weight > 0 and not args.model_ema and args.target_encoder == "ema":
        raise utils.UsageError("--no_model_ema leaves the feature loss without targets; drop it, or set "
                               "--feature_weight 0 for pixel targets only")
    ablation_flags.check_ablation_args(args, args.encoder_depth or model_cfg["depth"], num_patches)
    if args.save_ckpt_freq < 0:
        raise utils.UsageError(f"--save_ckpt_freq {args.save_ckpt_freq} is negative; give N > 0 to keep "
                               f"checkpoint-N.pth every N epochs, or 0 for checkpoint-last.pth only")
    if args.resume and not os.path.isfile(args.resume):
        raise utils.UsageError(f"--resume {args.resume} does not exist; give the path of a checkpoint-*.pth")
    args.patch_size = patch
