"""BootMAE fine-tuning and evaluation for image classification (BEiT's recipe, the release's flags).

    python run_class_finetuning.py --model bootmae_base_patch16_224 --finetune pretrain/checkpoint-799.pth \
        --data_path /path/to/imagenet --output_dir out/ [flags]
    torchrun --nproc_per_node 8 run_class_finetuning.py ...        (one or several nodes; srun works too)
    python run_class_finetuning.py --eval --resume out/checkpoint-best.pth --data_path ...

The encoder (``modeling_bootmae.VisionTransformerForClassification``) is loaded from a pretraining
checkpoint, ours or the release's (``--model_key model`` is the online encoder). ``--lr`` is absolute: the
release's fine-tuning does not scale it by the batch (its 5e-3 for ViT-B is for a total batch of 2048).
See README.md, section Fine-tuning.
"""
import argparse
import importlib.util
import json
import os

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import create_model
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel

import checkpoints
import datasets
import finetune_deepspeed
import modeling_bootmae
import utils
from checkpoints import load_classifier, load_classifier_resume, load_optimizer_state, load_pretrained_encoder
from engine_for_finetuning import evaluate_checkpoint, evaluate_epoch, train_one_epoch
from optim_factory import adamw, finetune_param_groups

# the classifiers registered by modeling_bootmae, by size
CLASSIFIERS = {f"bootmae_{size}_patch{cfg['patch_size']}_224": size
               for size, cfg in modeling_bootmae.MODEL_SIZES.items()}
# the release's --data_set names
DATA_SET_ALIASES = {"IMNET": "image_folder", "CIFAR": "cifar100"}


