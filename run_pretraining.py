"""BootMAE pretraining.

    python run_pretraining.py --data_path /path/to/imagenet --output_dir out/ [flags]
    torchrun --nproc_per_node 8 run_pretraining.py ...         (one or several nodes; srun works too)

Flags and defaults follow the authors' release; see README.md.
"""
import argparse
import json
import os
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel
from timm.models import create_model
from timm.utils import ModelEmaV3

import eval_knn
import modeling_bootmae  # noqa: F401  (registers the bootmae_* models with timm)
import utils
from datasets import mean_std, build_pretraining_dataset
from engine_for_pretraining import NonFiniteLossError, patchify, train_one_epoch, unpatchify
from modeling_bootmae import from_release_state_dict, is_release_state_dict
from optim_factory import create_optimizer


def get_args_parser():
    p = argparse.ArgumentParser("BootMAE pretraining", add_help=False)
    p.add_argument("--batch_size", default=256, type=int, help="images per process and step")
    p.add_argument("--epochs", default=800, type=int)
    p.add_argument("--update_freq", default=1, type=int, help="gradient accumulation steps")
    p.add_argument("--save_ckpt_freq", default=20, type=int, help="keep checkpoint-N.pth every N epochs")
    p.add_argument("--print_freq", default=10, type=int, help="steps between log lines (the only host syncs)")

    # model
    p.add_argument("--model", default="bootmae_base", type=str,
                   help="bootmae_tiny | bootmae_small | bootmae_base | bootmae_large | bootmae_huge")
    p.add_argument("--input_size", default=224, type=int, help="image side in pixels")
    p.add_argument("--patch_size", default=None, type=int,
                   help="patch side (default: the model's, 16; 14 for huge); e.g. 4 for 32px CIFAR images")
    p.add_argument("--drop_path", default=0.1, type=float, help="stochastic depth of the encoder")
    p.add_argument("--decoder_dim", default=None, type=int, help="pixel regressor width (default 512)")
    p.add_argument("--decoder_depth", default=None, type=int, help="blocks per decoder (default 2)")

    # masking
    p.add_argument("--mask_type", default="release", choices=["release", "block", "random"],
                   help="release: block-wise up to --num_mask_patches, random top-up to --mask_num, 0-3 swaps")
    p.add_argument("--mask_num", default=147, type=int, help="masked patches per image (75 %% of 196)")
    p.add_argument("--num_mask_patches", default=120, type=int, help="block-wise budget of the release mode")
    p.add_argument("--min_mask_patches_per_block", default=16, type=int)
    p.add_argument("--max_mask_patches_per_block", default=60, type=int)

    # losses and momentum encoder
    p.add_argument("--feature_weight", default=1.0, type=float, help="weight of the feature-prediction loss")
    p.add_argument("--weight_mask", action="store_true", help="weigh block centres up to 2x in the losses")
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
    p.add_argument("--min_lr", default=1e-4, type=float, help="final lr of the cosine (absolute)")
    p.add_argument("--warmup_epochs", default=40, type=int)
    p.add_argument("--warmup_lr", default=0.0, type=float)
    p.add_argument("--weight_decay", default=0.05, type=float)
    p.add_argument("--weight_decay_end", default=None, type=float, help="cosine weight decay end (default: constant)")
    p.add_argument("--clip_grad", default=None, type=float, help="gradient norm clip (default: none)")
    p.add_argument("--no_fused_adamw", action="store_false", dest="fused_adamw",
                   help="torch's default AdamW instead of the fused kernel (same update, slower)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the online model and the momentum encoder's forward (same mathematics)")
    p.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"],
                   help="autocast precision (default: bf16 on CUDA if supported, else fp16; none on CPU)")

    # data
    p.add_argument("--data_set", default="image_folder", choices=["image_folder", "cifar10", "cifar100", "npz", "demo"],
                   help="npz: --data_path holds train.npz with arrays images [n, H, W, 3] uint8 and labels")
    p.add_argument("--data_path", default=None, type=str, help="ImageNet-style folder (its train/ is used)")
    p.add_argument("--demo_size", default=2048, type=int, help="samples per epoch of --data_set demo")
    p.add_argument("--imagenet_default_mean_and_std", action="store_true",
                   help="normalise with ImageNet's mean/std instead of the release's 0.5/0.5")
    p.add_argument("--num_workers", default=10, type=int)
    p.add_argument("--pin_mem", action="store_true", default=True)
    p.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")

    # run
    p.add_argument("--output_dir", default="", help="checkpoints, log.txt, TensorBoard events")
    p.add_argument("--log_dir", default=None, help="TensorBoard folder (default: --output_dir)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--resume", default="", help="checkpoint to resume from (ours or the release's)")
    p.add_argument("--auto_resume", action="store_true", default=True)
    p.add_argument("--no_auto_resume", action="store_false", dest="auto_resume")
    p.add_argument("--start_epoch", default=0, type=int)
    p.add_argument("--log_all_ranks", action="store_true", help="every rank prints its epoch summary")
    p.add_argument("--local_rank", "--local-rank", default=-1, type=int,
                   help="set by torch.distributed.launch; LOCAL_RANK from the environment is what is used")
    eval_knn.add_knn_args(p)  # --knn_freq, --knn_data_set, --knn_data_path, --knn_k, --knn_temperature, ...
    return p


