"""One BootMAE pretraining epoch (``train_one_epoch``), its loss (``bootmae_loss``) and its per-epoch schedules.

A step: lr and weight decay of the global step -> the target encoder's features (``target_encoders.py``) ->
the model's pixel and feature predictions -> ``bootmae_loss`` -> backward, clip, optimizer step -> the target
encoder's update (BootMAE's EMA) -> the step's figures on the device, read at the print interval.
"""
import contextlib
import time

import torch
import torch.nn.functional as F

import utils
from optim_factory import optimizer_step, set_schedules
from utils import NonFiniteLossError


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


PIXEL_NORMS = ("channel", "patch", "none")


# The epsilon under the square root of each --pixel_norm: the release's per-channel target adds 1e-5 to the biased
# variance; MAE's norm_pix_loss adds 1e-6 to the unbiased (Bessel-corrected) variance. Kept as each wrote it so
# that `channel` is the release's target and `patch` is MAE's exactly.
PIXEL_NORM_EPS = {"channel": 1e-5, "patch": 1e-6}


def _patch_groups(images, patch_size, norm):
    """Patches as ``--pixel_norm`` normalises them: [B, N, P*P, C] per channel (``channel``), else [B, N, P*P*C],
    with their mean and variance over dim 2 (biased for ``channel`` as the release, unbiased for ``patch`` as
    MAE) plus the epsilon of the mode."""
    x = patchify(images.float(), patch_size)
    if norm == "channel":
        x = x.reshape(*x.shape[:2], -1, images.shape[1])
    var = x.var(dim=2, unbiased=norm == "patch", keepdim=True)
    return x, x.mean(dim=2, keepdim=True), var + PIXEL_NORM_EPS[norm]


def normalized_pixel_target(images, patch_size, norm="channel"):
    """The pixel target [B, N, P*P*C] (``--pixel_norm``): each patch normalised by its own mean and std per
    channel (``channel``, the release: biased variance + 1e-5), over all its values (``patch``, the MAE paper's
    norm_pix_loss: unbiased variance + 1e-6), or the input pixels as they are (``none``, MAE's unnormalised
    ablation)."""
    if norm == "none":
        return patchify(images.float(), patch_size)
    x, mean, var = _patch_groups(images, patch_size, norm)
    return ((x - mean) / var.sqrt()).flatten(2)


def pixels_of_prediction(pred, images, patch_size, norm="channel"):
    """Input-space patches [B, N, P*P*C] of a pixel prediction: ``normalized_pixel_target`` undone with the true
    patches' own statistics (as MAE's visualisation does)."""
    if norm == "none":
        return pred.float()
    x, mean, var = _patch_groups(images, patch_size, norm)
    return (pred.float().reshape_as(x) * var.sqrt() + mean).flatten(2)


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


def loss_weights(mask, grid, weight_mask=False):
    """Per-patch loss weights [B, N]: 1 on masked patches, 0 on visible ones; with ``weight_mask`` the
    masked ones weigh 1 + the masked fraction of their 3x3 neighbourhood."""
    weight = mask.float()
    if weight_mask:
        weight = weight * mask_weights(mask, grid)
    return weight


def pixel_loss(pixel_pred, images, weight, patch_size, norm="channel"):
    """Squared error against the (per-patch normalised) pixels, over the patches that ``weight`` selects."""
    return _masked_mse(pixel_pred, normalized_pixel_target(images, patch_size, norm=norm), weight)


def feature_loss(feature_pred, target_features, weight, target_ids=None):
    """Squared error between LayerNorm(no affine, eps 1e-6) of prediction and target. ``target_features`` is
    [B, N, D], or with ``target_ids`` [B, n] the targets of those patches only, [B, n, D] (the momentum-input
    fraction of paper Table 5): the loss is then evaluated on that subset."""
    if target_ids is not None:
        feature_pred = torch.gather(feature_pred, 1, target_ids[..., None].expand(-1, -1, feature_pred.shape[-1]))
        weight = torch.gather(weight, 1, target_ids)
    D = feature_pred.shape[-1]
    pred = F.layer_norm(feature_pred.float(), (D,), eps=1e-6)
    target = F.layer_norm(target_features.float(), (D,), eps=1e-6)
    return _masked_mse(pred, target, weight)


