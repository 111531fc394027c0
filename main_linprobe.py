"""Linear probing of a pretrained BootMAE encoder (the release's main_linprobe.py, i.e. MAE's recipe).

    python main_linprobe.py --finetune pretrain/checkpoint-799.pth --data_path /data/imagenet --output_dir out/
    torchrun --nproc_per_node 8 main_linprobe.py --batch_size 1024 --accum_iter 2 --model base_patch16_224 \
        --depth 10 --global_pool --epochs 90 --blr 0.1 --weight_decay 0.0 --dist_eval ...   (the paper's run)

The encoder is truncated to its first ``--depth`` blocks and frozen (eval mode, no gradients). Features:
``--global_pool``: a LayerNorm (``fc_norm``, eps 1e-6) of the mean of the patch tokens after block depth-1;
``--cls_token`` (the parser's default, as in the release): the cls token after the encoder's final norm.
``fc_norm`` is new and, as in the release (which trains only ``head``), keeps its initial unit scale and
zero shift. The trained head is BatchNorm1d(affine=False, eps 1e-6) + Linear (trunc-normal std 0.01,
zero bias), optimised by LARS (momentum 0.9, weight decay 0) with lr = blr x total batch / 256, 10 linear
warm-up epochs then a half cosine to ``--min_lr``, set every optimisation step as MAE does.

LARS in MAE's semantics, the head and the epoch: ``engine_for_linprobe``.

Checkpoints hold what trains (``model``: the head's Linear and BN statistics, with the release's key names
``head.0.*``/``head.1.*``), the optimizer, epoch, args and the best accuracy; the encoder comes from
``--finetune`` (recorded in ``args``, so ``--eval --resume`` finds it).
"""
import argparse
import json
import os

import torch
from torch.nn.parallel import DistributedDataParallel

import checkpoints
import modeling_bootmae
import utils
from datasets import build_dataset, build_eval_transform
from engine_for_linprobe import (build_optimizer, build_probe, build_train_transform, evaluate_probe, head_state,
                                 load_head, load_probe_encoder, sync_head_buffers, train_one_epoch)
from pretrained import parse_model_size


def get_args_parser():
    p = argparse.ArgumentParser("BootMAE linear probing", add_help=False)
    p.add_argument("--batch_size", default=512, type=int,
                   help="images per process and step; total batch = batch_size x accum_iter x processes")
    p.add_argument("--epochs", default=90, type=int)
    p.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps")
    p.add_argument("--print_freq", default=20, type=int, help="steps between log lines (the only host syncs)")

    # model
    p.add_argument("--model", default="bootmae_base_patch16_224",
                   help="bootmae_{tiny,small,base,large}_patch16_224, bootmae_huge_patch14_224; the release's "
                        "base_patch16_224 / large_patch16_224 and bootmae_base etc. are accepted")
    p.add_argument("--depth", default=None, type=int,
                   help="encoder blocks kept (default: all); the paper probes block 10 of 12 (ViT-B), 18 of 24 (ViT-L)")
    p.add_argument("--global_pool", action="store_true", default=None,
                   help="mean of the patch tokens + LayerNorm (the paper's setting)")
    p.add_argument("--cls_token", action="store_false", dest="global_pool",
                   help="the cls token after the final norm (the default, as in the release's parser)")
    p.add_argument("--input_size", default=224, type=int)
    p.add_argument("--patch_size", default=None, type=int, help="patch side (default: the model's); 4 for 32px CIFAR")

    # optimisation
    p.add_argument("--weight_decay", default=0.0, type=float, help="LARS weight decay (0 for linear probing)")
    p.add_argument("--lr", default=None, type=float, help="absolute lr (overrides --blr)")
    p.add_argument("--blr", default=0.1, type=float, help="base lr: lr = blr x total batch / 256")
    p.add_argument("--min_lr", default=0.0, type=float, help="final lr of the cosine")
    p.add_argument("--warmup_epochs", default=10, type=int)
    p.add_argument("--momentum", default=0.9, type=float, help="LARS momentum")
    p.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"],
                   help="autocast for the frozen encoder (default: bf16 on CUDA, none on CPU); the head is float32")

    # checkpoints
    p.add_argument("--finetune", default="",
                   help="pretrained checkpoint whose encoder is probed (ours or the release's)")
    p.add_argument("--model_key", default="model|module",
                   help="checkpoint entries to try, '|'-separated ('model' = the online encoder, as the release "
                        "probes; 'model_ema' = the momentum encoder)")
    utils.add_run_args(p, "linear-probe checkpoint to continue from (or to evaluate with --eval)")
    p.add_argument("--eval", action="store_true", help="only evaluate the head of --resume")
    p.add_argument("--dist_eval", action="store_true",
                   help="split evaluation over the processes (exact: no item is duplicated)")

    # data
    p.add_argument("--data_set", default="image_folder", choices=["image_folder", "cifar10", "cifar100", "npz", "demo"])
    p.add_argument("--data_path", default=None, help="folder with train/ and val/ (image_folder), CIFAR or npz files")
    p.add_argument("--nb_classes", default=None, type=int, help="classes of the head (default: the data set's)")
    utils.add_loader_args(p, "items per split of --data_set demo")
    p.add_argument("--crop_pct", default=None, type=float, help="evaluation centre-crop fraction (default 224/256)")
    return p


