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

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from timm.models import create_model

import checkpoints
import knn
import modeling_bootmae  # noqa: F401  (registers the bootmae_* models with timm)
import utils
from datasets import DATA_PIPELINES, build_pretraining_dataset, build_pretraining_loader, mean_std
from engine_for_pretraining import (PIXEL_NORMS, normalized_pixel_target, patchify, pixels_of_prediction,
                                    target_patch_count, train_one_epoch, unpatchify)
from modeling_bootmae import from_release_state_dict, is_release_state_dict
from optim_factory import create_optimizer
from target_encoders import TARGET_ENCODERS, build_target_encoder, copy_encoder


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
    p.add_argument("--epochs", default=800, type=int)
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


def model_kwargs(args):
    """Constructor arguments of the model the flags describe (the release's BootMAE by default). Which
    branches exist: the pixel regressor unless the pixel loss is off for the whole run, the feature predictor
    unless --feature_weight 0 (then no target encoder either: nothing unused under DDP)."""
    pixel_branch = args.pixel_weight > 0 or args.pixel_warmup_epochs > 0
    kw = dict(img_size=args.input_size, patch_size=args.patch_size, drop_path_rate=args.drop_path,
              decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth)
    if not pixel_branch:
        kw["pixel_branch"] = False
    if args.feature_weight == 0:
        kw["feature_branch"] = False
    if args.context in ("feature", "none"):
        kw["pixel_context"] = False
    if args.context in ("pixel", "none"):
        kw["feature_context"] = False
    if list(args.context_blocks) != [0, -1]:
        kw["context_blocks"] = tuple(args.context_blocks)
    for flag, key in (("encoder_dim", "embed_dim"), ("encoder_depth", "depth"), ("encoder_heads", "num_heads"),
                      ("decoder_num_heads", "decoder_num_heads")):
        if getattr(args, flag):
            kw[key] = getattr(args, flag)
    if args.feature_decoder_dim:
        kw["feature_decoder_dim"] = args.feature_decoder_dim
    return kw


def build_model(args, **overrides):
    """The online model of the flags; ``overrides`` replace constructor arguments (the tests shrink models)."""
    model = create_model(args.model, **{**model_kwargs(args), **overrides})
    model.default_cfg_name = args.model
    return model


def load_fixed_target(args, model):
    """The frozen encoder of --target_checkpoint, with ``model``'s encoder architecture. Reads our and the
    release's checkpoints and MAE's (its full qkv bias is split, and its position table, which orders the
    sin-cos columns differently from ours, is used as stored)."""
    path, key = args.target_checkpoint, args.target_checkpoint_key
    ckpt = checkpoints.load_checkpoint(path)
    try:
        state = modeling_bootmae.split_qkv_bias(modeling_bootmae.encoder_state_dict(ckpt, key))
    except ValueError as e:
        raise utils.UsageError(f"--target_checkpoint {path}: {utils.one_line_error(e)}") from e
    net = copy_encoder(model)
    try:
        _, missing, _ = modeling_bootmae.load_encoder(net, state)
    except ValueError as e:
        raise utils.UsageError(f"--target_checkpoint {path}: {utils.one_line_error(e)}") from e
    if missing:
        raise utils.UsageError(f"--target_checkpoint {path} lacks {len(missing)} encoder tensors of --model "
                               f"{args.model} (e.g. {missing[0]}); give a checkpoint of the same model size")
    entry = next((ckpt[k] for k in key.split("|") if isinstance(ckpt, dict) and isinstance(ckpt.get(k), dict)), ckpt)
    table = entry.get("pos_embed") if isinstance(entry, dict) else None
    if torch.is_tensor(table) and table.shape == net.pos_embed.shape:
        net.pos_embed.copy_(table)
    utils.print0(f"fixed target encoder: {path} (entry '{key}'), {len(state)} tensors")
    return net


def resolve_device_defaults(args, device):
    """--amp and --compile for the device (see their help); returns the autocast dtype."""
    args.amp, amp_dtype = utils.resolve_amp(args.amp, device)
    if args.compile is None:
        args.compile = device.type == "cuda"
    return amp_dtype


def _model_state(state_dict):
    return from_release_state_dict(state_dict) if is_release_state_dict(state_dict) else state_dict


