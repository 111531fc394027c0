"""The linear probe's parts (MAE's recipe, as the release's main_linprobe.py runs it): the training crop, the
probe head on the truncated frozen encoder, LARS, the per-step schedule, one epoch of the head and its evaluation.

LARS is timm's ``Lars`` with two parameter groups, which reproduces MAE's LARS exactly at weight decay 0
(the recipe): tensors of 2+ dimensions get the trust ratio 0.001 ||w|| / ||g|| (``always_adapt=True``,
``eps=0``), 1-D tensors (the head's bias) neither the trust ratio nor weight decay, and the momentum buffer
starts at the first gradient (MAE: zeros, then mu = 0.9 mu + g: the same). With weight decay > 0 timm's
denominator is ||g|| + wd ||w|| where MAE's is ||g + wd w||.
"""
import contextlib
import math
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import create_model
from timm.optim import Lars
from torch.nn.parallel import DistributedDataParallel
from torchvision import transforms
from torchvision.transforms import InterpolationMode

import checkpoints
import engine_for_finetuning
import modeling_bootmae  # noqa: F401  (registers the bootmae_* models with timm)
import utils
from datasets import mean_std


# ---------------------------------------------------------------------------------------------------------
# data

class RandomResizedCropNoRetry(transforms.RandomResizedCrop):
    """MAE's linear-probe crop (TF/BYOL style): one draw of area fraction and log-aspect ratio, the box
    clamped to the image, instead of torchvision's ten tries and centre-crop fallback."""

    @staticmethod
    def get_params(img, scale, ratio):
        width, height = transforms.functional.get_image_size(img)
        area = height * width
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        log_ratio = torch.log(torch.tensor(ratio))
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item()).item())
        w = min(int(round(math.sqrt(target_area * aspect))), width)
        h = min(int(round(math.sqrt(target_area / aspect))), height)
        i = torch.randint(0, height - h + 1, size=(1,)).item()
        j = torch.randint(0, width - w + 1, size=(1,)).item()
        return i, j, h, w