def check_args(args):
    """Refuse inconsistent settings before anything is built or written."""
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
    if args.feature_weight > 0 and not args.model_ema:
        raise utils.UsageError("--no_model_ema leaves the feature loss without targets; drop it, or set "
                               "--feature_weight 0 for pixel targets only")
    if args.batch_size < 1 or args.update_freq < 1 or args.epochs < 1:
        raise utils.UsageError("--batch_size, --update_freq and --epochs must be at least 1")
    if args.resume and not os.path.isfile(args.resume):
        raise utils.UsageError(f"--resume {args.resume} does not exist; give the path of a checkpoint-*.pth")
    args.patch_size = patch


def resolve_amp(args, device):
    if args.amp is None:
        if device.type == "cuda":
            args.amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            args.amp = "none"
    if args.amp == "fp16" and device.type != "cuda":
        raise utils.UsageError("--amp fp16 needs a CUDA device; use --amp bf16 or none on CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[args.amp]


def _model_state(state_dict):
    return from_release_state_dict(state_dict) if is_release_state_dict(state_dict) else state_dict


def _check_shapes(model, state_dict, path, what):
    own = model.state_dict()
    bad = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state_dict]
    if bad or missing:
        detail = f"{len(bad)} tensors of another shape (e.g. {bad[0]}: {tuple(state_dict[bad[0]].shape)} vs " \
                 f"{tuple(own[bad[0]].shape)})" if bad else f"{len(missing)} missing tensors (e.g. {missing[0]})"
        raise utils.UsageError(f"{path} holds a {what} that does not fit --model {model.default_cfg_name}: "
                               f"{detail}; pass the --model (and --decoder_dim/--decoder_depth) it was trained with")