def _check_shapes(model, state_dict, path, what):
    own = model.state_dict()
    bad = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state_dict]
    extra = [k for k in state_dict if k not in own]
    if bad or missing or extra:
        if bad:
            detail = f"{len(bad)} tensors of another shape (e.g. {bad[0]}: {tuple(state_dict[bad[0]].shape)} vs " \
                     f"{tuple(own[bad[0]].shape)})"
        elif missing:
            detail = f"{len(missing)} missing tensors (e.g. {missing[0]})"
        else:
            detail = f"{len(extra)} tensors this configuration does not have (e.g. {extra[0]})"
        raise utils.UsageError(f"{path} holds a {what} that does not fit --model {model.default_cfg_name}: "
                               f"{detail}; pass the --model (and decoder and ablation flags) it was trained with")


def resume(args, model, targets, optimizer, loss_scaler):
    """Loads model, target encoder (the momentum encoder's ``model_ema``, or ``target_encoder``), optimizer
    and scaler state; returns the epoch to start from. Accepts our checkpoints and the release's (its key
    names are converted). Warns when the schedule-defining flags differ from the checkpoint's (``args.lr``
    is the base lr here, as checkpoints store it)."""
    path, ckpt = checkpoints.load_resume_checkpoint(args.resume, args.output_dir, args.auto_resume)
    if ckpt is None:
        return args.start_epoch
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise utils.UsageError(f"{path} has no 'model' entry; it is not a pretraining checkpoint")
    state = _model_state(ckpt["model"])
    _check_shapes(model, state, path, "model")
    model.load_state_dict(state)
    release = is_release_state_dict(ckpt["model"])
    if targets is not None and targets.kind == "ema":
        momentum_encoder = targets.ema
        if "model_ema" in ckpt:
            ema_state = _model_state(ckpt["model_ema"])
            _check_shapes(momentum_encoder.module, ema_state, path, "momentum encoder")
            momentum_encoder.module.load_state_dict(ema_state)
        else:
            utils.print0(f"resume: {path} has no model_ema; the momentum encoder starts from the model")
            momentum_encoder.module.load_state_dict(state)
    elif targets is not None:
        saved = ckpt.get("target_encoder")
        if saved is None:
            how = ("read from --target_checkpoint" if targets.kind == "fixed"
                   else "copied from the model when first used")
            utils.print0(f"resume: {path} has no target_encoder; the {targets.kind} target is {how}")
        elif saved.get("kind") != targets.kind:
            raise utils.UsageError(f"{path} was trained with --target_encoder {saved.get('kind')}, not "
                                   f"{targets.kind}; pass the flags it was trained with")
        else:
            targets.load_state_dict(saved["state"])
    if "optimizer" in ckpt and "epoch" in ckpt:
        if checkpoints.optimizer_state_fits(optimizer, ckpt["optimizer"]):
            optimizer.load_state_dict(ckpt["optimizer"])
        else:
            utils.print0(f"resume: optimizer state in {path} does not match this model's parameter groups "
                         f"({'release ordering' if release else 'other model'}); AdamW moments restart")
        if "scaler" in ckpt:
            loss_scaler.load_state_dict(ckpt["scaler"])
    start = int(ckpt.get("epoch", -1)) + 1
    utils.print0(f"resume: {path} ({'release' if release else 'our'} format), continuing at epoch {start}")
    checkpoints.warn_schedule_changes(args, ckpt, path, SCHEDULE_FLAGS)
    return start


# the flags that define the lr and weight-decay schedules (with the total batch, which scales the lr)
SCHEDULE_FLAGS = ("epochs", "warmup_epochs", "lr", "min_lr", "warmup_lr", "weight_decay", "weight_decay_end")


