"""Unit tests of the pretraining engine: losses, per-epoch schedules, lr/wd schedules, optimizer groups,
the non-finite-loss guard and the step logger."""
import argparse
import math
import os
import re

import numpy as np
import pytest
import torch

import utils
from engine_for_pretraining import (NonFiniteLossError, bootmae_loss, ema_momentum_at, feature_weight_at,
                                    mask_weights, normalized_pixel_target, pixels_of_prediction,
                                    train_one_epoch)
from modeling_bootmae import BootMAE
from optim_factory import create_optimizer, param_groups
from target_encoders import build_target_encoder


# ---------------------------------------------------------------------------------------------- mask weights

def _weights_by_loops(mask):
    """1 + (masked cells in the 3x3 neighbourhood, outside the grid counting as unmasked) / 9."""
    h, w = mask.shape
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            n = sum(mask[a, b] for a in range(i - 1, i + 2) for b in range(j - 1, j + 2) if 0 <= a < h and 0 <= b < w)
            out[i, j] = 1 + n / 9
    return out


def test_mask_weights_hand_made_mask():
    m = np.zeros((6, 7), dtype=bool)
    m[1:4, 1:4] = True   # a 3x3 block whose centre is (2, 2)
    m[0, 6] = True       # an isolated patch in the top-right corner
    m[5, 5] = True       # an isolated patch on the bottom border
    w = mask_weights(torch.from_numpy(m).reshape(1, -1), (6, 7)).reshape(6, 7)
    assert w.shape == (6, 7) and w.dtype == torch.float32
    assert w[2, 2].item() == pytest.approx(2.0)                 # centre of a full 3x3 block
    assert w[5, 5].item() == pytest.approx(1 + 1 / 9)           # isolated
    # zero padding: the corner patch has 4 cells in the grid but is still divided by 9
    assert w[0, 6].item() == pytest.approx(1 + 1 / 9)
    assert w[1, 1].item() == pytest.approx(1 + 4 / 9)           # block corner: 4 of its 9 neighbours
    assert w[1, 2].item() == pytest.approx(1 + 6 / 9)           # block edge
    assert w[0, 0].item() == pytest.approx(1 + 1 / 9)           # visible, touches the block corner
    assert w[0, 2].item() == pytest.approx(1 + 3 / 9)           # visible, above the block edge
    assert w[5, 0].item() == pytest.approx(1.0)                 # nothing masked nearby
    np.testing.assert_allclose(w.numpy(), _weights_by_loops(m), rtol=0, atol=1e-6)


def test_mask_weights_batch_rows_are_independent():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 4 * 4, generator=g) < 0.5
    w = mask_weights(masks, (4, 4))
    assert w.shape == (3, 16)
    for b in range(3):
        np.testing.assert_allclose(w[b].reshape(4, 4).numpy(), _weights_by_loops(masks[b].reshape(4, 4).numpy()),
                                   atol=1e-6)


# ---------------------------------------------------------------------------------------------- losses

def _hand_losses(pixel_pred, feature_pred, target_features, images, mask, P):
    B, C, H, W = images.shape
    gw = W // P
    pix, fea, count = 0.0, 0.0, 0
    for b in range(B):
        for n in range(mask.shape[1]):
            if not mask[b, n]:
                continue
            i, j = divmod(n, gw)
            block = images[b, :, i * P:(i + 1) * P, j * P:(j + 1) * P].double()   # [C, P, P]
            mean = block.mean(dim=(1, 2), keepdim=True)
            var = ((block - mean) ** 2).mean(dim=(1, 2), keepdim=True)
            target = ((block - mean) / (var + 1e-5).sqrt()).permute(1, 2, 0).reshape(-1)   # (p, q, c) order
            pix += ((pixel_pred[b, n].double() - target) ** 2).mean()
            f, t = feature_pred[b, n].double(), target_features[b, n].double()
            f = (f - f.mean()) / (f.var(unbiased=False) + 1e-6).sqrt()
            t = (t - t.mean()) / (t.var(unbiased=False) + 1e-6).sqrt()
            fea += ((f - t) ** 2).mean()
            count += 1
    return pix / count, fea / count