def bootmae_loss(pixel_pred, feature_pred, target_features, images, mask, patch_size, weight_mask=False,
                 target_ids=None, pixel_norm="channel"):
    """BootMAE's two losses, computed in float32.

    pixel_pred: [B, N, P*P*3] (or None: pixel loss 0); feature_pred: [B, N, D]; target_features: [B, N, D]
    momentum-encoder tokens, or [B, n, D] for the patches ``target_ids`` [B, n]; or a list of (weight, such
    targets) whose losses are summed with those weights (MAE-new: [(1, fast), (lambda, slow)]); None or an
    empty list: feature loss 0. images: [B, 3, H, W] the model's input; mask: [B, N] bool, True = masked.
    Returns (pixel_loss, feature_loss): squared errors on masked patches (weighted by ``mask_weights`` with
    ``weight_mask``) against the pixel target of ``pixel_norm`` (see ``normalized_pixel_target``) and against
    LayerNorm(no affine, eps 1e-6) of the targets (the prediction normalised the same).
    """
    grid = (images.shape[-2] // patch_size, images.shape[-1] // patch_size)
    weight = loss_weights(mask, grid, weight_mask)
    zero = weight.new_zeros(())
    pix = zero if pixel_pred is None else pixel_loss(pixel_pred, images, weight, patch_size, pixel_norm)
    if torch.is_tensor(target_features):
        target_features = [(1.0, target_features)]
    terms = [feature_loss(feature_pred, target, weight, target_ids) * w for w, target in target_features or ()]
    return pix, sum(terms[1:], terms[0]) if terms else zero


def sample_target_patches(mask, num_masked, count):
    """``count`` masked patches per image for the momentum encoder (paper Table 5), [B, count] indices in
    patch order. Which ones is drawn uniformly without replacement from the global torch RNG (on the CPU, so
    the draw is the same on every device); the training loop reseeds that RNG every epoch, so a resumed run
    draws the same subsets."""
    B, N = mask.shape
    masked = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)[:, N - num_masked:]
    pick = torch.rand(B, num_masked).argsort(dim=1)[:, :count].to(mask.device)
    return torch.gather(masked, 1, pick).sort(dim=1).values


def target_patch_count(fraction, num_patches):
    """Patches fed to the momentum encoder for ``--target_fraction``: the full image at 1."""
    return num_patches if fraction >= 1 else int(round(fraction * num_patches))


def feature_weight_at(epoch, feature_weight, epochs, ramp=0.25):
    """The release ramps the feature-loss weight linearly per epoch to its full value at ``ramp`` (25 %) of
    training; ``ramp`` 0 gives the full weight from the first epoch."""
    if ramp <= 0:
        return feature_weight
    # 1 / 0.25 is exactly 4.0: the release's expression, bit for bit
    return min(feature_weight * (1.0 / ramp) * (epoch + 1) / epochs, feature_weight)


def loss_weights_at(epoch, args):
    """(pixel weight, feature weight) of an epoch. During ``--pixel_warmup_epochs`` (the report's WSE) the
    loss is the pixel loss alone; afterwards ``--pixel_weight`` and the ramped ``--feature_weight``."""
    if epoch < args.pixel_warmup_epochs:
        return 1.0, 0.0
    return (args.pixel_weight,
            feature_weight_at(epoch, args.feature_weight, args.epochs, args.feature_ramp))


def ema_momentum_at(epoch, start=0.999, dynamic=False, warmup_epochs=100, dynamic_epochs=400):
    """Momentum of the EMA encoder for an epoch: start -> 0.9999 linearly over the first ``warmup_epochs``;
    with ``dynamic`` (ViT-B) then 0.9999 -> 0.99999 linearly until ``dynamic_epochs``; constant after."""
    if epoch < warmup_epochs:
        return start + (0.9999 - start) * epoch / warmup_epochs
    if dynamic:
        frac = min((epoch - warmup_epochs) / max(dynamic_epochs - warmup_epochs, 1), 1.0)
        return 0.9999 + (0.99999 - 0.9999) * frac
    return 0.9999


# the epoch statistics measured with the host's clock (not reproduced by a resumed run, unlike the others)
WALL_CLOCK_STATS = ("images_per_s", "data_wait")
# a data-wait share above this is called out as an input-bound run
INPUT_BOUND_WAIT = 0.1


