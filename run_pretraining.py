"""BootMAE pretraining.

    python run_pretraining.py --data_path /path/to/imagenet --output_dir out/ [flags]
    torchrun --nproc_per_node 8 run_pretraining.py ...         (one or several nodes; srun works too)

The release's command lines mean the same run here: flags they leave unset default to its parser's values;
README.md ("The flags that matter") lists which defaults follow the paper instead and every difference.
Flags and their checks: ``pretraining_args``; ``--mae`` is the MAE paper's pretraining (``ablation_flags.MAE_PRESET``).
"""
import json
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel

import checkpoints
import knn
import modeling_bootmae
import utils
from datasets import build_pretraining_dataset, build_pretraining_loader
from engine_for_pretraining import target_patch_count, train_one_epoch
from optim_factory import create_optimizer
from pretraining_args import check_args, get_args_parser
from pretraining_state import (build_model, keeps_numbered_checkpoint, load_fixed_target, resume, save_checkpoint,
                               write_metrics)
from target_encoders import build_target_encoder
from visualize import save_reconstruction


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
    lr = args.lr * total_batch / 256  # args (and so checkpoints) keep the base lr given on the command line
    steps_per_epoch = num_batches // args.update_freq
    utils.print0(f"lr {lr:.3e} (base {args.lr:.3e} x total batch {total_batch} / 256), "
                 f"{steps_per_epoch} steps per epoch")
    if args.min_lr > lr:
        utils.print0(f"warning: --min_lr {args.min_lr:.3e} is above the scaled lr {lr:.3e}, so the cosine "
                     f"rises to it (min_lr is absolute, as in the release); lower --min_lr for small batches")
    optimizer = create_optimizer(args, model, lr=lr)
    loss_scaler = utils.LossScaler(device.type, fp16=args.amp == "fp16")
    lr_schedule = utils.cosine_scheduler(lr, args.min_lr, args.epochs, steps_per_epoch, args.warmup_epochs,
                                         args.warmup_lr)
    wd_end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
    wd_schedule = utils.cosine_scheduler(args.weight_decay, wd_end, args.epochs, steps_per_epoch)
    return optimizer, loss_scaler, lr_schedule, wd_schedule


def main(args):
    check_args(args)
    utils.init_distributed_mode(args)
    device = torch.device(args.device)
    amp_dtype = resolve_device_defaults(args, device)
    utils.seed_everything(args.seed + utils.get_rank())
    utils.print0("args: " + json.dumps({k: v for k, v in vars(args).items()}, default=str))

    dataset, sampler, loader = build_data(args, device)
    world = utils.get_world_size()

    # model
    model = build_model(args)
    model.to(device)
    utils.print0(f"model: {args.model}, {modeling_bootmae.count_trainable(model):,} trainable parameters")
    knn_monitor = knn.KnnMonitor.from_args(args, device, amp_dtype)  # None unless --knn_freq

    model_ddp, targets = wrap_model(args, model, device)
    momentum_encoder = targets.ema if targets is not None and targets.kind == "ema" else None

    optimizer, loss_scaler, lr_schedule, wd_schedule = build_optimisation(args, model, len(loader), world, device)
    start_epoch = resume(args, model, targets, optimizer, loss_scaler)

    log_writer = utils.run_log_writer(args)  # None off rank 0; creates nothing before the first record

    start_time = time.time()
    step_times = []

    def run_epoch(epoch):
        stats = train_one_epoch(model_ddp, targets, loader, optimizer, loss_scaler, device, epoch,
                                lr_schedule, wd_schedule, args, log_writer, amp_dtype)
        # log.txt's records are reproduced exactly by a resumed run, except the WALL_CLOCK_STATS (images/s, data wait)
        step_times.append(stats.pop("s_per_step"))
        if log_writer is not None:
            log_writer.add_scalar("perf/s_per_step", step_times[-1], epoch)
        record = {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items()}}
        if knn_monitor is not None:
            record.update(knn_monitor(epoch, model, momentum_encoder, log_writer))
        return record, lambda: finish_epoch(args, epoch, stats, model, targets, optimizer, loss_scaler, dataset, device,
                                          log_writer)

    # each epoch: train, its log.txt record, then its checkpoints (checkpoints.run_epochs)
    record = checkpoints.run_epochs(args, start_epoch, sampler, log_writer, run_epoch)
    if args.metrics_json and utils.is_main_process() and record is not None:
        write_metrics(args.metrics_json, record, step_times, time.time() - start_time, model)


def finish_epoch(args, epoch, stats, model, targets, optimizer, loss_scaler, dataset, device, log_writer):
    """The epoch's checkpoints, its summary line and, at numbered checkpoints and the end, the reconstruction grid."""
    save_checkpoint(args, epoch, model, targets, optimizer, loss_scaler)
    world, rank = utils.get_world_size(), utils.get_rank()
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


def cli():
    utils.run_cli("BootMAE pretraining", get_args_parser, main)


if __name__ == "__main__":
    cli()