def test_bootmae_loss_is_mse_over_masked_patches():
    g = torch.Generator().manual_seed(1)
    B, P, H, W, D = 2, 4, 12, 16, 8
    N = (H // P) * (W // P)
    images = torch.randn(B, 3, H, W, generator=g)
    pixel_pred = torch.randn(B, N, P * P * 3, generator=g)
    feature_pred = torch.randn(B, N, D, generator=g) * 3 + 1
    targets = torch.randn(B, N, D, generator=g) * 0.5 - 2
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        mask[b, torch.randperm(N, generator=g)[:7]] = True
    pixel, feature = bootmae_loss(pixel_pred, feature_pred, targets, images, mask, P, weight_mask=False)
    want_pixel, want_feature = _hand_losses(pixel_pred, feature_pred, targets, images, mask, P)
    assert pixel.item() == pytest.approx(want_pixel.item(), rel=1e-5)
    assert feature.item() == pytest.approx(want_feature.item(), rel=1e-5)

    # visible patches do not count: changing their prediction leaves both losses unchanged
    pixel_pred2, feature_pred2 = pixel_pred.clone(), feature_pred.clone()
    pixel_pred2[~mask] += 100.0
    feature_pred2[~mask] *= -7.0
    p2, f2 = bootmae_loss(pixel_pred2, feature_pred2, targets, images, mask, P)
    assert p2.item() == pixel.item() and f2.item() == feature.item()

    # without targets the feature loss is zero
    p3, f3 = bootmae_loss(pixel_pred, feature_pred, None, images, mask, P)
    assert p3.item() == pixel.item() and f3.item() == 0.0

    # several weighted targets (MAE-new's L_fast + lambda L_slow): the weighted sum of their losses
    other = torch.randn(B, N, D, generator=g)
    _, f_other = bootmae_loss(pixel_pred, feature_pred, other, images, mask, P)
    p4, f4 = bootmae_loss(pixel_pred, feature_pred, [(1.0, targets), (0.2, other)], images, mask, P)
    assert p4.item() == pixel.item() and abs(f_other.item() - feature.item()) > 0.1
    assert f4.item() == pytest.approx(feature.item() + 0.2 * f_other.item(), rel=1e-6)


def test_weighted_loss_divides_by_masked_count():
    g = torch.Generator().manual_seed(2)
    P, H, W = 4, 16, 16
    images = torch.randn(1, 3, H, W, generator=g)
    pixel_pred = torch.randn(1, 16, P * P * 3, generator=g)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, [0, 1, 4, 5, 15]] = True
    plain, _ = bootmae_loss(pixel_pred, pixel_pred[..., :8], None, images, mask, P, weight_mask=False)
    weighted, _ = bootmae_loss(pixel_pred, pixel_pred[..., :8], None, images, mask, P, weight_mask=True)
    # per-patch errors from the unweighted loss of single-patch masks
    errs = []
    for n in [0, 1, 4, 5, 15]:
        one = torch.zeros_like(mask)
        one[0, n] = True
        errs.append(bootmae_loss(pixel_pred, pixel_pred[..., :8], None, images, one, P)[0].item())
    w = mask_weights(mask, (4, 4))[0, [0, 1, 4, 5, 15]].tolist()
    assert plain.item() == pytest.approx(sum(errs) / 5, rel=1e-5)
    assert weighted.item() == pytest.approx(sum(e * x for e, x in zip(errs, w)) / 5, rel=1e-5)