def get_args_parser():
    p = argparse.ArgumentParser("BootMAE fine-tuning", add_help=False)
    p.add_argument("--batch_size", default=64, type=int, help="images per process and step")
    p.add_argument("--epochs", default=30, type=int)
    p.add_argument("--update_freq", default=1, type=int, help="gradient accumulation steps")
    p.add_argument("--save_ckpt_freq", default=5, type=int,
                   help="also keep checkpoint-N.pth every N epochs (0: only checkpoint-last/-best.pth)")
    p.add_argument("--print_freq", default=10, type=int, help="steps between log lines (the only host syncs)")

    # model
    p.add_argument("--model", default="bootmae_base_patch16_224", type=str, help=", ".join(CLASSIFIERS))
    p.add_argument("--input_size", default=224, type=int, help="image side in pixels")
    p.add_argument("--patch_size", default=None, type=int,
                   help="patch side (default: the model's); must match the pretraining checkpoint's")
    p.add_argument("--drop", default=0.0, type=float, help="dropout rate")
    p.add_argument("--attn_drop_rate", default=0.0, type=float, help="attention dropout rate")
    p.add_argument("--drop_path", default=0.1, type=float, help="stochastic depth rate")
    p.add_argument("--init_scale", default=0.001, type=float, help="scale of the head's trunc-normal(0.02) init")
    p.add_argument("--use_mean_pooling", action="store_true", default=True,
                   help="mean of the patch tokens + fc_norm (default, the release's)")
    p.add_argument("--use_cls", action="store_false", dest="use_mean_pooling", help="cls token after the norm")
    # the release's command lines pass these; sin-cos absolute positions without relative bias and without
    # layer scale are what its fine-tuning model does, and the only behaviour here
    p.add_argument("--abs_pos_emb", action="store_true", help="accepted; the fixed sin-cos table is always used")
    p.add_argument("--rel_pos_bias", action="store_true", help="not supported (BootMAE has no relative bias)")
    p.add_argument("--disable_rel_pos_bias", action="store_false", dest="rel_pos_bias", help="accepted (default)")
    p.add_argument("--layer_scale_init_value", default=None, help="accepted; no effect (the release's blocks "
                                                                      "are built without layer scale)")
    p.add_argument("--disable_eval_during_finetuning", action="store_true")
    p.add_argument("--eval_all", action="store_true", help="accepted; every epoch is evaluated anyway")

    # model EMA
    p.add_argument("--model_ema", action="store_true", help="keep an EMA of the weights, evaluated every epoch")
    p.add_argument("--model_ema_decay", default=0.9999, type=float, help="the release's recipes use 0.9998")
    p.add_argument("--model_ema_force_cpu", action="store_true")

    # optimisation
    p.add_argument("--opt", default="adamw", choices=["adamw"])
    p.add_argument("--opt_eps", default=1e-8, type=float)
    p.add_argument("--opt_betas", default=None, type=float, nargs=2, help="default 0.9 0.999")
    p.add_argument("--clip_grad", default=None, type=float, help="gradient norm clip (default: none)")
    p.add_argument("--weight_decay", default=0.05, type=float)
    p.add_argument("--weight_decay_end", default=None, type=float, help="cosine weight decay end (default: constant)")
    p.add_argument("--lr", default=5e-4, type=float,
                   help="peak lr, absolute (not scaled by the batch, as in the release's fine-tuning)")
    p.add_argument("--layer_decay", default=0.9, type=float,
                   help="layer-wise lr decay (release recipes: 0.6 ViT-B, 0.75 ViT-L)")
    p.add_argument("--backbone_decay", default=1.0, type=float, help="extra lr factor of all encoder layers")
    p.add_argument("--warmup_lr", default=0.0, type=float,
                   help="lr at the start of warm-up (the release's warm-up starts at 0)")
    p.add_argument("--min_lr", default=1e-6, type=float, help="final lr of the cosine")
    p.add_argument("--warmup_epochs", default=5, type=int)
    p.add_argument("--warmup_steps", default=-1, type=int, help="warm-up in steps; overrides --warmup_epochs if > 0")
    p.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"],
                   help="precision (default: bf16 on CUDA if supported, else fp16; none on CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training forward (same mathematics; not with --enable_deepspeed). "
                        "Default: on for CUDA without DeepSpeed (a ViT-B step 1.37x faster on an H100), off on CPU")

    # augmentation
    p.add_argument("--color_jitter", default=0.4, type=float, help="(unused when --aa is set, as in timm)")
    p.add_argument("--aa", default="rand-m9-mstd0.5-inc1", type=str, help="timm auto-augment policy; 'none' for off")
    p.add_argument("--smoothing", default=0.1, type=float, help="label smoothing")
    p.add_argument("--train_interpolation", default="bicubic", type=str)
    p.add_argument("--crop_pct", default=None, type=float,
                   help="evaluation centre crop (default 224/256 below 384 px, 1.0 from 384 px and at 32 px)")
    p.add_argument("--reprob", default=0.25, type=float, help="random erasing probability")
    p.add_argument("--remode", default="pixel", type=str, help="random erasing mode")
    p.add_argument("--recount", default=1, type=int, help="random erasing count")
    p.add_argument("--resplit", action="store_true", help="accepted; no augmentation splits are used")
    p.add_argument("--mixup", default=0.0, type=float, help="mixup alpha (on if > 0)")
    p.add_argument("--cutmix", default=0.0, type=float, help="cutmix alpha (on if > 0)")
    p.add_argument("--cutmix_minmax", default=None, type=float, nargs="+", help="cutmix min/max ratio")
    p.add_argument("--mixup_prob", default=1.0, type=float)
    p.add_argument("--mixup_switch_prob", default=0.5, type=float)
    p.add_argument("--mixup_mode", default="batch", choices=["batch", "pair", "elem"])

    # initialisation
    p.add_argument("--finetune", default="", help="pretraining checkpoint (ours or the release's) for the encoder")
    p.add_argument("--model_key", default="model|module", type=str,
                   help="checkpoint entry holding the weights, alternatives separated by '|' (model: online "
                        "encoder; model_ema: momentum encoder)")

    # data
    p.add_argument("--data_set", default="image_folder",
                   choices=list(datasets.EVAL_DATA_SETS) + list(DATA_SET_ALIASES))
    p.add_argument("--data_path", default=None, type=str, help="folder with train/ and val/ (ImageNet layout)")
    p.add_argument("--nb_classes", default=0, type=int, help="head outputs (0: the number of classes in the data)")
    utils.add_loader_args(p)  # --demo_size --imagenet_default_mean_and_std --num_workers --[no_]pin_mem

    # run
    utils.add_run_args(p, "checkpoint to resume from or, with --eval, to evaluate")
    p.add_argument("--save_ckpt", action="store_true", default=True)
    p.add_argument("--no_save_ckpt", action="store_false", dest="save_ckpt")
    p.add_argument("--eval", action="store_true", help="evaluate the --resume checkpoint and exit")
    p.add_argument("--dist_eval", action="store_true", help="split evaluation over the processes")
    p.add_argument("--enable_deepspeed", action="store_true", help="train through a DeepSpeed engine")
    p.add_argument("--zero_stage", default=0, type=int, choices=[0, 1, 2], help="DeepSpeed ZeRO stage")
    return p