def build_train_transform(args):
    mean, std = mean_std(args)
    return transforms.Compose([
        RandomResizedCropNoRetry(args.input_size, interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


# ---------------------------------------------------------------------------------------------------------
# model and optimiser

def probe_head(dim, nb_classes):
    """MAE's probe head: BatchNorm without affine (eps 1e-6), then a Linear with trunc-normal(0.01) weights."""
    linear = nn.Linear(dim, nb_classes)
    trunc_normal_(linear.weight, std=0.01)  # MoCo v3 / MAE
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


def build_probe(args, nb_classes):
    """The truncated classifier with the probe head: model.head = Sequential(BN without affine, Linear)."""
    model = create_model(f"bootmae_{args.size}_patch{14 if args.size == 'huge' else 16}_224",
                         num_classes=nb_classes, global_pool="avg" if args.global_pool else "token",
                         depth=args.depth, img_size=args.input_size,
                         **({"patch_size": args.patch_size} if args.patch_size else {}))
    model.head = probe_head(model.embed_dim, nb_classes)
    for p in model.parameters():
        p.requires_grad = False
    for p in model.head.parameters():
        p.requires_grad = True
    return model


def load_probe_encoder(model, path, model_key):
    """Encoder tensors from the pretrained checkpoint; blocks beyond --depth are left out. Refuses a
    checkpoint that does not fill every encoder tensor the probe uses (only fc_norm and head are new)."""
    checkpoints.load_pretrained_encoder(model, path, model_key, new=("fc_norm.", "head."))


def build_optimizer(head, args):
    """timm's Lars in MAE's LARS semantics (see the module docstring)."""
    matrices = [p for p in head.parameters() if p.ndim > 1]
    vectors = [p for p in head.parameters() if p.ndim <= 1]
    groups = [dict(params=matrices, weight_decay=args.weight_decay, always_adapt=True),
              dict(params=vectors, weight_decay=0.0, always_adapt=False)]
    return Lars(groups, lr=args.lr, momentum=args.momentum, trust_coeff=0.001, eps=0.0, trust_clip=False)


def adjust_learning_rate(optimizer, epoch, args):
    """MAE's per-step schedule at fractional ``epoch``: linear warm-up, then a half cosine to min_lr."""
    if epoch < args.warmup_epochs:
        lr = args.lr * epoch / args.warmup_epochs
    else:
        progress = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-12)
        lr = args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def features(model, images, amp_dtype):
    """Frozen encoder -> pooled features [B, D] in float32 (no graph is built)."""
    autocast = (torch.autocast(images.device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    with torch.no_grad(), autocast:
        return model.pool(model.forward_features(images)).float()


# ---------------------------------------------------------------------------------------------------------
# train and evaluate

def train_one_epoch(model, head, loader, optimizer, device, epoch, args, amp_dtype, log_writer=None):
    """One epoch of the head. ``head`` is ``model.head``, DDP-wrapped when distributed."""
    model.eval()
    model.head.train()
    optimizer.zero_grad(set_to_none=True)
    logger = utils.StepLogger(device, ["loss"], log_writer)
    n = len(loader)
    lr = optimizer.param_groups[0]["lr"]
    start = time.time()
    for step, (images, targets) in enumerate(loader):
        if step % args.accum_iter == 0:
            lr = adjust_learning_rate(optimizer, epoch + step / n, args)
        images = images.to(device, non_blocking=True)
        targets = torch.as_tensor(targets).to(device, non_blocking=True)
        logits = head(features(model, images, amp_dtype))
        loss = F.cross_entropy(logits, targets)
        update = (step + 1) % args.accum_iter == 0
        sync = contextlib.nullcontext() if update or not isinstance(head, DistributedDataParallel) else head.no_sync()
        with sync:  # accumulate locally, all-reduce only on the update step
            (loss / args.accum_iter).backward()
        if update:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        logger.add(loss=loss.detach())
        if (step + 1) % args.print_freq == 0 or step + 1 == n:
            means = logger.flush(epoch * n + step)
            if not math.isfinite(means["loss"]):
                raise utils.NonFiniteLossError(f"non-finite loss {means['loss']} in epoch {epoch} before step "
                                               f"{step + 1}; lower --blr/--lr")
            utils.print0(f"Epoch: [{epoch}] [{step + 1:>{len(str(n))}}/{n}]  lr {lr:.3e}  loss {means['loss']:.4f}  "
                         f"{(time.time() - start) / (step + 1):.2f} s/step")
            if log_writer is not None:
                log_writer.add_scalar("train/lr", lr, epoch * n + step)
    stats = logger.epoch_means()
    return {"loss": stats["loss"], "lr": lr}


def sync_head_buffers(model):
    """BN statistics differ per rank after DDP training (each rank updates rank 0's broadcast copy with its
    own batch); evaluate everywhere with rank 0's, the ones the checkpoint stores."""
    if utils.is_dist():
        for buf in model.head.buffers():
            dist.broadcast(buf, 0)


def evaluate_probe(model, loader, amp_dtype, sharded):
    """Top-1/top-5 (%), mean loss and image count ``n`` of the probe: ``engine_for_finetuning.evaluate`` with
    the head outside the encoder's autocast. ``sharded``: the loader holds this rank's ``utils.ShardSampler``
    shard and the counts are summed over ranks (exact); otherwise every rank evaluates the whole set."""
    stats = engine_for_finetuning.evaluate(loader, model, distributed=sharded,
                                           forward=lambda images: model.head(features(model, images, amp_dtype)))
    return {"acc1": stats["acc1"], "acc5": stats["acc5"], "loss": stats["loss"], "n": stats["num_images"]}


def head_state(model):
    return {f"head.{k}": v.detach().clone() for k, v in model.head.state_dict().items()}


def load_head(model, ckpt, path):
    state = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise utils.UsageError(f"{path} has no 'model' entry; it is not a linear-probe checkpoint")
    head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
    own = model.head.state_dict()
    if set(head) != set(own):
        raise utils.UsageError(f"{path} holds no linear-probe head (expected head.0.running_mean, head.1.weight, ...); "
                               f"give a checkpoint written by main_linprobe.py")
    bad = [k for k in own if own[k].shape != head[k].shape]
    if bad:
        raise utils.UsageError(f"{path}: head.{bad[0]} is {tuple(head[bad[0]].shape)} there but "
                               f"{tuple(own[bad[0]].shape)} here; pass the --model and --nb_classes it was "
                               f"trained with")
    model.head.load_state_dict(head)