# ---------------------------------------------------------------------------------------------------------
# arguments

# fields of a probe checkpoint's args that an --eval run must share with it
_PROBE_FIELDS = ("depth", "global_pool", "finetune", "model_key", "patch_size")


# what each numeric flag may be (utils.check_flags)
FLAG_RANGES = (
    ("batch_size", ">= 1"), ("epochs", ">= 1"), ("accum_iter", ">= 1"), ("print_freq", ">= 1"),
    ("input_size", ">= 1"), ("patch_size", ">= 1"), ("weight_decay", ">= 0"), ("lr", "> 0"),
    ("blr", "> 0", "base lr: lr = blr x total batch / 256"), ("min_lr", ">= 0", "final lr of the cosine"),
    ("warmup_epochs", ">= 0"), ("momentum", "[0, 1)", "LARS momentum; MAE's 0.9"), ("nb_classes", ">= 1"),
    ("crop_pct", "(0, 1]", "a fraction of the image side"),
)


def check_args(args):
    """Refuse bad settings before anything is built or written; fills args.size and args.depth."""
    utils.check_flags(args, FLAG_RANGES)
    utils.check_run_args(args)
    args.size = parse_model_size(args.model)
    cfg = modeling_bootmae.MODEL_SIZES[args.size]
    patch = args.patch_size or cfg["patch_size"]
    if args.input_size % patch:
        raise utils.UsageError(f"--input_size {args.input_size} is not divisible by the patch size {patch}; "
                               f"use a multiple of {patch}")
    if args.depth is not None and not 1 <= args.depth <= cfg["depth"]:
        raise utils.UsageError(f"--depth {args.depth} is outside the {cfg['depth']} blocks of {args.model}; "
                               f"choose 1..{cfg['depth']} (the paper: 10 for ViT-B, 18 for ViT-L)")
    if args.resume and not os.path.isfile(args.resume):
        raise utils.UsageError(f"--resume {args.resume} does not exist; give the path of a linear-probe checkpoint")
    if args.eval and not args.resume:
        raise utils.UsageError("--eval needs --resume: the linear-probe checkpoint whose head to evaluate")
    if not args.eval and not args.finetune:
        raise utils.UsageError("--finetune is required: the pretrained checkpoint whose encoder is probed")
    if args.finetune and not os.path.isfile(args.finetune):
        raise utils.UsageError(f"--finetune {args.finetune} does not exist; give the path of a pretraining checkpoint")


def inherit_from_checkpoint(args, ckpt_args, path):
    """For --eval: the probe settings left unset are taken from the checkpoint's args
    (``checkpoints.checkpoint_args``)."""
    saved = vars(ckpt_args)
    for field in _PROBE_FIELDS:
        mine = getattr(args, field)
        if field in saved and (mine in (None, "") or (field == "model_key" and mine == "model|module")):
            setattr(args, field, saved[field])


def check_matches_checkpoint(args, ckpt_args, path):
    """A head only fits the features it was trained on: refuse another model size, depth, pooling or patch."""
    saved = vars(ckpt_args)
    if "size" in saved and saved["size"] != args.size:
        raise utils.UsageError(f"{path} was trained on bootmae_{saved['size']}, not {args.model}; pass its --model")
    for field in ("depth", "global_pool", "patch_size"):
        if field in saved and saved[field] != getattr(args, field):
            raise utils.UsageError(f"--{field} {getattr(args, field)} differs from the {saved[field]} that {path} was "
                                   f"trained with; use the same value (or another --output_dir for a new probe)")