def test_pixel_norm_modes():
    """--pixel_norm: the release normalises each patch per channel, the MAE paper over the whole patch; 'none'
    is the input's own values. Checked against one patch taken out by hand."""
    g = torch.Generator().manual_seed(3)
    P = 4
    images = torch.randn(2, 3, 8, 12, generator=g) * torch.tensor([1.0, 3.0, 0.2]).view(1, 3, 1, 1) + 0.5
    patch = images[1, :, 4:8, 8:12]  # patch (row 1, column 2) of image 1: index 1 * 3 + 2 = 5
    channels_last = patch.permute(1, 2, 0).reshape(-1, 3)  # [P*P, C], the patchify order of each value
    raw = normalized_pixel_target(images, P, norm="none")
    assert torch.equal(raw[1, 5], channels_last.flatten())
    whole = normalized_pixel_target(images, P, norm="patch")[1, 5]
    v = channels_last.flatten()
    # MAE's norm_pix_loss: unbiased variance + 1e-6
    assert torch.allclose(whole, (v - v.mean()) / (v.var(unbiased=True) + 1e-6).sqrt(), atol=1e-5)
    per_channel = normalized_pixel_target(images, P, norm="channel")[1, 5].reshape(-1, 3)
    want = (channels_last - channels_last.mean(0)) / (channels_last.var(0, unbiased=False) + 1e-5).sqrt()
    assert torch.allclose(per_channel, want, atol=1e-5)
    # the modes differ: per channel every channel has mean 0, over the patch only their sum does
    assert per_channel.mean(0).abs().max() < 1e-5 and whole.reshape(-1, 3).mean(0).abs().max() > 0.1
    # and the loss uses the one it is given
    mask = torch.ones(2, 6, dtype=torch.bool)
    pred = torch.zeros(2, 6, P * P * 3)
    for norm, target in (("none", raw), ("patch", normalized_pixel_target(images, P, norm="patch"))):
        loss, _ = bootmae_loss(pred, pred[..., :8], None, images, mask, P, pixel_norm=norm)
        assert loss.item() == pytest.approx(target.pow(2).mean().item(), rel=1e-5)


@pytest.mark.parametrize("norm", ["channel", "patch", "none"])
def test_pixels_of_prediction_inverts_the_target(norm):
    """An exact prediction of the normalised target maps back to the input's own patches."""
    images = torch.randn(2, 3, 8, 12, generator=torch.Generator().manual_seed(4)) * 2.0 + 0.3
    target = normalized_pixel_target(images, 4, norm=norm)
    back = pixels_of_prediction(target, images, 4, norm=norm)
    assert torch.allclose(back, normalized_pixel_target(images, 4, norm="none"), atol=1e-5)
    if norm != "none":  # a zero prediction is each patch's mean (per channel or over the patch)
        flat = pixels_of_prediction(torch.zeros_like(target), images, 4, norm=norm)
        assert flat.std(dim=-1).max() > 0 if norm == "channel" else flat.std(dim=-1).max() < 1e-6


# ---------------------------------------------------------------------------------------------- schedules

def test_feature_weight_ramp():
    assert feature_weight_at(0, 1.0, 800) == pytest.approx(0.005)
    assert feature_weight_at(99, 1.0, 800) == pytest.approx(0.5)
    assert feature_weight_at(199, 1.0, 800) == pytest.approx(1.0)
    assert feature_weight_at(500, 1.0, 800) == 1.0
    assert feature_weight_at(0, 0.5, 4) == pytest.approx(0.5)   # capped at the configured weight
    assert feature_weight_at(10, 0.0, 800) == 0.0


@pytest.mark.parametrize("epoch, dynamic, expected", [
    (0, False, 0.999), (50, False, 0.99945), (100, False, 0.9999), (300, False, 0.9999), (799, False, 0.9999),
    (0, True, 0.999), (50, True, 0.99945), (100, True, 0.9999), (250, True, 0.999945), (400, True, 0.99999),
    (799, True, 0.99999),
])
def test_ema_momentum(epoch, dynamic, expected):
    assert ema_momentum_at(epoch, 0.999, dynamic, 100, 400) == pytest.approx(expected, rel=0, abs=1e-12)