def save_checkpoint(args, epoch, model, targets, optimizer, loss_scaler):
    """The release's layout (model, model_ema, optimizer, scaler, epoch, args), written atomically:
    checkpoint-<epoch>.pth on ``keeps_numbered_checkpoint`` epochs, then checkpoint-last.pth every epoch (last,
    so that a run killed before it repeats the whole epoch). The other target encoders go under
    ``target_encoder`` ({"kind", "state"}), so a resume is exact. ``args`` is stored as a plain dict."""
    if not args.output_dir:
        return
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": loss_scaler.state_dict(),
            "epoch": epoch, "args": checkpoints.args_dict(args)}
    if targets is not None and targets.kind == "ema":
        ckpt["model_ema"] = targets.ema.module.state_dict()
    elif targets is not None:
        ckpt["target_encoder"] = {"kind": targets.kind, "state": targets.state_dict()}
    if keeps_numbered_checkpoint(args, epoch):
        checkpoints.save_on_master(ckpt, os.path.join(args.output_dir, f"checkpoint-{epoch}.pth"))
    checkpoints.save_on_master(ckpt, os.path.join(args.output_dir, "checkpoint-last.pth"))


def keeps_numbered_checkpoint(args, epoch):
    """checkpoint-<epoch>.pth every --save_ckpt_freq epochs and after the last one; none with 0."""
    return args.save_ckpt_freq > 0 and ((epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 == args.epochs)


# the columns of the reconstruction grid; target and prediction are shown in the space of --pixel_norm
RECONSTRUCTION_COLUMNS = ("input", "masked input", "target", "prediction", "pasted")
RECONSTRUCTION_MIN_SIDE = 96   # smaller panels are enlarged (nearest neighbour) so that the labels fit
RECONSTRUCTION_HEADER = 28     # pixels above the grid for the two-line column labels


def reconstruction_panels(images, mask, pixel_pred, patch_size, norm, mean, std):
    """The reconstruction grid's panels, [B, 5, 3, H, W] in [0, 1], in the order of ``RECONSTRUCTION_COLUMNS``:

    input         the image (the dataset normalisation undone)
    masked input  its visible patches; masked ones black
    target        the pixel target of ``norm`` (``normalized_pixel_target``) on the masked patches
    prediction    the regressor's output as it is, on the masked patches, drawn exactly as the target
    pasted        the visible patches with the prediction in the masked ones, in pixels: the prediction
                  de-normalised with the true patches' own mean and std (``pixels_of_prediction``)

    Target and prediction share one fixed mapping: per-patch normalised values (``channel``, ``patch``) as
    0.5 + v / 6 (-3..3 std to black..white), ``none`` as pixels; visible patches are black (no loss there).
    A regressor that predicts zeros shows a flat panel there, whatever the target."""
    B, _, H, W = images.shape
    grid = (H // patch_size, W // patch_size)
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images.device)
    std = torch.as_tensor(std, dtype=torch.float32, device=images.device)

    def show(patches, as_pixels):
        x = patches.float().reshape(B, grid[0] * grid[1], -1, 3)   # (p, q, channel) order: channel last
        x = x * std + mean if as_pixels else 0.5 + x / 6
        return unpatchify(x.clamp(0, 1).flatten(2), patch_size, grid)

    patches = patchify(images.float(), patch_size)
    m = mask.reshape(B, -1, 1).float()
    masked = unpatchify(m.expand_as(patches), patch_size, grid)
    pixels = norm == "none"
    pasted = patches * (1 - m) + pixels_of_prediction(pixel_pred, images, patch_size, norm=norm) * m
    panels = [show(patches, True), show(patches, True) * (1 - masked),
              show(normalized_pixel_target(images, patch_size, norm=norm), pixels) * masked,
              show(pixel_pred, pixels) * masked, show(pasted, True)]
    return torch.stack(panels, 1)


def reconstruction_grid(panels, norm):
    """The panels [B, 5, 3, H, W] as one labelled uint8 image [H', W', 3]: one row per image, a header that
    names each column (and the normalisation that target and prediction are shown in)."""
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid
    B, C, _, H, W = panels.shape
    scale = -(-RECONSTRUCTION_MIN_SIDE // min(H, W))
    x = panels.flatten(0, 1).repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    grid = make_grid(x, nrow=C, padding=2, pad_value=1.0)
    header = torch.ones(3, RECONSTRUCTION_HEADER, grid.shape[-1], dtype=grid.dtype, device=grid.device)
    rgb = (torch.cat([header, grid], 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    space = "pixels" if norm == "none" else f"{norm} norm"
    second = {"target": space, "prediction": space, "pasted": "true mean/std" if norm != "none" else ""}
    img = Image.fromarray(rgb)
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    for col, name in enumerate(RECONSTRUCTION_COLUMNS):
        left = 2 + col * (W * scale + 2)
        draw.text((left + 2, 2), name, fill=(0, 0, 0), font=font)
        draw.text((left + 2, 14), second.get(name, ""), fill=(0, 0, 0), font=font)
    return np.asarray(img)


@torch.no_grad()
def save_reconstruction(args, model, dataset, device, path, log_writer=None, epoch=0, num_images=4):
    """The first ``num_images`` items of ``dataset`` through ``model`` (eval mode, float32): the labelled grid
    of ``reconstruction_panels`` written to ``path`` (PNG, atomically) and to TensorBoard (``reconstruction``,
    step ``epoch``). Returns the panels, or None for a model without a pixel regressor (nothing to show)."""
    was_training = model.training
    model.eval()
    items = [dataset[i] for i in range(min(num_images, len(dataset)))]
    images = torch.stack([torch.as_tensor(x) for x, _ in items]).to(device).float()
    mask = torch.stack([torch.as_tensor(m).flatten() for _, m in items]).to(device)
    pixel_pred, _ = model(images, mask, feature=False)
    model.train(was_training)
    if pixel_pred is None:
        return None
    panels = reconstruction_panels(images, mask, pixel_pred, model.patch_size, args.pixel_norm, *mean_std(args))
    grid = reconstruction_grid(panels, args.pixel_norm)
    from PIL import Image
    Image.fromarray(grid).save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)
    if log_writer is not None:
        log_writer.add_image("reconstruction", grid, epoch, dataformats="HWC")
    return panels


def main(args):
    check_args(args)
    utils.init_distributed_mode(args)
    device = torch.device(args.device)
    amp_dtype = resolve_device_defaults(args, device)
    utils.seed_everything(args.seed + utils.get_rank())
    utils.print0("args: " + json.dumps({k: v for k, v in vars(args).items()}, default=str))

    # data
    dataset = build_pretraining_dataset(args)
    world, rank = utils.get_world_size(), utils.get_rank()
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=args.seed)
    loader = build_pretraining_loader(args, dataset, sampler, device)   # items of dataset: the pil pipeline's
    if len(loader) // args.update_freq == 0:
        raise utils.UsageError(f"{len(dataset)} images over {world} processes give no full step of --batch_size "
                               f"{args.batch_size} x --update_freq {args.update_freq}; lower them or add data")
    utils.print0(f"data: {len(dataset)} images, {len(loader)} batches of {args.batch_size} per process, "
                 f"transform {dataset.transform!r}" if hasattr(dataset, "transform") else f"data: {len(dataset)} images")

    # model
    model = build_model(args)
    model.to(device)
    utils.print0(f"model: {args.model}, {modeling_bootmae.count_trainable(model):,} trainable parameters")
    knn_monitor = knn.KnnMonitor.from_args(args, device, amp_dtype)  # None unless --knn_freq

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
    momentum_encoder = targets.ema if targets is not None and targets.kind == "ema" else None
    if targets is not None:
        fed = target_patch_count(args.target_fraction, model.patch_embed.num_patches)
        utils.print0(f"target encoder: {targets.kind}, {fed} patches per image fed to it")
    if args.compile:
        # the EMA update reads the uncompiled module's tensors, which the compiled graphs share
        model_ddp = torch.compile(model_ddp)
        if targets is not None:
            targets.compile()
        utils.print0("torch.compile: model, target encoder and losses compiled (the first steps include compilation)")

    # optimisation
    total_batch = args.batch_size * args.update_freq * world
    base_lr = args.lr
    args.lr = base_lr * total_batch / 256
    steps_per_epoch = len(loader) // args.update_freq
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


def write_metrics(path, record, step_times, seconds, model):
    """The run's final metrics as one JSON object (scripts/ablations gathers these into tables)."""
    steps = sorted(step_times)
    metrics = {**record, "s_per_step": steps[len(steps) // 2], "train_seconds": seconds,
               "trainable_parameters": modeling_bootmae.count_trainable(model)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(metrics, f, indent=1)
    os.replace(path + ".tmp", path)


def cli():
    utils.run_cli("BootMAE pretraining", get_args_parser, main)


if __name__ == "__main__":
    cli()
