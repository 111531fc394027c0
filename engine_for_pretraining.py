"""One BootMAE pretraining epoch, its losses and its per-epoch schedules."""
import time

import torch
import torch.nn.functional as F

import utils


def patchify(images, patch_size):
    """images: [B, C, H, W] -> [B, N, P*P*C], patches in row-major order, (p, q, channel) within a patch."""
    B, C, H, W = images.shape
    h, w = H // patch_size, W // patch_size
    x = images.reshape(B, C, h, patch_size, w, patch_size)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, h * w, patch_size * patch_size * C)


def unpatchify(patches, patch_size, grid, channels=3):
    """[B, N, P*P*C] -> [B, C, h*P, w*P] (inverse of ``patchify``)."""
    B = patches.shape[0]
    h, w = grid
    x = patches.reshape(B, h, w, patch_size, patch_size, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, channels, h * patch_size, w * patch_size)


def normalized_pixel_target(images, patch_size, eps=1e-5):
    """Each patch normalised per channel by its own mean and (biased) std: [B, N, P*P*C]."""
    C = images.shape[1]
    x = patchify(images.float(), patch_size)
    x = x.reshape(*x.shape[:2], -1, C)
    mean = x.mean(dim=2, keepdim=True)
    var = x.var(dim=2, unbiased=False, keepdim=True)
    return ((x - mean) / (var + eps).sqrt()).flatten(2)


def mask_weights(mask, grid):
    """``--weight_mask``: 1 + the fraction of masked patches in each patch's 3x3 neighbourhood (zero padded,
    the patch itself counted), [B, N] float. Block centres weigh up to 2, isolated patches 1 + 1/9."""
    m = mask.float().reshape(-1, 1, *grid)
    frac = F.conv2d(m, torch.ones(1, 1, 3, 3, device=m.device, dtype=m.dtype), padding=1) / 9.0
    return 1.0 + frac.flatten(1)


def _masked_mse(pred, target, weight):
    """Mean squared error over the masked patches; ``weight`` [B, N] is zero for visible patches. The
    weighted sum is divided by the number of masked values, as the release does (not by the weight sum)."""
    err = (pred.float() - target.float()).pow(2).mean(dim=-1)
    return (err * weight).sum() / (weight > 0).sum().clamp(min=1)