# ---------------------------------------------------------------------------------------------------------
# checks, before anything is built or written

# what each numeric flag may be (utils.check_flags)
FLAG_RANGES = (
    ("batch_size", ">= 1"), ("epochs", ">= 1"), ("update_freq", ">= 1"), ("print_freq", ">= 1"),
    ("input_size", ">= 1"), ("patch_size", ">= 1"), ("drop", "[0, 1)", "dropout rate"),
    ("attn_drop_rate", "[0, 1)", "attention dropout rate"), ("drop_path", "[0, 1)", "stochastic depth rate"),
    ("init_scale", ">= 0"), ("model_ema_decay", "[0, 1)", "EMA decay; the release's 0.9998"),
    ("opt_eps", "> 0"), ("opt_betas", "[0, 1)"), ("clip_grad", "> 0", "a gradient norm; leave it out for no clipping"),
    ("weight_decay", ">= 0"), ("weight_decay_end", ">= 0"), ("lr", "> 0"), ("layer_decay", "(0, 1]"),
    ("backbone_decay", ">= 0"), ("warmup_lr", ">= 0"), ("min_lr", ">= 0", "final lr of the cosine"),
    ("warmup_epochs", ">= 0"), ("color_jitter", ">= 0"), ("smoothing", "[0, 1)", "label smoothing"),
    ("crop_pct", "(0, 1]", "a fraction of the image side"), ("reprob", "[0, 1]", "a probability"),
    ("recount", ">= 1"), ("mixup", ">= 0", "alpha; 0 = off"), ("cutmix", ">= 0", "alpha; 0 = off"),
    ("cutmix_minmax", "[0, 1]", "two area ratios"), ("mixup_prob", "[0, 1]", "a probability"),
    ("mixup_switch_prob", "[0, 1]", "a probability"),
)


def check_augmentation(args):
    """The training transform's names as timm reads them: --train_interpolation, --remode and --aa (the
    transform is built once, without data; timm refuses an unknown policy there)."""
    from timm.data.transforms import str_to_interp_mode
    if args.train_interpolation != "random":
        try:
            str_to_interp_mode(args.train_interpolation)
        except KeyError:
            raise utils.UsageError(f"--train_interpolation {args.train_interpolation} is not an interpolation timm "
                                   f"knows; use bicubic (the release's), bilinear, nearest or random") from None
    if args.remode.lower() not in ("pixel", "rand", "const"):
        raise utils.UsageError(f"--remode {args.remode} is not a random-erasing mode; use pixel (the release's), "
                               f"rand or const")
    try:
        datasets.build_finetune_transform(args)
    except (AssertionError, KeyError, ValueError, IndexError) as e:
        raise utils.UsageError(f"--aa {args.aa} is not an auto-augment policy timm accepts "
                               f"({utils.one_line_error(e) or type(e).__name__}); use e.g. rand-m9-mstd0.5-inc1 "
                               f"(the release's), v0, original, augmix-m5 or none") from None


