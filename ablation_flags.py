"""The ablation flags of run_pretraining.py (the paper's tables, the CIFAR-10 study of bootstrapped MAE
variants): their parser group, the ``--mae`` preset, and the checks that refuse combinations that make no sense."""
import argparse
import os

import utils
from engine_for_pretraining import target_patch_count
from target_encoders import TARGET_ENCODERS


# The MAE paper's pretraining (He et al., 2022) as flags of run_pretraining.py: pixel target only (no feature
# predictor, so no momentum encoder), random masking, MAE's decoder of 8 blocks, 512 wide, 16 heads, without
# context injection, and each patch normalised over all its values (MAE's norm_pix_loss). ``--mae`` applies it
# (``benchmarks/bench_pretrain.py --mae`` too, through the same parser).
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


def add_ablation_args(p):
    """The ablation flags (README "Ablations") as a group of ``p``; the defaults are the release's BootMAE."""
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