def resume(args, model, momentum_encoder, optimizer, loss_scaler):
    """Loads model, EMA, optimizer and scaler state; returns the epoch to start from. Accepts our
    checkpoints and the release's (its key names are converted)."""
    path = args.resume
    if not path and args.auto_resume:
        path = utils.find_last_checkpoint(args.output_dir)
    if not path:
        return args.start_epoch
    ckpt = utils.load_checkpoint(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise utils.UsageError(f"{path} has no 'model' entry; it is not a pretraining checkpoint")
    state = _model_state(ckpt["model"])
    _check_shapes(model, state, path, "model")
    model.load_state_dict(state)
    release = is_release_state_dict(ckpt["model"])
    if momentum_encoder is not None:
        if "model_ema" in ckpt:
            ema_state = _model_state(ckpt["model_ema"])
            _check_shapes(momentum_encoder.module, ema_state, path, "momentum encoder")
            momentum_encoder.module.load_state_dict(ema_state)
        else:
            utils.print0(f"resume: {path} has no model_ema; the momentum encoder starts from the model")
            momentum_encoder.module.load_state_dict(state)
    if "optimizer" in ckpt and "epoch" in ckpt:
        if _optimizer_state_fits(optimizer, ckpt["optimizer"]):
            optimizer.load_state_dict(ckpt["optimizer"])
        else:
            utils.print0(f"resume: optimizer state in {path} does not match this model's parameter groups "
                         f"({'release ordering' if release else 'other model'}); AdamW moments restart")
        if "scaler" in ckpt:
            loss_scaler.load_state_dict(ckpt["scaler"])
    start = int(ckpt.get("epoch", -1)) + 1
    utils.print0(f"resume: {path} ({'release' if release else 'our'} format), continuing at epoch {start}")
    return start


def _optimizer_state_fits(optimizer, state):
    groups = state.get("param_groups", [])
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        return False
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in groups for i in g["params"]]
    for pid, p in zip(ids, params):
        s = state.get("state", {}).get(pid, {})
        if "exp_avg" in s and s["exp_avg"].shape != p.shape:
            return False
    return True