def check_args(args):
    utils.check_flags(args, FLAG_RANGES)
    utils.check_run_args(args)
    if args.cutmix_minmax is not None and (len(args.cutmix_minmax) != 2
                                           or args.cutmix_minmax[0] >= args.cutmix_minmax[1]):
        raise utils.UsageError(f"--cutmix_minmax {' '.join(map(str, args.cutmix_minmax))} must be two ratios, the "
                               f"smaller first (e.g. 0.2 0.8)")
    args.data_set = DATA_SET_ALIASES.get(args.data_set, args.data_set)
    if args.model not in CLASSIFIERS:
        hint = f" (the classifier of {args.model} is {args.model}_patch16_224)" if args.model in (
            f"bootmae_{s}" for s in modeling_bootmae.MODEL_SIZES) else ""
        raise utils.UsageError(f"unknown --model {args.model}{hint}; choose one of {', '.join(CLASSIFIERS)}")
    patch = args.patch_size or modeling_bootmae.MODEL_SIZES[CLASSIFIERS[args.model]]["patch_size"]
    if args.input_size % patch:
        raise utils.UsageError(f"--input_size {args.input_size} is not divisible by the patch size {patch}; use a "
                               f"multiple of {patch} (or --patch_size)")
    args.patch_size = patch
    if args.rel_pos_bias:
        raise utils.UsageError("--rel_pos_bias is not supported: BootMAE's encoder uses fixed sin-cos absolute "
                               "positions only (the release's recipes pass --disable_rel_pos_bias)")
    if args.save_ckpt_freq < 0:
        raise utils.UsageError(f"--save_ckpt_freq {args.save_ckpt_freq} is negative; give N > 0 to keep "
                               f"checkpoint-N.pth every N epochs, or 0 for checkpoint-last/-best.pth only")
    if args.nb_classes < 0:
        raise utils.UsageError(f"--nb_classes {args.nb_classes} is negative; give the number of classes or 0")
    if mixup_active(args) and args.batch_size % 2 and not args.eval:
        raise utils.UsageError(f"mixup/cutmix needs an even --batch_size (got {args.batch_size}): it mixes each "
                               f"image with the batch in reverse order")
    for flag in ("finetune", "resume"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            raise utils.UsageError(f"--{flag} {path} does not exist; give the path of a checkpoint (.pth) file")
    if args.enable_deepspeed and not args.eval and importlib.util.find_spec("deepspeed") is None:
        raise utils.UsageError("--enable_deepspeed needs DeepSpeed, which is not installed: run "
                               ".venv/bin/python -m pip install deepspeed, or drop the flag (DDP + autocast "
                               "trains the same recipe)")
    if not args.eval:
        check_augmentation(args)
    if args.crop_pct is None and args.input_size <= 32:
        # the release evaluates 32 px inputs (CIFAR) without resize and crop; Resize(32) + CenterCrop(32) of a
        # 32 px image is exactly that, and still gives 32 px for larger images
        args.crop_pct = 1.0


def mixup_active(args):
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


# ---------------------------------------------------------------------------------------------------------
# data

def check_nb_classes(args, found):
    """``found``: [(set name, its number of classes)]. Labels run from 0, so a head with fewer outputs than
    a set's classes cannot score every label; a larger head is allowed (unused outputs)."""
    most = max(n for _, n in found)
    if args.nb_classes == 0:
        args.nb_classes = most
        return
    for name, n in found:
        if n > args.nb_classes:
            raise utils.UsageError(
                f"--nb_classes {args.nb_classes} is too small for the data: the {name} set of --data_set "
                f"{args.data_set} has {n} classes (labels 0..{n - 1}); set --nb_classes {n}, or 0 to take it "
                f"from the data")
    if args.nb_classes > most:
        utils.print0(f"note: --nb_classes {args.nb_classes} is more than the {most} classes in the data; the extra "
                     f"head outputs are never a target")


def build_loaders(args, device):
    world, rank = utils.get_world_size(), utils.get_rank()
    pin = args.pin_mem and device.type == "cuda"
    found = []
    train_loader = val_loader = None
    train_set = val_set = None
    if not args.eval:
        train_set, n = datasets.build_dataset(True, args, transform=datasets.build_finetune_transform(args))
        found.append(("training", n))
    if args.eval or not args.disable_eval_during_finetuning:
        val_set, n = datasets.build_dataset(False, args)
        found.append(("validation", n))
    check_nb_classes(args, found)
    if train_set is not None:
        sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                                      seed=args.seed)
        train_loader = torch.utils.data.DataLoader(train_set, sampler=sampler, batch_size=args.batch_size,
                                                   num_workers=args.num_workers, pin_memory=pin, drop_last=True)
        if len(train_loader) // args.update_freq == 0:
            raise utils.UsageError(f"{len(train_set)} training images over {world} process(es) give no full step of "
                                   f"--batch_size {args.batch_size} x --update_freq {args.update_freq}; lower them")
    if val_set is not None:
        sampler = utils.ShardSampler(val_set) if args.dist_eval else torch.utils.data.SequentialSampler(val_set)
        val_loader = torch.utils.data.DataLoader(val_set, sampler=sampler, batch_size=args.batch_size,
                                                 num_workers=args.num_workers, pin_memory=pin, drop_last=False)
    return train_set, train_loader, val_set, val_loader


