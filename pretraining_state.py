"""What a pretraining run builds from its flags and keeps between runs: the model (``build_model``), the frozen
target of ``--target_encoder fixed`` (``load_fixed_target``), the checkpoints (``save_checkpoint``, ``resume``,
which also read the release's) and the final metrics (``write_metrics``)."""
import os

import torch
from timm.models import create_model

import checkpoints
import modeling_bootmae  # registers the bootmae_* models with timm
import release_format
import utils
from release_format import from_release_state_dict, is_release_state_dict
from target_encoders import copy_encoder


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
        state = release_format.split_qkv_bias(release_format.encoder_state_dict(ckpt, key))
    except ValueError as e:
        raise utils.UsageError(f"--target_checkpoint {path}: {utils.one_line_error(e)}") from e
    net = copy_encoder(model)
    try:
        _, missing, _ = release_format.load_encoder(net, state)
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


def write_metrics(path, record, step_times, seconds, model):
    """The run's final metrics as one JSON object (scripts/ablations gathers these into tables)."""
    steps = sorted(step_times)
    metrics = {**record, "s_per_step": steps[len(steps) // 2], "train_seconds": seconds,
               "trainable_parameters": modeling_bootmae.count_trainable(model)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    utils.write_json_atomic(path, metrics)