def test_cosine_scheduler():
    base, final, epochs, steps, warm, start = 1e-3, 1e-5, 10, 7, 2, 1e-6
    s = utils.cosine_scheduler(base, final, epochs, steps, warm, start)
    assert len(s) == epochs * steps
    w = warm * steps
    # the release's (BEiT's) warm-up: linspace with its endpoint, so its last step is the base value
    np.testing.assert_allclose(s[:w], start + (base - start) * np.arange(w) / (w - 1), rtol=1e-12)
    assert s[0] == start
    assert s[w - 1] == pytest.approx(base) and s[w] == pytest.approx(base)
    assert np.all(np.diff(s[:w]) > 0) and np.all(np.diff(s[w:]) < 0)
    assert s[-1] == pytest.approx(final, abs=(base - final) * 1e-3)
    assert s[-1] > final
    mid = w + (len(s) - w) // 2
    assert s[mid] == pytest.approx((base + final) / 2, rel=1e-2)
    # no warm-up: constant schedule when base == final
    flat = utils.cosine_scheduler(0.05, 0.05, 3, 4)
    assert len(flat) == 12 and np.all(flat == 0.05)


# ---------------------------------------------------------------------------------------------- optimizer

def _tiny_model(**kw):
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_dim=16, decoder_depth=1)
    cfg.update(kw)
    return BootMAE(**cfg)


def test_param_groups_decay_rules():
    model = _tiny_model()
    groups = param_groups(model, 0.05, skip_list=model.no_weight_decay())
    by_name = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert set(by_name) == {n for n, p in model.named_parameters() if p.requires_grad}
    no_decay = ["cls_token", "norm.weight", "norm.bias", "blocks.0.norm1.weight", "blocks.0.attn.q_bias",
                "blocks.0.attn.v_bias", "blocks.1.mlp.fc1.bias", "patch_embed.proj.bias",
                "pixel_decoder.norm.weight"]
    decay = ["pixel_decoder.mask_token", "feature_decoder.mask_token", "blocks.0.attn.qkv.weight",
             "blocks.1.mlp.fc2.weight", "patch_embed.proj.weight", "feature_decoder.head.weight"]
    for n in no_decay:
        assert by_name[n] == 0.0, n
    for n in decay:
        assert by_name[n] == 0.05, n
    # every 1-D parameter and every bias is undecayed; every other parameter except cls_token decays
    for n, p in model.named_parameters():
        undecayed = p.ndim == 1 or n.endswith(".bias") or n == "cls_token"
        assert by_name[n] == (0.0 if undecayed else 0.05), n
    # the position embedding is a fixed buffer, not a parameter
    assert "pos_embed" not in by_name


def test_create_optimizer_is_adamw_with_release_betas():
    model = _tiny_model()
    opt = create_optimizer(argparse.Namespace(weight_decay=0.05, lr=1e-3, fused_adamw=True), model)
    assert isinstance(opt, torch.optim.AdamW)
    assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.05]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


# ---------------------------------------------------------------------------------------------- engine

def _engine_args(**kw):
    a = dict(update_freq=1, feature_weight=1.0, epochs=4, model_ema_decay=0.999, model_ema_dynamic=False,
             model_ema_warmup_epochs=100, model_ema_dynamic_epochs=400, weight_mask=False, clip_grad=None,
             print_freq=100, weight_decay=0.05, lr=1e-3, model_ema=True, pixel_warmup_epochs=0, pixel_weight=1.0,
             feature_ramp=0.25, target_fraction=1.0, pixel_norm="channel", compile=False, data_pipeline="pil",
             target_encoder="ema", fused_adamw=True)
    a.update(kw)
    return argparse.Namespace(**a)