class LoaderClock:
    """The host's wall time of an epoch and the part of it spent blocked in ``next(loader)`` (the start of the
    loader's workers included), per print interval (``window``) and for the epoch (``total``). It reads only
    the host clock, so a step gains no device sync; a window's figures are exact where the loop syncs (the
    print intervals), and the epoch's after its final sync."""

    def __init__(self):
        self.start = self.window_start = time.perf_counter()
        self.wait = self.window_wait = 0.0
        self.images = self.window_images = 0

    def batches(self, loader):
        """The items of ``loader``; the seconds each one took to arrive count as waiting for data."""
        t = time.perf_counter()
        for item in loader:
            waited = time.perf_counter() - t
            self.wait += waited
            self.window_wait += waited
            n = len(item[0])
            self.images += n
            self.window_images += n
            yield item
            t = time.perf_counter()

    @staticmethod
    def _rates(images, wait, seconds):
        # images/s of all processes (every rank loads the same batch size); the wait share is this process's
        return images * utils.get_world_size() / max(seconds, 1e-9), min(wait / max(seconds, 1e-9), 1.0)

    def window(self):
        """(images/s, data-wait share) since the previous call, and a new window."""
        now = time.perf_counter()
        rates = self._rates(self.window_images, self.window_wait, now - self.window_start)
        self.window_start, self.window_wait, self.window_images = now, 0.0, 0
        return rates

    def total(self):
        """(images/s, data-wait share) of the whole epoch so far."""
        return self._rates(self.images, self.wait, time.perf_counter() - self.start)


class EpochLog:
    """The figures of one epoch: each micro-step's losses and gradient norm summed on the device
    (``utils.StepLogger``), the first non-finite step with its loss components (``utils.mark_first_nonfinite``),
    the loader's images/s and data wait (``LoaderClock``); read, printed and logged at the print intervals."""

    def __init__(self, device, epoch, steps_per_epoch, log_writer=None):
        self.epoch, self.steps, self.log_writer = epoch, steps_per_epoch, log_writer
        self.header = f"Epoch: [{epoch}]"
        self.logger = utils.StepLogger(device, ["loss", "pixel_loss", "feature_loss", "grad_norm"], log_writer)
        self.bad = torch.full((3,), -1.0, device=device)   # [step, pixel loss, feature loss] of the first NaN
        self.start, self.first_step_end = time.time(), None
        self.clock = LoaderClock()

    def add(self, it, loss, pix, fea, grad_norm):
        """One micro-step (``grad_norm`` None unless it updated the weights), kept on the device."""
        utils.mark_first_nonfinite(self.bad, loss, it, pix, fea)
        self.logger.add(loss=loss.detach(), pixel_loss=pix.detach(), feature_loss=fea.detach(), grad_norm=grad_norm)

    def step_done(self):
        if self.first_step_end is None:
            self.first_step_end = time.time()

    def print_step(self, step, it, lr, feature_weight, momentum):
        """The print interval, the steps' only host sync: a non-finite loss so far stops the run, naming its first
        step and loss components; else the interval's means are printed and logged."""
        if self.bad[0].item() >= 0:
            s, p, f = self.bad.tolist()
            raise NonFiniteLossError(
                f"non-finite loss at step {int(s)} (epoch {self.epoch}): pixel loss {p}, feature loss {f} "
                f"(feature weight {feature_weight}); lower --lr, set --clip_grad, or use --amp bf16/none")
        means = self.logger.flush(it)
        images_per_s, data_wait = self.clock.window()
        elapsed = time.time() - self.start
        eta = elapsed / (step + 1) * (self.steps - step - 1)
        if self.log_writer is not None:
            for name, value in (("opt/lr", lr), ("opt/feature_weight", feature_weight), ("opt/ema_momentum", momentum),
                                ("perf/images_per_s", images_per_s), ("perf/data_wait", data_wait)):
                self.log_writer.add_scalar(name, value, it)
        utils.print0(f"{self.header} [{step + 1:>{len(str(self.steps))}}/{self.steps}] "
                     f"eta {utils.format_seconds(eta)}  lr {lr:.3e}  loss {means['loss']:.4f} "
                     f"(pixel {means['pixel_loss']:.4f}, feature {means['feature_loss']:.4f})  "
                     f"grad_norm {means['grad_norm']:.3f}  {elapsed / (step + 1):.3f} s/step  "
                     f"{images_per_s:.1f} img/s  data wait {100 * data_wait:.0f} %")

    def finish(self, data_pipeline="pil"):
        """(the epoch's means, its timing: s_per_step, images_per_s, data_wait), the images/s line printed."""
        stats = self.logger.epoch_means()   # waits for the device, so the clock covers every queued step
        end = time.time()
        images_per_s, data_wait = self.clock.total()
        if self.log_writer is not None:
            self.log_writer.add_scalar("perf/epoch_images_per_s", images_per_s, self.epoch)
            self.log_writer.add_scalar("perf/epoch_data_wait", data_wait, self.epoch)
        hint = " or use --data_pipeline fast)" if data_pipeline == "pil" else ")"
        utils.print0(f"{self.header} {images_per_s:.1f} images/s, {100 * data_wait:.0f} % of the time waiting for "
                     f"data" + (" (input-bound: raise --num_workers" + hint if data_wait > INPUT_BOUND_WAIT else ""))
        # seconds per optimisation step after the first (which also waits for the data loader to start)
        first = self.first_step_end
        s_per_step = (end - first) / (self.steps - 1) if self.steps > 1 else end - self.start
        return stats, dict(s_per_step=s_per_step, images_per_s=images_per_s, data_wait=data_wait)