def save(args, name, model, optimizer, epoch, max_accuracy, test_stats):
    """The head, its optimizer, epoch, best accuracy, test results and ``args`` (a plain dict), written
    atomically (checkpoints.save_on_master)."""
    if args.output_dir:
        checkpoints.save_on_master({"model": head_state(model), "optimizer": optimizer.state_dict(), "epoch": epoch,
                                    "args": checkpoints.args_dict(args), "max_accuracy": max_accuracy,
                                    "test_stats": test_stats}, os.path.join(args.output_dir, name))


# the flags that define the lr schedule (with the total batch; --lr is the absolute lr, from --blr if unset)
SCHEDULE_FLAGS = ("epochs", "warmup_epochs", "lr", "min_lr", "weight_decay")


# ---------------------------------------------------------------------------------------------------------

def resolve_args(args):
    """``check_args``, then the checkpoint to resume (--resume, or the newest of --output_dir unless --eval):
    --eval takes the probe settings left unset from it, and a head only continues on the features it was trained
    on. Fills args.depth and args.global_pool; returns (the checkpoint's path, the checkpoint or None)."""
    check_args(args)
    resume_path, ckpt = checkpoints.load_resume_checkpoint(args.resume, args.output_dir,
                                                           args.auto_resume and not args.eval)
    ckpt_args = checkpoints.checkpoint_args(ckpt)
    if ckpt is not None and args.eval:
        inherit_from_checkpoint(args, ckpt_args, resume_path)
        if not args.finetune or not os.path.isfile(args.finetune):
            raise utils.UsageError(f"the encoder checkpoint {args.finetune or '(none recorded)'} of {resume_path} "
                                   f"is not available; pass it with --finetune")
    args.depth = args.depth or modeling_bootmae.MODEL_SIZES[args.size]["depth"]
    args.global_pool = bool(args.global_pool)
    if ckpt is not None:
        check_matches_checkpoint(args, ckpt_args, resume_path)
    return resume_path, ckpt


def build_loaders(args, device, world):
    """(training loader over a DistributedSampler, validation loader: sharded with --dist_eval, else the whole
    set on every rank); fills args.nb_classes. Bad paths stop here, before the model is built or anything written."""
    train_set, nb_train = build_dataset(True, args, transform=build_train_transform(args))
    val_set, nb_val = build_dataset(False, args, transform=build_eval_transform(args))
    nb_data = max(nb_train, nb_val)
    if args.nb_classes is None:
        args.nb_classes = nb_data
    elif args.nb_classes < nb_data:
        raise utils.UsageError(f"--nb_classes {args.nb_classes} is below the {nb_data} classes of the data; "
                               f"drop it to use the data's count")
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=utils.get_rank(), shuffle=True,
                                                  seed=args.seed)
    pin = args.pin_mem and device.type == "cuda"
    train_loader = torch.utils.data.DataLoader(train_set, sampler=sampler, batch_size=args.batch_size,
                                               num_workers=args.num_workers, pin_memory=pin, drop_last=True)
    val_sampler = utils.ShardSampler(val_set) if args.dist_eval else torch.utils.data.SequentialSampler(val_set)
    val_loader = torch.utils.data.DataLoader(val_set, sampler=val_sampler, batch_size=args.batch_size,
                                             num_workers=args.num_workers, pin_memory=pin, drop_last=False)
    if not args.eval and len(train_loader) == 0:
        raise utils.UsageError(f"{len(train_set)} training images over {world} process(es) give no full batch of "
                               f"--batch_size {args.batch_size}; lower it or add data")
    return train_loader, val_loader


def build_model(args, device):
    """(the probe on ``device`` with the --finetune encoder, its trainable parameter count). Every rank draws the
    same head (DDP would broadcast rank 0's anyway)."""
    torch.manual_seed(args.seed)
    model = build_probe(args, args.nb_classes)
    load_probe_encoder(model, args.finetune, args.model_key)
    model.to(device)
    n_parameters = modeling_bootmae.count_trainable(model)
    utils.print0(f"probe: bootmae_{args.size}, {args.depth} blocks, "
                 f"{'mean of patch tokens + LayerNorm' if args.global_pool else 'cls token'}, "
                 f"head BN + Linear({model.embed_dim}, {args.nb_classes}): {n_parameters:,} trainable parameters")
    return model, n_parameters