# ---------------------------------------------------------------------------------------------------------
# checkpoints


# the flags that define the lr and weight-decay schedules (with the total batch)
SCHEDULE_FLAGS = ("epochs", "warmup_epochs", "warmup_steps", "lr", "min_lr", "warmup_lr", "weight_decay",
                  "weight_decay_end")


def save_checkpoints(args, epoch, model, optimizer, loss_scaler, model_ema, best, is_best, engine=None):
    """checkpoint-<epoch>.pth every --save_ckpt_freq epochs and at the end, checkpoint-best.pth when the accuracy
    improved, then checkpoint-last.pth every epoch (last, so that a run killed before it repeats the whole
    epoch), each written atomically (checkpoints.save_on_master); ``args`` is stored as a plain dict.

    Plain runs store model, optimizer, scaler, model_ema, epoch, best accuracy and args. DeepSpeed runs
    first save the engine (ZeRO partitions, optimizer) under ``deepspeed/epoch-<epoch>/``, then the plain
    files, with the fp32 weights and ``deepspeed_tag`` naming that folder: a plain file is written only after
    its DeepSpeed state is complete, so the file that resume reads always points at a whole checkpoint."""
    if not args.output_dir or not args.save_ckpt:
        return
    names = ["checkpoint-best.pth"] if is_best else []
    if args.save_ckpt_freq > 0 and ((epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 == args.epochs):
        names.insert(0, f"checkpoint-{epoch}.pth")
    names.append("checkpoint-last.pth")
    ckpt = {"epoch": epoch, "max_accuracy": best["acc1"], "best_epoch": best["epoch"],
            "args": checkpoints.args_dict(args)}
    if engine is None:
        ckpt.update(model=model.state_dict(), optimizer=optimizer.state_dict(), scaler=loss_scaler.state_dict())
    else:
        ckpt.update(finetune_deepspeed.save_engine(engine, args.output_dir, epoch))
    if model_ema is not None:
        ckpt["model_ema"] = model_ema.module.state_dict()
    for name in names:
        checkpoints.save_on_master(ckpt, os.path.join(args.output_dir, name))
    if engine is not None:
        finetune_deepspeed.prune_tags(args.output_dir, keep_epochs={epoch, best["epoch"]})


# ---------------------------------------------------------------------------------------------------------
# main: data -> model (+ resume, EMA) -> --eval, or optimizer -> loop (train, evaluate, log, checkpoints)

def build_model(args, device):
    """(classifier on ``device``, its EMA or None, resumed checkpoint's path, the checkpoint or None): the model
    holds the resumed weights, or the --finetune encoder."""
    # the same seed on every rank: identical heads, so the EMA copies agree before any broadcast
    utils.seed_everything(args.seed)
    model = create_model(args.model, img_size=args.input_size, patch_size=args.patch_size,
                         num_classes=args.nb_classes, drop_rate=args.drop, attn_drop_rate=args.attn_drop_rate,
                         drop_path_rate=args.drop_path, global_pool="avg" if args.use_mean_pooling else "token",
                         init_scale=args.init_scale)
    model.default_cfg_name = args.model
    utils.print0(f"model: {args.model}, {modeling_bootmae.count_trainable(model):,} trainable parameters, "
                 f"{args.input_size} px input in {args.patch_size} px patches")
    resume_path, ckpt = load_classifier_resume(args)
    if args.eval and ckpt is None:
        raise utils.UsageError("--eval needs the weights to evaluate: pass --resume <fine-tuned checkpoint> (or "
                               "--output_dir of a run); --finetune loads only a pretrained encoder")
    if ckpt is not None:
        load_classifier(model, ckpt["model"], resume_path)
        utils.print0(f"resume: model weights from {resume_path}"
                     + (" (--finetune is not loaded when resuming)" if args.finetune else ""))
    elif args.finetune:
        load_pretrained_encoder(model, args.finetune, args.model_key)
    elif not args.eval:
        utils.print0("note: no --finetune checkpoint; the encoder starts from random weights")
    model.to(device)
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay,
                               device=torch.device("cpu") if args.model_ema_force_cpu else None)
        if ckpt is not None and isinstance(ckpt.get("model_ema"), dict):
            load_classifier(model_ema.module, ckpt["model_ema"], resume_path, "model_ema")
        elif ckpt is not None:
            utils.print0(f"resume: {resume_path} has no model_ema; the EMA restarts from the model")
    return model, model_ema, resume_path, ckpt