def save_checkpoint(args, epoch, model, momentum_encoder, optimizer, loss_scaler):
    """The release's layout (model, model_ema, optimizer, scaler, epoch, args), written atomically:
    checkpoint-last.pth every epoch and checkpoint-<epoch>.pth every --save_ckpt_freq epochs and at the end."""
    if not args.output_dir:
        return
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": loss_scaler.state_dict(),
            "epoch": epoch, "args": args}
    if momentum_encoder is not None:
        ckpt["model_ema"] = momentum_encoder.module.state_dict()
    utils.save_on_master(ckpt, os.path.join(args.output_dir, "checkpoint-last.pth"))
    if (epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 == args.epochs:
        utils.save_on_master(ckpt, os.path.join(args.output_dir, f"checkpoint-{epoch}.pth"))


@torch.no_grad()
def save_reconstruction(args, model, dataset, device, path, num_images=4):
    """A PNG with one row per image: input, masked input, reconstruction, reconstruction pasted into the
    visible patches. The prediction is of per-patch normalised pixels, so it is shown with each patch's
    true mean and std (as MAE's visualisation does)."""
    from torchvision.utils import save_image
    model.eval()
    items = [dataset[i] for i in range(min(num_images, len(dataset)))]
    images = torch.stack([x for x, _ in items]).to(device)
    mask = torch.stack([torch.as_tensor(m).flatten() for _, m in items]).to(device)
    pixel_pred, _ = model(images, mask)
    P = model.patch_size
    grid = model.grid_size(images)
    patches = patchify(images, P).reshape(*mask.shape, P * P, 3)
    mean, std = patches.mean(2, keepdim=True), (patches.var(2, unbiased=False, keepdim=True) + 1e-5).sqrt()
    recon = (pixel_pred.float().reshape_as(patches) * std + mean).flatten(2)
    m = mask[..., None].float()
    masked = unpatchify(patchify(images, P) * (1 - m), P, grid)
    pasted = unpatchify(patchify(images, P) * (1 - m) + recon * m, P, grid)
    rows = torch.stack([images, masked, unpatchify(recon, P, grid), pasted], 1).flatten(0, 1)
    mean, std = mean_std(args)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    save_image((rows * std_t + mean_t).clamp(0, 1), path + ".tmp.png", nrow=4, padding=2)
    os.replace(path + ".tmp.png", path)
    model.train()


def main(args):
    check_args(args)
    utils.init_distributed_mode(args)
    device = torch.device(args.device)
    amp_dtype = resolve_amp(args, device)
    utils.seed_everything(args.seed + utils.get_rank())
    utils.print0("args: " + json.dumps({k: v for k, v in vars(args).items()}, default=str))

    # data
    dataset = build_pretraining_dataset(args)
    world, rank = utils.get_world_size(), utils.get_rank()
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=args.seed)
    loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=args.batch_size,
                                         num_workers=args.num_workers, pin_memory=args.pin_mem and device.type == "cuda",
                                         drop_last=True, persistent_workers=False)
    if len(loader) // args.update_freq == 0:
        raise utils.UsageError(f"{len(dataset)} images over {world} processes give no full step of --batch_size "
                               f"{args.batch_size} x --update_freq {args.update_freq}; lower them or add data")
    utils.print0(f"data: {len(dataset)} images, {len(loader)} batches of {args.batch_size} per process, "
                 f"transform {dataset.transform!r}" if hasattr(dataset, "transform") else f"data: {len(dataset)} images")

    # model
    model = create_model(args.model, img_size=args.input_size, patch_size=args.patch_size, drop_path_rate=args.drop_path,
                         decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth)
    model.default_cfg_name = args.model
    model.to(device)
    utils.print0(f"model: {args.model}, {modeling_bootmae.count_trainable(model):,} trainable parameters")
    knn_monitor = eval_knn.KnnMonitor.from_args(args, device, amp_dtype)  # None unless --knn_freq

    model_ddp = model
    if args.distributed:
        model_ddp = DistributedDataParallel(model, device_ids=[args.gpu] if device.type == "cuda" else None,
                                            find_unused_parameters=False)
    # after the DDP wrap, which broadcasts rank 0's initial weights: every rank's momentum encoder must
    # start from those, not from its own (differently seeded) initialisation
    momentum_encoder = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    target_fn = None
    if args.compile:
        # the EMA update reads the uncompiled module's tensors, which the compiled graphs share
        model_ddp = torch.compile(model_ddp)
        if momentum_encoder is not None:
            target_fn = torch.compile(momentum_encoder.module.target_features)

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

    start_epoch = resume(args, model, momentum_encoder, optimizer, loss_scaler)
    args.lr = base_lr  # checkpoints store the base lr, as given on the command line

    log_writer = None
    if utils.is_main_process() and args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter
        log_writer = SummaryWriter(log_dir=args.log_dir or args.output_dir)

    utils.print0(f"training epochs {start_epoch}..{args.epochs - 1}")
    start_time = time.time()
    for epoch in range(start_epoch, args.epochs):
        utils.seed_everything(args.seed + 1000003 * epoch + rank)
        sampler.set_epoch(epoch)
        stats = train_one_epoch(model_ddp, momentum_encoder, loader, optimizer, loss_scaler, device, epoch,
                                lr_schedule, wd_schedule, args, log_writer, amp_dtype, target_fn)
        save_checkpoint(args, epoch, model, momentum_encoder, optimizer, loss_scaler)
        record = {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items()}}
        if knn_monitor is not None:
            record.update(knn_monitor(epoch, model, momentum_encoder, log_writer))
        utils.append_log(args.output_dir, record)
        summary = (f"epoch {epoch} done: loss {stats['loss']:.4f} (pixel {stats['pixel_loss']:.4f}, feature "
                   f"{stats['feature_loss']:.4f}) averaged over {world} process(es)")
        if args.log_all_ranks:
            print(f"[rank {rank}] {summary}", flush=True)
        else:
            utils.print0(summary)
        if log_writer is not None:
            log_writer.flush()
    if utils.is_main_process() and args.output_dir and start_epoch < args.epochs:
        save_reconstruction(args, model, dataset, device, os.path.join(args.output_dir, "reconstruction.png"))
    if log_writer is not None:
        log_writer.close()
    utils.print0(f"training time {utils.format_seconds(time.time() - start_time)}")


def cli():
    parser = argparse.ArgumentParser("BootMAE pretraining", parents=[get_args_parser()])
    args = parser.parse_args()
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    try:
        main(args)
    except (utils.UsageError, NonFiniteLossError) as e:
        print(f"error: {utils.one_line_error(e)}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if utils.is_dist():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    cli()
