"""BootMAE pretraining.

    python run_pretraining.py --data_path /path/to/imagenet --output_dir out/ [flags]
    torchrun --nproc_per_node 8 run_pretraining.py ...         (one or several nodes; srun works too)

The release's command lines mean the same run here: flags they leave unset default to its parser's values;
README.md ("The flags that matter") lists which defaults follow the paper instead and every difference.
``--mae`` is the MAE paper's pretraining (``MAE_PRESET``).
"""
import argparse
import json
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel

import checkpoints
import knn
import modeling_bootmae
import utils
from datasets import DATA_PIPELINES, build_pretraining_dataset, build_pretraining_loader
from engine_for_pretraining import PIXEL_NORMS, target_patch_count, train_one_epoch
from optim_factory import create_optimizer
from pretraining_state import (build_model, keeps_numbered_checkpoint, load_fixed_target, resume, save_checkpoint,
                               write_metrics)
from target_encoders import TARGET_ENCODERS, build_target_encoder
from visualize import save_reconstruction


# The MAE paper's pretraining (He et al., 2022) as flags of this script: pixel target only (no feature
# predictor, so no momentum encoder), random masking, MAE's decoder of 8 blocks, 512 wide, 16 heads, without
# context injection, and each patch normalised over all its values (MAE's norm_pix_loss). ``--mae`` applies it
# (``benchmarks/bench_pretrain.py --mae`` too, through this parser).
MAE_PRESET = dict(feature_weight=0.0, mask_type="random", context="none", decoder_depth=8, decoder_dim=512,
                  decoder_num_heads=16, pixel_norm="patch", weight_mask=False)