def build_schedules(args, model, steps_per_epoch, world):
    """(parameter groups with layer-wise lr scales, lr schedule, weight-decay schedule), per optimisation step."""
    total_batch = args.batch_size * args.update_freq * world
    groups = finetune_param_groups(model, args.weight_decay, args.layer_decay, args.backbone_decay)
    scales = sorted({(g["layer_id"], g["lr_scale"]) for g in groups})
    utils.print0(f"lr {args.lr:.3e} (absolute, total batch {total_batch}; the release's fine-tuning does not scale "
                 f"it by the batch), {steps_per_epoch} steps per epoch; layer decay {args.layer_decay}: lr scale "
                 + ", ".join(f"{i}:{s:.4g}" for i, s in scales))
    warmup_epochs = args.warmup_steps / steps_per_epoch if args.warmup_steps > 0 else args.warmup_epochs
    lr_schedule = utils.cosine_scheduler(args.lr, args.min_lr, args.epochs, steps_per_epoch, warmup_epochs,
                                         args.warmup_lr)
    wd_end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
    wd_schedule = utils.cosine_scheduler(args.weight_decay, wd_end, args.epochs, steps_per_epoch)
    return groups, lr_schedule, wd_schedule


def build_training(args, model, groups, device, world, ds_dtype, ckpt, resume_path):
    """(engine or None, the model to train, the unwrapped model, optimizer, loss scaler or None): a DeepSpeed
    engine (``finetune_deepspeed``), or DDP / torch.compile around the model with AdamW and a ``utils.LossScaler``;
    the optimizer and scaler states of a resumed checkpoint loaded."""
    if args.enable_deepspeed:
        engine, optimizer = finetune_deepspeed.init_engine(args, model, groups, device, world, ds_dtype, ckpt,
                                                           resume_path)
        return engine, engine, engine.module, optimizer, None
    train_model = model
    if args.distributed:
        train_model = DistributedDataParallel(model, device_ids=[args.gpu] if device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)
        utils.print0("torch.compile: training forward compiled (the first steps include compilation)")
    optimizer = adamw(groups, args.lr, tuple(args.opt_betas or (0.9, 0.999)), args.opt_eps)
    loss_scaler = utils.LossScaler(device.type, fp16=args.amp == "fp16")
    if ckpt is not None:
        load_optimizer_state(optimizer, ckpt, resume_path)
        if "scaler" in ckpt:
            loss_scaler.load_state_dict(ckpt["scaler"])
    return None, train_model, model, optimizer, loss_scaler