def train_one_epoch(model, targets, data_loader, optimizer, loss_scaler, device, epoch,
                    lr_schedule, wd_schedule, args, log_writer=None, amp_dtype=None):
    """One epoch. ``model`` may be DDP-wrapped; ``targets`` is a ``target_encoders.TargetEncoder`` (None: pixel
    loss only); ``loss_scaler`` a ``utils.LossScaler`` (its GradScaler is active for fp16 only).
    ``lr_schedule``/``wd_schedule`` are per-step arrays indexed by the global optimisation step, so a resumed
    run continues them exactly. Returns the epoch's mean losses and gradient norm (before clipping), the
    schedules' values, and ``images_per_s`` (all processes) and ``data_wait`` (the share of the epoch this
    process spent waiting for the data loader)."""
    model.train()
    unwrapped = utils.unwrap_model(model)
    update_freq = args.update_freq
    steps_per_epoch = len(data_loader) // update_freq
    pixel_weight, feature_weight = loss_weights_at(epoch, args)
    momentum = ema_momentum_at(epoch, args.model_ema_decay, args.model_ema_dynamic,
                               args.model_ema_warmup_epochs, args.model_ema_dynamic_epochs)
    use_targets = targets is not None and feature_weight > 0
    fraction = args.target_fraction
    pixel_norm = args.pixel_norm
    # under --compile the loss is compiled too: its normalisations and reductions become a few kernels
    loss_fn = torch.compile(bootmae_loss) if args.compile else bootmae_loss
    scaler = loss_scaler.scaler
    params = [p for p in model.parameters() if p.requires_grad]
    if use_targets:
        targets.begin_epoch(epoch, unwrapped)
    log = EpochLog(device, epoch, steps_per_epoch, log_writer)
    optimizer.zero_grad(set_to_none=True)
    for data_iter, (images, mask) in enumerate(log.clock.batches(data_loader)):
        step, update = data_iter // update_freq, (data_iter + 1) % update_freq == 0
        if step >= steps_per_epoch:
            break
        it = epoch * steps_per_epoch + step
        if data_iter % update_freq == 0:
            set_schedules(optimizer, lr_schedule[it], wd_schedule[it])
        # the masked count is read on the host, before the copy, so the step never waits for the device
        num_masked = int(mask[0].sum())
        images = images.to(device, non_blocking=True)
        mask = mask.to(device, non_blocking=True).flatten(1)
        target_ids = None
        if use_targets and fraction < 1:
            target_ids = sample_target_patches(mask, num_masked, target_patch_count(fraction, mask.shape[1]))
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            target_features = targets.features(images, target_ids) if use_targets else None
            pixel_pred, feature_pred = model(images, mask, num_masked, pixel=pixel_weight > 0, feature=use_targets)
        pix, fea = loss_fn(pixel_pred, feature_pred, target_features, images, mask, unwrapped.patch_size,
                           args.weight_mask, target_ids, pixel_norm)
        loss = pixel_weight * pix + feature_weight * fea
        # accumulation micro-steps keep their gradients local: DDP all-reduces on the update micro-step only
        with model.no_sync() if not update and hasattr(model, "no_sync") else contextlib.nullcontext():
            scaler.scale(loss / update_freq).backward()
        grad_norm = None
        if update:
            grad_norm = optimizer_step(optimizer, scaler, params, args.clip_grad)  # unscale, clip, step, zero
            if targets is not None:
                targets.after_step(unwrapped, momentum)
            log.step_done()
        log.add(it, loss, pix, fea, grad_norm)
        if update and (step % args.print_freq == 0 or step + 1 == steps_per_epoch):
            log.print_step(step, it, optimizer.param_groups[0]["lr"], feature_weight, momentum)
    stats, timing = log.finish(args.data_pipeline)
    if use_targets:
        targets.end_epoch(epoch, unwrapped)
    stats.update(lr=optimizer.param_groups[0]["lr"], feature_weight=feature_weight, ema_momentum=momentum,
                 steps=steps_per_epoch, pixel_weight=pixel_weight, **timing,
                 target_patches=target_patch_count(fraction, unwrapped.patch_embed.num_patches) if use_targets else 0)
    return stats