class PresetAction(argparse.Action):
    """A flag that sets several others (``preset``: dest -> value). It leaves alone a flag given before it
    with a value other than the default; flags given after it override it. It stores nothing itself, so a
    run spelt with the preset has the same arguments as one spelt with the flags."""

    def __init__(self, option_strings, dest, preset, **kwargs):
        super().__init__(option_strings, argparse.SUPPRESS, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.preset = preset

    def __call__(self, parser, namespace, values, option_string=None):
        for dest, value in self.preset.items():
            if getattr(namespace, dest) == parser.get_default(dest):
                setattr(namespace, dest, value)


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

    # ablations (README "Ablations"); the defaults are the release's BootMAE
    g = p.add_argument_group("ablations")
    g.add_argument("--mae", action=PresetAction, preset=MAE_PRESET,
                   help="the MAE paper's pretraining: " + " ".join(
                       f"--{k}" if v is True else f"--{k} {v}" for k, v in MAE_PRESET.items() if v is not False)
                   + " (no momentum encoder); flags after --mae override it")
    g.add_argument("--encoder_dim", default=None, type=int,
                   help="encoder width instead of --model's (scaled-down runs, e.g. the CPU CIFAR-10 comparison)")
    g.add_argument("--encoder_depth", default=None, type=int, help="encoder blocks instead of --model's")
    g.add_argument("--encoder_heads", default=None, type=int, help="encoder heads instead of --model's")
    g.add_argument("--decoder_num_heads", default=None, type=int,
                   help="heads of both decoders (default: the encoder's; MAE's decoder: 16)")
    g.add_argument("--feature_decoder_dim", default=None, type=int,
                   help="feature predictor width (default: the encoder's, as in the release)")
    g.add_argument("--context", default="both", choices=["both", "pixel", "feature", "none"],
                   help="context injection (cross-attention to an encoder block): into both decoders, the pixel "
                        "regressor only, the feature predictor only, or none (paper Table 2)")
    g.add_argument("--context_blocks", default=[0, -1], type=int, nargs=2, metavar=("PIXEL", "FEATURE"),
                   help="encoder block feeding the pixel regressor and the feature predictor (paper Table 8; "
                        "negative counts from the end)")
    g.add_argument("--pixel_weight", default=1.0, type=float,
                   help="weight of the pixel loss; 0 = no pixel regressor (feature targets only)")
    g.add_argument("--feature_ramp", default=0.25, type=float,
                   help="fraction of training over which the feature weight rises linearly to full (the "
                        "release's 0.25); 0 = full weight from the first epoch")
    g.add_argument("--target_encoder", default="ema", choices=list(TARGET_ENCODERS),
                   help="ema: momentum encoder updated every step (BootMAE); fixed: --target_checkpoint; k_epoch: "
                        "MAE-K; epoch_ema: EMA-MAE; mae_new: L_fast(epoch_ema) + --slow_weight x L_slow(k_epoch)")
    g.add_argument("--target_checkpoint", default=None,
                   help="checkpoint of the fixed target encoder (ours, the release's or MAE's)")
    g.add_argument("--target_checkpoint_key", default="model_ema|model|module",
                   help="entries of --target_checkpoint to try in order ('|'-separated)")
    g.add_argument("--target_k", default=10, type=int, help="K of MAE-K: epochs between target refreshes")
    g.add_argument("--target_tau", default=0.005, type=float,
                   help="tau of EMA-MAE: target = (1 - tau) target + tau online after every epoch")
    g.add_argument("--slow_weight", default=0.2, type=float, help="lambda of MAE-new (weight of the K-epoch loss)")
    g.add_argument("--pixel_warmup_epochs", default=0, type=int,
                   help="epochs of pixel loss only before the feature loss starts (the report's WSE)")
    g.add_argument("--target_fraction", default=1.0, type=float,
                   help="fraction of the image fed to the momentum encoder: 1 = the full image; below 1, that "
                        "many patches drawn from the masked ones, and the feature loss only on them (paper Table 5)")
    g.add_argument("--metrics_json", default=None,
                   help="at the end, write the last epoch's metrics and the median seconds per step to this file")

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
# checked in check_ablation_args
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
    try:
        model_cfg = modeling_bootmae.MODEL_SIZES[args.model.replace("bootmae_", "")]
    except KeyError:
        raise utils.UsageError(f"unknown --model {args.model}; choose one of "
                               + ", ".join(f"bootmae_{k}" for k in modeling_bootmae.MODEL_SIZES)) from None
    if args.model != "bootmae_" + args.model.replace("bootmae_", ""):
        raise utils.UsageError(f"unknown --model {args.model}; choose one of "
                               + ", ".join(f"bootmae_{k}" for k in modeling_bootmae.MODEL_SIZES))
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
    check_ablation_args(args, args.encoder_depth or model_cfg["depth"], num_patches)
    if args.save_ckpt_freq < 0:
        raise utils.UsageError(f"--save_ckpt_freq {args.save_ckpt_freq} is negative; give N > 0 to keep "
                               f"checkpoint-N.pth every N epochs, or 0 for checkpoint-last.pth only")
    if args.resume and not os.path.isfile(args.resume):
        raise utils.UsageError(f"--resume {args.resume} does not exist; give the path of a checkpoint-*.pth")
    args.patch_size = patch


def check_ablation_args(args, depth, num_patches):
    """Refuse flag combinations of the ablations that make no sense, one line each."""
    kind = args.target_encoder
    if args.pixel_weight == 0 and args.feature_weight == 0:
        raise utils.UsageError("--pixel_weight 0 and --feature_weight 0 leave nothing to learn; keep one of them")
    if args.feature_weight == 0:
        for flag, changed in (("--target_encoder", kind != "ema"), ("--target_checkpoint", args.target_checkpoint),
                              ("--target_fraction", args.target_fraction != 1.0),
                              ("--pixel_warmup_epochs", args.pixel_warmup_epochs),
                              ("--context feature", args.context == "feature")):
            if changed:
                raise utils.UsageError(f"{flag} sets up the feature targets but --feature_weight 0 has none; "
                                       f"drop {flag} or give the feature loss a weight")
    # decoder widths are left alone: a table's shared recipe may set them for rows without that decoder
    if args.pixel_weight == 0 and not args.pixel_warmup_epochs and args.context == "pixel":
        raise utils.UsageError("--context pixel injects context into the pixel regressor, but --pixel_weight 0 "
                               "builds none; use --context none or give the pixel loss a weight")
    if not 0 < args.target_fraction <= 1:
        raise utils.UsageError(f"--target_fraction {args.target_fraction} is outside (0, 1]; give the fraction "
                               f"of the image fed to the momentum encoder, e.g. 0.25 or 1")
    if args.target_fraction < 1:
        count = target_patch_count(args.target_fraction, num_patches)
        if not 1 <= count <= args.mask_num:
            raise utils.UsageError(f"--target_fraction {args.target_fraction} feeds {count} of {num_patches} patches "
                                   f"to the momentum encoder, but they are drawn from the {args.mask_num} masked "
                                   f"ones; use at most {args.mask_num / num_patches:.4g} (1 = the full image)")
    for flag, block in zip(("pixel", "feature"), args.context_blocks):
        if not -depth <= block < depth:
            raise utils.UsageError(f"--context_blocks: the {flag} block {block} is beyond the encoder's {depth} "
                                   f"blocks of {args.model}; use 0..{depth - 1} (or -{depth}..-1)")
    if kind == "fixed" and not args.target_checkpoint:
        raise utils.UsageError("--target_encoder fixed needs --target_checkpoint (the encoder whose features are "
                               "the targets)")
    if args.target_checkpoint:
        if kind != "fixed":
            raise utils.UsageError(f"--target_checkpoint is only read by --target_encoder fixed, not {kind}; add "
                                   f"--target_encoder fixed or drop it")
        if not os.path.isfile(args.target_checkpoint):
            raise utils.UsageError(f"--target_checkpoint {args.target_checkpoint} does not exist; give the path of "
                                   f"a checkpoint")
    if args.target_k < 1:
        raise utils.UsageError(f"--target_k {args.target_k} must be at least 1 (epochs between target refreshes)")
    if not 0 < args.target_tau <= 1:
        raise utils.UsageError(f"--target_tau {args.target_tau} is outside (0, 1]; the report uses 0.005")
    if not 0 <= args.pixel_warmup_epochs < args.epochs:
        raise utils.UsageError(f"--pixel_warmup_epochs {args.pixel_warmup_epochs} must be in 0..{args.epochs - 1} "
                               f"(--epochs {args.epochs}), or the feature loss never starts")
    if kind != "ema" and not args.model_ema:
        raise utils.UsageError(f"--no_model_ema switches off BootMAE's momentum encoder, not --target_encoder {kind}; "
                               f"drop --no_model_ema")
    for flag in ("encoder_dim", "encoder_depth", "encoder_heads", "decoder_num_heads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise utils.UsageError(f"--{flag} must be at least 1")
    if args.encoder_dim and args.encoder_dim % 4:
        raise utils.UsageError(f"--encoder_dim {args.encoder_dim} must be a multiple of 4 (sin-cos position table)")
    if args.context == "none" and args.context_blocks != [0, -1]:
        raise utils.UsageError("--context_blocks has no effect with --context none; drop one of them")
    for flag in ("decoder_dim", "feature_decoder_dim"):
        width = getattr(args, flag)
        if width is not None and (width < 4 or width % 4):
            raise utils.UsageError(f"--{flag} {width} must be a positive multiple of 4 (sin-cos position table)")


def resolve_device_defaults(args, device):
    """--amp and --compile for the device (see their help); returns the autocast dtype."""
    args.amp, amp_dtype = utils.resolve_amp(args.amp, device)
    if args.compile is None:
        args.compile = device.type == "cuda"
    return amp_dtype


def build_data(args, device):
    """The dataset, its sampler over the processes and the loader of --data_pipeline."""
    dataset = build_pretraining_dataset(args)
    world, rank = utils.get_world_size(), utils.get_rank()
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=args.seed)
    loader = build_pretraining_loader(args, dataset, sampler, device)   # items of dataset: the pil pipeline's
    if len(loader) // args.update_freq == 0:
        raise utils.UsageError(f"{len(dataset)} images over {world} processes give no full step of --batch_size "
                               f"{args.batch_size} x --update_freq {args.update_freq}; lower them or add data")
    utils.print0(f"data: {len(dataset)} images, {len(loader)} batches of {args.batch_size} per process, "
                 f"transform {dataset.transform!r}" if hasattr(dataset, "transform")
                 else f"data: {len(dataset)} images")
    return dataset, sampler, loader


def wrap_model(args, model, device):
    """The model as trained (DDP, compiled) and its target encoder (None without a feature loss)."""
    model_ddp = model
    if args.distributed:
        # a pixel-only warm-up leaves the feature predictor out of the first epochs' graphs (and, with
        # --pixel_weight 0, the regressor out of the later ones); every other configuration uses every parameter
        model_ddp = DistributedDataParallel(model, device_ids=[args.gpu] if device.type == "cuda" else None,
                                            find_unused_parameters=args.pixel_warmup_epochs > 0)
    # after the DDP wrap, which broadcasts rank 0's initial weights: every rank's target encoder must
    # start from those, not from its own (differently seeded) initialisation
    fixed = load_fixed_target(args, model) if args.target_encoder == "fixed" and args.feature_weight > 0 else None
    targets = build_target_encoder(args, model, fixed)
    if targets is not None:
        fed = target_patch_count(args.target_fraction, model.patch_embed.num_patches)
        utils.print0(f"target encoder: {targets.kind}, {fed} patches per image fed to it")
    if args.compile:
        # the EMA update reads the uncompiled module's tensors, which the compiled graphs share
        model_ddp = torch.compile(model_ddp)
        if targets is not None:
            targets.compile()
        utils.print0("torch.compile: model, target encoder and losses compiled (the first steps include compilation)")
    return model_ddp, targets


def build_optimisation(args, model, num_batches, world, device):
    """AdamW, the loss scaler and the per-step lr and weight-decay schedules; the lr scaled by the total batch."""
    total_batch = args.batch_size * args.update_freq * world
    base_lr = args.lr
    args.lr = base_lr * total_batch / 256
    steps_per_epoch = num_batches // args.update_freq
    utils.print0(f"lr {args.lr:.3e} (base {base_lr:.3e} x total batch {total_batch} / 256), "
                 f"{steps_per_epoch} steps per epoch")
    if args.min_lr > args.lr:
        utils.print0(f"warning: --min_lr {args.min_lr:.3e} is above the scaled lr {args.lr:.3e}, so the cosine "
                     f"rises to it (min_lr is absolute, as in the release); lower --min_lr for small batches")
    optimizer = create_optimizer(args, model)
    loss_scaler = utils.LossScaler(device.type, fp16=args.amp == "fp16")
    lr_schedule = utils.cosine_scheduler(args.lr, args.min_lr, args.epochs, steps_per_epoch, args.warmup_epochs,
                                         args.warmup_lr)
    wd_end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
    wd_schedule = utils.cosine_scheduler(args.weight_decay, wd_end, args.epochs, steps_per_epoch)
    args.lr = base_lr  # checkpoints store the base lr, as given on the command line
    return optimizer, loss_scaler, lr_schedule, wd_schedule


def main(args):
    check_args(args)
    utils.init_distributed_mode(args)
    device = torch.device(args.device)
    amp_dtype = resolve_device_defaults(args, device)
    utils.seed_everything(args.seed + utils.get_rank())
    utils.print0("args: " + json.dumps({k: v for k, v in vars(args).items()}, default=str))

    dataset, sampler, loader = build_data(args, device)
    world, rank = utils.get_world_size(), utils.get_rank()

    # model
    model = build_model(args)
    model.to(device)
    utils.print0(f"model: {args.model}, {modeling_bootmae.count_trainable(model):,} trainable parameters")
    knn_monitor = knn.KnnMonitor.from_args(args, device, amp_dtype)  # None unless --knn_freq

    model_ddp, targets = wrap_model(args, model, device)
    momentum_encoder = targets.ema if targets is not None and targets.kind == "ema" else None

    optimizer, loss_scaler, lr_schedule, wd_schedule = build_optimisation(args, model, len(loader), world, device)
    start_epoch = resume(args, model, targets, optimizer, loss_scaler)
    checkpoints.remove_stale_temporaries(args.output_dir)

    # the output folder and the TensorBoard events file appear with the run's first record (LazySummaryWriter,
    # checkpoints.append_log, checkpoints.save_on_master): a run that fails before it has anything to write leaves
    # nothing
    log_writer = (utils.LazySummaryWriter(args.log_dir or args.output_dir)
                  if utils.is_main_process() and args.output_dir else None)

    utils.print0(f"training epochs {start_epoch}..{args.epochs - 1}")
    start_time = time.time()
    step_times, record = [], None
    for epoch in range(start_epoch, args.epochs):
        utils.seed_everything(args.seed + 1000003 * epoch + rank)
        sampler.set_epoch(epoch)
        stats = train_one_epoch(model_ddp, targets, loader, optimizer, loss_scaler, device, epoch,
                                lr_schedule, wd_schedule, args, log_writer, amp_dtype)
        # log.txt's records are reproduced exactly by a resumed run, except the WALL_CLOCK_STATS (images/s, data wait)
        step_times.append(stats.pop("s_per_step"))
        if log_writer is not None:
            log_writer.add_scalar("perf/s_per_step", step_times[-1], epoch)
        record = {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items()}}
        if knn_monitor is not None:
            record.update(knn_monitor(epoch, model, momentum_encoder, log_writer))
        # the epoch's record, then its checkpoints: a run killed before checkpoint-last.pth moves on repeats
        # the epoch, and its first record replaces the one left behind (checkpoints.append_log)
        checkpoints.append_log(args.output_dir, record)
        save_checkpoint(args, epoch, model, targets, optimizer, loss_scaler)
        summary = (f"epoch {epoch} done: loss {stats['loss']:.4f} (pixel {stats['pixel_loss']:.4f}, feature "
                   f"{stats['feature_loss']:.4f}) averaged over {world} process(es)")
        if args.log_all_ranks:
            print(f"[rank {rank}] {summary}", flush=True)
        else:
            utils.print0(summary)
        if utils.is_main_process() and args.output_dir and (keeps_numbered_checkpoint(args, epoch)
                                                             or epoch + 1 == args.epochs):
            # the same crops and masks every time: a seed that no epoch uses (each epoch reseeds at its start)
            utils.seed_everything(args.seed - 1)
            save_reconstruction(args, model, dataset, device, os.path.join(args.output_dir, "reconstruction.png"),
                                log_writer, epoch)
        if log_writer is not None:
            log_writer.flush()
    if log_writer is not None:
        log_writer.close()
    utils.print0(f"training time {utils.format_seconds(time.time() - start_time)}")
    if args.metrics_json and utils.is_main_process() and record is not None:
        write_metrics(args.metrics_json, record, step_times, time.time() - start_time, model)


def cli():
    utils.run_cli("BootMAE pretraining", get_args_parser, main)


if __name__ == "__main__":
    cli()