def resume_position(args, ckpt, resume_path):
    """(first epoch, best accuracy so far as {"acc1", "epoch"}) of this run."""
    start_epoch = args.start_epoch
    best = {"acc1": 0.0, "epoch": None}
    if ckpt is not None:
        if isinstance(ckpt.get("epoch"), int):
            start_epoch = ckpt["epoch"] + 1
            best = {"acc1": float(ckpt.get("max_accuracy", 0.0)), "epoch": ckpt.get("best_epoch")}
        else:
            utils.print0(f"resume: {resume_path} has no epoch number; its weights start epoch {start_epoch}")
        utils.print0(f"resume: continuing at epoch {start_epoch}")
        checkpoints.warn_schedule_changes(args, ckpt, resume_path, SCHEDULE_FLAGS)
    return start_epoch, best


def build_criterion(args):
    """(mixup function or None, loss): soft-target cross-entropy under mixup/cutmix (the smoothing is in
    mixup's soft targets), else label-smoothing or plain cross-entropy."""
    if mixup_active(args):
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.nb_classes)
        return mixup_fn, SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return None, torch.nn.CrossEntropyLoss()


def main(args):
    check_args(args)
    if args.compile and args.enable_deepspeed:
        raise utils.UsageError("--compile is not supported with --enable_deepspeed; drop one of them")
    if args.enable_deepspeed and not args.eval:
        finetune_deepspeed.single_process_env()
    utils.init_distributed_mode(args)
    device = torch.device(args.device)
    args.amp, amp_dtype = utils.resolve_amp(args.amp, device)
    if args.compile is None:
        args.compile = device.type == "cuda" and not args.enable_deepspeed
    world = utils.get_world_size()
    utils.print0("args: " + json.dumps(vars(args), default=str))

    train_set, train_loader, val_set, val_loader = build_loaders(args, device)
    utils.print0(f"data: {len(train_set) if train_set is not None else 0} training, "
                 f"{len(val_set) if val_set is not None else 0} validation images, {args.nb_classes} classes")
    model, model_ema, resume_path, ckpt = build_model(args, device)
    n_parameters = modeling_bootmae.count_trainable(model)
    # DeepSpeed runs evaluate in the engine's dtype; --eval reproduces that to give the same numbers
    ds_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp, torch.float32)
    eval_amp = None if args.enable_deepspeed else amp_dtype
    if args.eval:
        return evaluate_checkpoint(args, val_loader, model, model_ema, device, eval_amp, ds_dtype, ckpt, resume_path)

    groups, lr_schedule, wd_schedule = build_schedules(args, model, len(train_loader) // args.update_freq, world)
    engine, train_model, model_without_ddp, optimizer, loss_scaler = build_training(
        args, model, groups, device, world, ds_dtype, ckpt, resume_path)
    start_epoch, best = resume_position(args, ckpt, resume_path)
    mixup_fn, criterion = build_criterion(args)
    log_writer = utils.run_log_writer(args)  # None off rank 0; creates nothing before the first record
    if log_writer is not None and engine is not None:
        finetune_deepspeed.write_config(args, device, world)

    def run_epoch(epoch):
        train_stats = train_one_epoch(train_model, criterion, train_loader, optimizer, device, epoch, args,
                                      lr_schedule, wd_schedule, loss_scaler=loss_scaler, model_ema=model_ema,
                                      mixup_fn=mixup_fn, log_writer=log_writer, amp_dtype=amp_dtype,
                                      deepspeed_engine=engine is not None, input_dtype=ds_dtype)
        record = {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()}}
        is_best = False
        if val_loader is not None:
            test_record, is_best = evaluate_epoch(args, epoch, val_loader, model_without_ddp, model_ema, device,
                                                  eval_amp, best, log_writer)
            record.update(test_record)
        record.update(max_accuracy=best["acc1"], n_parameters=n_parameters)
        return record, lambda: save_checkpoints(args, epoch, model_without_ddp, optimizer, loss_scaler, model_ema,
                                                best, is_best, engine)

    checkpoints.run_epochs(args, start_epoch, train_loader.sampler, log_writer, run_epoch)
    return best


def cli():
    utils.run_cli("BootMAE fine-tuning", get_args_parser, main)


if __name__ == "__main__":
    cli()