def resume_head(args, model, optimizer, ckpt, resume_path):
    """(first epoch, best top-1 so far): the head of ``ckpt``, and unless --eval its optimizer state and
    position (with a warning where the schedule flags changed)."""
    start_epoch, max_accuracy = args.start_epoch, 0.0
    if ckpt is not None:
        load_head(model, ckpt, resume_path)
        if not args.eval and "optimizer" in ckpt and "epoch" in ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
            start_epoch = int(ckpt["epoch"]) + 1
            max_accuracy = float(ckpt.get("max_accuracy", 0.0))
        utils.print0(f"resume: {resume_path} (epoch {ckpt.get('epoch')})" + ("" if args.eval else f", continuing at "
                                                                              f"epoch {start_epoch}"))
        if not args.eval:
            checkpoints.warn_schedule_changes(args, ckpt, resume_path, SCHEDULE_FLAGS, accumulation="accum_iter")
    return start_epoch, max_accuracy


def train(args, model, optimizer, loaders, start_epoch, max_accuracy, n_parameters, device, amp_dtype):
    """Epochs ``start_epoch``.. of the head (``checkpoints.run_epochs``): train, evaluate, log.txt record,
    checkpoint-best.pth when top-1 improves and checkpoint-last.pth. Returns the last epoch's test statistics
    (None when no epoch is left)."""
    train_loader, val_loader = loaders
    head = model.head
    if args.distributed:
        head = DistributedDataParallel(model.head, device_ids=[args.gpu] if device.type == "cuda" else None)

    log_writer = utils.run_log_writer(args)  # None off rank 0; creates nothing before the first record
    stats = None

    def run_epoch(epoch):
        nonlocal max_accuracy, stats
        train_stats = train_one_epoch(model, head, train_loader, optimizer, device, epoch, args, amp_dtype, log_writer)
        sync_head_buffers(model)
        stats = evaluate_probe(model, val_loader, amp_dtype, args.dist_eval)
        improved = stats["acc1"] > max_accuracy or epoch == 0
        max_accuracy = max(max_accuracy, stats["acc1"])
        utils.print0(f"epoch {epoch}: train loss {train_stats['loss']:.4f}, test on {stats['n']} images: top-1 "
                     f"{stats['acc1']:.2f} %, top-5 {stats['acc5']:.2f} %, loss {stats['loss']:.4f} "
                     f"(best top-1 {max_accuracy:.2f} %)")
        record = {**{f"train_{k}": v for k, v in train_stats.items()}, **{f"test_{k}": v for k, v in stats.items()},
                  "epoch": epoch, "max_accuracy": max_accuracy, "n_parameters": n_parameters}

        def save_checkpoints():
            for name in (["checkpoint-best.pth"] if improved else []) + ["checkpoint-last.pth"]:
                save(args, name, model, optimizer, epoch, max_accuracy, stats)
            if log_writer is not None:
                for key in ("acc1", "acc5", "loss"):
                    log_writer.add_scalar(f"perf/test_{key}", stats[key], epoch)
        return record, save_checkpoints

    checkpoints.run_epochs(args, start_epoch, train_loader.sampler, log_writer, run_epoch,
                           summary=lambda: f", best top-1 {max_accuracy:.2f} %")
    return stats


def main(args):
    resume_path, ckpt = resolve_args(args)
    utils.init_distributed_mode(args)
    device = torch.device(args.device)
    args.amp, amp_dtype = utils.resolve_amp(args.amp, device)
    world = utils.get_world_size()
    train_loader, val_loader = build_loaders(args, device, world)
    model, n_parameters = build_model(args, device)

    total_batch = args.batch_size * args.accum_iter * world
    if args.lr is None:
        args.lr = args.blr * total_batch / 256
    if not args.eval:
        utils.print0(f"lr {args.lr:.3e} (base {args.lr * 256 / total_batch:.3e} x total batch {total_batch} / 256), "
                     f"accum_iter {args.accum_iter}, {len(train_loader)} batches per process and epoch")
    optimizer = build_optimizer(model.head, args)
    start_epoch, max_accuracy = resume_head(args, model, optimizer, ckpt, resume_path)

    if args.eval:
        stats = evaluate_probe(model, val_loader, amp_dtype, args.dist_eval)
        utils.print0(f"Accuracy of the network on the {stats['n']} test images: top-1 {stats['acc1']:.2f} %, "
                     f"top-5 {stats['acc5']:.2f} %")
        utils.print0("eval: " + json.dumps(stats))
        return stats
    return train(args, model, optimizer, (train_loader, val_loader), start_epoch, max_accuracy, n_parameters, device,
                 amp_dtype)


def cli():
    utils.run_cli("BootMAE linear probing", get_args_parser, main)


if __name__ == "__main__":
    cli()