def _batches(n, bad=None, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        images = torch.randn(B, 3, 32, 32, generator=g)
        if i == bad:
            images[0, :, :5, :5] = float("nan")
        mask = torch.zeros(B, 16, dtype=torch.bool)
        for b in range(B):
            mask[b, torch.randperm(16, generator=g)[:12]] = True
        out.append((images, mask))
    return out


def _setup(args):
    """The tiny model (seed 0), its momentum encoder as run_pretraining builds it, AdamW and 3-step schedules."""
    torch.manual_seed(0)
    model = _tiny_model()
    targets = build_target_encoder(args, model)
    opt = create_optimizer(args, model)
    steps = 3
    lr = utils.cosine_scheduler(args.lr, 1e-5, args.epochs, steps, 1)
    wd = utils.cosine_scheduler(args.weight_decay, args.weight_decay, args.epochs, steps)
    return model, targets, opt, lr, wd


def test_train_one_epoch_updates_model_and_reports_stats():
    args = _engine_args()
    model, targets, opt, lr, wd = _setup(args)
    ema = targets.ema
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ema_before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    stats = train_one_epoch(model, targets, _batches(3), opt, utils.LossScaler("cpu", fp16=False),
                            torch.device("cpu"), 1, lr, wd, args)
    assert stats["steps"] == 3
    assert math.isfinite(stats["loss"]) and stats["loss"] > 0
    assert stats["loss"] == pytest.approx(stats["pixel_loss"] + feature_weight_at(1, 1.0, 4) * stats["feature_loss"],
                                          rel=1e-5)
    assert stats["lr"] == pytest.approx(lr[2 * 3 - 1])   # last step of epoch 1
    assert type(opt.param_groups[0]["lr"]) is float and type(opt.param_groups[0]["weight_decay"]) is float
    assert stats["ema_momentum"] == pytest.approx(ema_momentum_at(1))
    assert ema.decay == pytest.approx(ema_momentum_at(1))
    w = "blocks.0.attn.qkv.weight"
    moved = (model.state_dict()[w] - before[w]).abs().max().item()
    ema_moved = (ema.module.state_dict()[w] - ema_before[w]).abs().max().item()
    assert moved > 0 and 0 < ema_moved < moved


def test_non_finite_loss_names_first_bad_step_and_both_losses():
    """A NaN image in the second batch: the guard (checked only at log steps, here the last) reports the
    first non-finite step, 1, not the step where it was noticed, with both loss components."""
    args = _engine_args(print_freq=100)
    model, targets, opt, lr, wd = _setup(args)
    with pytest.raises(NonFiniteLossError) as info:
        train_one_epoch(model, targets, _batches(3, bad=1), opt, utils.LossScaler("cpu", fp16=False),
                        torch.device("cpu"), 0, lr, wd, args)
    msg = str(info.value)
    assert "\n" not in msg
    m = re.search(r"non-finite loss at step (\d+) \(epoch 0\): pixel loss (\S+), feature loss (\S+)", msg)
    assert m, msg
    assert int(m.group(1)) == 1
    assert m.group(2) == "nan" and m.group(3) == "nan"
    assert "--lr" in msg and "--clip_grad" in msg


def test_non_finite_feature_loss_alone_is_caught():
    """Targets that are NaN (a broken momentum encoder) with finite pixels: the message shows a finite
    pixel loss and a NaN feature loss, at the global step index (epoch 2 x 3 steps = 6)."""
    args = _engine_args(print_freq=1)
    model, targets, opt, lr, wd = _setup(args)
    with torch.no_grad():
        targets.module.blocks[-1].mlp.fc2.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError) as info:
        train_one_epoch(model, targets, _batches(3), opt, utils.LossScaler("cpu", fp16=False),
                        torch.device("cpu"), 2, lr, wd, args)
    m = re.search(r"at step (\d+) \(epoch 2\): pixel loss (\S+), feature loss (\S+)", str(info.value))
    assert m, str(info.value)
    assert int(m.group(1)) == 6
    assert math.isfinite(float(m.group(2))) and float(m.group(2)) > 0
    assert m.group(3) == "nan"


# ---------------------------------------------------------------------------------------------- step logger