def bootmae_loss(pixel_pred, feature_pred, target_features, images, mask, patch_size, weight_mask=False):
    """BootMAE's two losses, computed in float32.

    pixel_pred: [B, N, P*P*3]; feature_pred: [B, N, D]; target_features: [B, N, D] momentum-encoder tokens
    (or None: feature loss 0); images: [B, 3, H, W] the model's input; mask: [B, N] bool, True = masked.
    Returns (pixel_loss, feature_loss): squared errors on masked patches against the per-patch normalised
    pixels and against LayerNorm(no affine, eps 1e-6) of the targets (the prediction normalised the same).
    """
    grid = (images.shape[-2] // patch_size, images.shape[-1] // patch_size)
    weight = mask.float()
    if weight_mask:
        weight = weight * mask_weights(mask, grid)
    pixel_loss = _masked_mse(pixel_pred, normalized_pixel_target(images, patch_size), weight)
    if target_features is None:
        return pixel_loss, pixel_loss.new_zeros(())
    D = feature_pred.shape[-1]
    pred = F.layer_norm(feature_pred.float(), (D,), eps=1e-6)
    target = F.layer_norm(target_features.float(), (D,), eps=1e-6)
    return pixel_loss, _masked_mse(pred, target, weight)


def feature_weight_at(epoch, feature_weight, epochs):
    """The release ramps the feature-loss weight linearly per epoch to its full value at 25 % of training."""
    return min(feature_weight * 4.0 * (epoch + 1) / epochs, feature_weight)


def ema_momentum_at(epoch, start=0.999, dynamic=False, warmup_epochs=100, dynamic_epochs=400):
    """Momentum of the EMA encoder for an epoch: start -> 0.9999 linearly over the first ``warmup_epochs``;
    with ``dynamic`` (ViT-B) then 0.9999 -> 0.99999 linearly until ``dynamic_epochs``; constant after."""
    if epoch < warmup_epochs:
        return start + (0.9999 - start) * epoch / warmup_epochs
    if dynamic:
        frac = min((epoch - warmup_epochs) / max(dynamic_epochs - warmup_epochs, 1), 1.0)
        return 0.9999 + (0.99999 - 0.9999) * frac
    return 0.9999


class NonFiniteLossError(RuntimeError):
    pass


def train_one_epoch(model, momentum_encoder, data_loader, optimizer, loss_scaler, device, epoch,
                    lr_schedule, wd_schedule, args, log_writer=None, amp_dtype=None, target_fn=None):
    """One epoch. ``model`` may be DDP-wrapped; ``momentum_encoder`` is a timm ``ModelEmaV3`` of the
    unwrapped model (or None: pixel loss only); ``target_fn`` (default: its ``target_features``) computes the
    feature targets, e.g. a compiled version of it. ``lr_schedule``/``wd_schedule`` are per-step arrays indexed
    by the global optimisation step, so a resumed run continues them exactly."""
    model.train()
    # the plain module under torch.compile (``_orig_mod``) and DDP (``module``) wrappers
    unwrapped = getattr(model, "_orig_mod", model)
    unwrapped = getattr(unwrapped, "module", unwrapped)
    if momentum_encoder is not None and target_fn is None:
        target_fn = momentum_encoder.module.target_features
    patch_size = unwrapped.patch_size
    update_freq = args.update_freq
    steps_per_epoch = len(data_loader) // update_freq
    feature_weight = feature_weight_at(epoch, args.feature_weight, args.epochs)
    momentum = ema_momentum_at(epoch, args.model_ema_decay, args.model_ema_dynamic,
                               args.model_ema_warmup_epochs, args.model_ema_dynamic_epochs)
    use_targets = momentum_encoder is not None and args.feature_weight > 0
    logger = utils.StepLogger(device, ["loss", "pixel_loss", "feature_loss", "grad_norm"], log_writer)
    # first non-finite step and its two loss components, kept on the device so that no step syncs
    bad = torch.full((3,), -1.0, device=device)
    header = f"Epoch: [{epoch}]"
    start = time.time()
    optimizer.zero_grad(set_to_none=True)
    for data_iter, (images, mask) in enumerate(data_loader):
        step = data_iter // update_freq
        if step >= steps_per_epoch:
            break
        it = epoch * steps_per_epoch + step
        if data_iter % update_freq == 0:
            for group in optimizer.param_groups:
                # Python floats, not numpy scalars: the optimizer state goes into checkpoints that are
                # loaded with torch.load(weights_only=True), which refuses numpy objects
                group["lr"] = float(lr_schedule[it]) * group.get("lr_scale", 1.0)
                if group["weight_decay"] > 0:
                    group["weight_decay"] = float(wd_schedule[it])
        # the masked count is read on the host, before the copy, so the step never waits for the device
        num_masked = int(mask[0].sum())
        images = images.to(device, non_blocking=True)
        mask = mask.to(device, non_blocking=True).flatten(1)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            target = target_fn(images) if use_targets else None
            pixel_pred, feature_pred = model(images, mask, num_masked)
        pixel_loss, feature_loss = bootmae_loss(pixel_pred, feature_pred, target, images, mask, patch_size,
                                                args.weight_mask)
        loss = pixel_loss + feature_weight * feature_loss
        first_bad = (bad[0] < 0) & ~torch.isfinite(loss)
        bad.copy_(torch.where(first_bad, torch.stack([torch.tensor(float(it), device=device),
                                                      pixel_loss.detach(), feature_loss.detach()]), bad))
        update = (data_iter + 1) % update_freq == 0
        grad_norm = loss_scaler(loss / update_freq, optimizer, parameters=model.parameters(),
                                clip_grad=args.clip_grad, update_grad=update,
                                sync=update or not hasattr(model, "no_sync"), model=model)
        if update:
            optimizer.zero_grad(set_to_none=True)
            if momentum_encoder is not None:
                momentum_encoder.decay = momentum
                momentum_encoder.update(unwrapped)
        logger.add(loss=loss.detach(), pixel_loss=pixel_loss.detach(), feature_loss=feature_loss.detach(),
                   grad_norm=grad_norm)
        last = data_iter + 1 == steps_per_epoch * update_freq
        if update and (step % args.print_freq == 0 or last):
            if bad[0].item() >= 0:
                s, p, f = bad.tolist()
                raise NonFiniteLossError(
                    f"non-finite loss at step {int(s)} (epoch {epoch}): pixel loss {p}, feature loss {f} "
                    f"(feature weight {feature_weight}); lower --lr, set --clip_grad, or use --amp bf16/none")
            means = logger.flush(it)
            elapsed = time.time() - start
            eta = elapsed / (step + 1) * (steps_per_epoch - step - 1)
            lr = optimizer.param_groups[0]["lr"]
            if log_writer is not None:
                log_writer.add_scalar("opt/lr", lr, it)
                log_writer.add_scalar("opt/feature_weight", feature_weight, it)
                log_writer.add_scalar("opt/ema_momentum", momentum, it)
            utils.print0(f"{header} [{step + 1:>{len(str(steps_per_epoch))}}/{steps_per_epoch}] "
                         f"eta {utils.format_seconds(eta)}  lr {lr:.3e}  loss {means['loss']:.4f} "
                         f"(pixel {means['pixel_loss']:.4f}, feature {means['feature_loss']:.4f})  "
                         f"grad_norm {means['grad_norm']:.3f}  {elapsed / (step + 1):.3f} s/step")
    stats = logger.epoch_means()
    stats.update(lr=optimizer.param_groups[0]["lr"], feature_weight=feature_weight, ema_momentum=momentum,
                 steps=steps_per_epoch)
    return stats