def test_train_one_epoch_computes_its_losses_with_bootmae_loss(monkeypatch):
    """Training's loss is bootmae_loss, the function checked against the release: called once per micro-step
    (here 2, accumulated into one step), with --weight_mask, and its values are the ones the loop logs."""
    import engine_for_pretraining
    calls = []
    real = engine_for_pretraining.bootmae_loss

    def counting(*args, **kwargs):
        pix, fea = real(*args, **kwargs)
        calls.append((args[6] if len(args) > 6 else kwargs.get("weight_mask"), pix.item(), fea.item()))
        return pix, fea
    monkeypatch.setattr(engine_for_pretraining, "bootmae_loss", counting)
    args = _engine_args(update_freq=2, weight_mask=True)
    model, targets, opt, lr, wd = _setup(args)
    stats = train_one_epoch(model, targets, _batches(2), opt, utils.LossScaler("cpu", fp16=False),
                            torch.device("cpu"), 1, lr, wd, args)
    assert stats["steps"] == 1 and len(calls) == 2
    assert all(weight_mask is True for weight_mask, _, _ in calls)
    assert stats["pixel_loss"] == pytest.approx(sum(c[1] for c in calls) / 2, rel=1e-6)
    assert stats["feature_loss"] == pytest.approx(sum(c[2] for c in calls) / 2, rel=1e-6)


def test_step_logger_window_and_epoch_means():
    class Writer:
        def __init__(self):
            self.scalars = []

        def add_scalar(self, name, value, step):
            self.scalars.append((name, value, step))

    writer = Writer()
    log = utils.StepLogger(torch.device("cpu"), ["loss", "grad_norm", "never"], writer)
    log.add(loss=torch.tensor(1.0), grad_norm=None)           # accumulation step: no grad norm
    log.add(loss=torch.tensor(3.0), grad_norm=torch.tensor(2.0))
    first = log.flush(7)
    assert first["loss"] == pytest.approx(2.0)
    assert first["grad_norm"] == pytest.approx(2.0)
    assert math.isnan(first["never"])
    assert ("train/loss", pytest.approx(2.0), 7) in writer.scalars
    log.add(loss=torch.tensor(8.0), grad_norm=torch.tensor(6.0))
    second = log.flush(8)
    assert second["loss"] == pytest.approx(8.0) and second["grad_norm"] == pytest.approx(6.0)
    log.add(loss=torch.tensor(0.0), grad_norm=torch.tensor(1.0))   # not flushed: still in the epoch means
    epoch = log.epoch_means()
    assert epoch["loss"] == pytest.approx((1 + 3 + 8 + 0) / 4)
    assert epoch["grad_norm"] == pytest.approx((2 + 6 + 1) / 3)
    assert math.isnan(epoch["never"])


class _ExactRegressor(torch.nn.Module):
    """Predicts exactly the pixel target of ``norm``: its reconstruction must give back the input image."""

    def __init__(self, norm, patch_size=8):
        super().__init__()
        self.norm, self.patch_size = norm, patch_size

    def grid_size(self, images):
        return images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size

    def forward(self, images, mask, feature=False):
        return normalized_pixel_target(images, self.patch_size, norm=self.norm), None


@pytest.mark.parametrize("norm", ["channel", "patch", "none"])
def test_reconstruction_image_undoes_each_pixel_norm(tmp_path, norm):
    from PIL import Image

    import visualize
    g = torch.Generator().manual_seed(4)
    items = [((torch.rand(3, 32, 32, generator=g) * 2 - 1), torch.rand(16, generator=g) < 0.75) for _ in range(2)]
    args = argparse.Namespace(pixel_norm=norm, imagenet_default_mean_and_std=False)
    path = str(tmp_path / "reconstruction.png")
    panels = visualize.save_reconstruction(args, _ExactRegressor(norm), items, torch.device("cpu"), path)
    # input == the prediction pasted into the masked patches; prediction panel == target panel
    assert (panels[:, 4] - panels[:, 0]).abs().max() < 1e-5
    assert torch.equal(panels[:, 3], panels[:, 2])
    with Image.open(path) as png:
        assert png.format == "PNG"
    assert not os.path.exists(path + ".tmp.png")
