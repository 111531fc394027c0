"""Pretraining steps checked against independent computations, so that a wrong training loop fails:

- the losses the loop logs and applies equal ``bootmae_loss`` (the function tested against the release) on the
  predictions the loop made, with ``--weight_mask``, at epoch 0 of 800 (feature weight 0.005) and at epoch 250
  with ``--model_ema_dynamic``, where the momentum applied to the EMA is measured from the parameters;
- ``--update_freq 2`` at batch B gives the parameters, optimizer steps, EMA updates and lr indices of
  ``--update_freq 1`` at batch 2B;
- ``--clip_grad`` bounds the gradient the optimizer applies, ``--amp bf16`` on CPU stays close to float32, and
  ``--weight_decay_end`` moves the decayed groups' weight decay along its cosine while the others stay at 0
  (in the loop, and from the command line to the optimizer of a run).

Tiny models (tests/test_engine.py's) on random batches; drop path 0, so a step holds no randomness.
"""
import copy
import math

import pytest
import torch

import utils
from engine_for_pretraining import bootmae_loss, train_one_epoch
from optim_factory import create_optimizer
from test_engine import _batches, _engine_args, _setup

CPU = torch.device("cpu")
PATCH = 8  # _tiny_model's patch size


def _schedules(args, steps_per_epoch, wd_end=None):
    """Per-step lr (cosine to 1e-5, no warm-up) and weight decay (cosine to ``wd_end``, default constant)."""
    lr = utils.cosine_scheduler(args.lr, 1e-5, args.epochs, steps_per_epoch)
    wd = utils.cosine_scheduler(args.weight_decay, args.weight_decay if wd_end is None else wd_end, args.epochs,
                                steps_per_epoch)
    return lr, wd


def _record_steps(optimizer, model):
    """Before every optimizer step: the lr and weight decay of each group and the total gradient norm."""
    seen = []

    def hook(opt, args, kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
        seen.append({"lr": [g["lr"] for g in opt.param_groups], "wd": [g["weight_decay"] for g in opt.param_groups],
                     "grad_norm": norm})
    optimizer.register_step_pre_hook(hook)
    return seen


def _capture_outputs(model):
    outputs = []
    model.register_forward_hook(lambda mod, inp, out: outputs.append(tuple(
        None if o is None else o.detach().clone() for o in out)))
    return outputs


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _grouped_decay(optimizer):
    """Indices of the decayed parameter groups (weight decay > 0 as built) and of the others."""
    decayed = [i for i, g in enumerate(optimizer.param_groups) if g["weight_decay"] > 0]
    return decayed, [i for i in range(len(optimizer.param_groups)) if i not in decayed]


def _epoch(args, batches, epoch, steps_per_epoch, amp_dtype=None, ema_offset=0.0, wd_end=None):
    """One ``train_one_epoch`` from a fresh tiny model (test_engine's, seed 0) with its EMA and AdamW; returns
    what it did and what it saw."""
    model, momentum_encoder, opt, _, _ = _setup(args)
    ema = momentum_encoder.ema
    if ema_offset:
        # an EMA far from the online model, so that its update shows the momentum used
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in ema.module.parameters():
                p.add_(torch.randn(p.shape, generator=g) * ema_offset)
    ema_updates = []
    ema_update = ema.update
    ema.update = lambda *a, **kw: (ema_updates.append(ema.decay), ema_update(*a, **kw))
    reference = copy.deepcopy(model)
    ema_before = _params(ema.module)
    with torch.no_grad():   # the feature targets of the first batch (the EMA moves after its step)
        targets = ema.module.target_features(batches[0][0])
    decayed, undecayed = _grouped_decay(opt)
    outputs = _capture_outputs(model)
    steps = _record_steps(opt, model)
    lr, wd = _schedules(args, steps_per_epoch, wd_end=wd_end)
    stats = train_one_epoch(model, momentum_encoder, batches, opt, utils.LossScaler("cpu", fp16=False), CPU, epoch,
                            lr, wd, args, amp_dtype=amp_dtype)
    return dict(stats=stats, model=model, ema=ema, opt=opt, ema_before=ema_before, ema_updates=ema_updates,
                reference=reference, targets=targets, outputs=outputs, steps=steps, lr=lr, wd=wd,
                decayed=decayed, undecayed=undecayed)


def _losses_of_first_batch(run, batches, weight_mask=True):
    """bootmae_loss on the predictions the loop made for its first batch and that batch's targets."""
    (pixel_pred, feature_pred) = run["outputs"][0]
    images, mask = batches[0]
    pix, fea = bootmae_loss(pixel_pred, feature_pred, run["targets"], images, mask, PATCH, weight_mask=weight_mask)
    return pix.item(), fea.item()


def _reference_step(run, batch, feature_weight, lr):
    """The loop's first step done by hand on a copy of the initial model: bootmae_loss with --weight_mask,
    pixel + ``feature_weight`` x feature, backward, AdamW with the release's groups at ``lr``."""
    model = copy.deepcopy(run["reference"])
    opt = create_optimizer(_engine_args(), model)
    for group in opt.param_groups:
        group["lr"] = lr
    images, mask = batch
    pixel_pred, feature_pred = model(images, mask, int(mask[0].sum()))
    pix, fea = bootmae_loss(pixel_pred, feature_pred, run["targets"], images, mask, PATCH, weight_mask=True)
    (pix + feature_weight * fea).backward()
    opt.step()
    return _params(model)


def _max_diff(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in b)


def test_epoch_0_of_800_logs_and_applies_bootmae_loss_with_the_ramped_feature_weight():
    """Epoch 0 of 800 with --weight_mask: feature weight 0.005 (the release's min(4 x (0 + 1) / 800, 1)). The
    logged pixel and feature losses are bootmae_loss's on the loop's own predictions, the logged total is
    pixel + 0.005 x feature, and the parameters are those of the same step done by hand (float32; one AdamW
    step moves a weight by lr x a ratio of gradients, so 1e-3 x lr covers two roundings of the same loss)."""
    args = _engine_args(epochs=800, weight_mask=True)
    batches = _batches(1, B=2, seed=3)
    run = _epoch(args, batches, 0, 1)
    stats = run["stats"]
    pix, fea = _losses_of_first_batch(run, batches)
    assert stats["feature_weight"] == pytest.approx(0.005, rel=1e-12)
    assert stats["pixel_weight"] == 1.0
    assert stats["pixel_loss"] == pytest.approx(pix, rel=1e-6), "logged pixel loss is not bootmae_loss's"
    assert stats["feature_loss"] == pytest.approx(fea, rel=1e-6), "logged feature loss is not bootmae_loss's"
    assert stats["loss"] == pytest.approx(pix + 0.005 * fea, rel=1e-6)
    # the mask weights matter on this batch: without them bootmae_loss differs by far more than the tolerance
    plain = _losses_of_first_batch(run, batches, weight_mask=False)
    assert abs(plain[0] - pix) > 0.05 * pix and abs(plain[1] - fea) > 0.05 * fea
    lr = float(run["lr"][0])
    got = _params(run["model"])
    assert _max_diff(got, _reference_step(run, batches[0], 0.005, lr)) <= 1e-3 * lr, \
        "the applied step is not pixel + 0.005 x feature of bootmae_loss with --weight_mask"
    # the step of the full feature weight is far from it
    assert _max_diff(got, _reference_step(run, batches[0], 1.0, lr)) > 0.5 * lr


def test_dynamic_momentum_is_applied_to_the_ema_at_epoch_250():
    """Epoch 250 of 800 with --model_ema_dynamic: the release's momentum 0.9999 + min(300, 250 - 100) / 300 x
    (0.99999 - 0.9999) = 0.999945 is logged and applied: after the step, EMA = m x EMA before + (1 - m) x the
    updated online model, m measured from all parameters (least squares; 0.9999, the momentum without
    --model_ema_dynamic, is 4.5e-5 away). The losses are bootmae_loss's with --weight_mask, weight 1."""
    m = 0.9999 + min(300, 250 - 100) / 300 * (0.99999 - 0.9999)
    args = _engine_args(epochs=800, weight_mask=True, model_ema_dynamic=True)
    batches = _batches(1, B=2, seed=4)
    run = _epoch(args, batches, 250, 1, ema_offset=0.5)
    stats = run["stats"]
    pix, fea = _losses_of_first_batch(run, batches)
    assert stats["feature_weight"] == 1.0
    assert stats["pixel_loss"] == pytest.approx(pix, rel=1e-6)
    assert stats["feature_loss"] == pytest.approx(fea, rel=1e-6)
    assert stats["loss"] == pytest.approx(pix + fea, rel=1e-6)
    assert stats["ema_momentum"] == pytest.approx(m, rel=0, abs=1e-12)
    assert run["ema_updates"] == [pytest.approx(m, rel=0, abs=1e-12)]
    online, before, after = _params(run["model"]), run["ema_before"], _params(run["ema"].module)
    num = sum(((after[n] - before[n]).double() * (online[n] - before[n]).double()).sum() for n in before)
    den = sum(((online[n] - before[n]).double() ** 2).sum() for n in before)
    applied = 1.0 - (num / den).item()
    assert applied == pytest.approx(m, rel=0, abs=1e-7), f"the EMA moved with momentum {applied:.7f}, not {m}"
    want = {n: m * before[n] + (1 - m) * online[n] for n in before}
    assert _max_diff(after, want) <= 1e-6


def test_update_freq_2_at_batch_b_equals_update_freq_1_at_batch_2b():
    """Two optimisation steps, each on 4 images: as one batch of 4 (--update_freq 1) or as two accumulated
    batches of 2 (--update_freq 2). The same gradient at each optimizer step (norm to 1e-5 relative: AdamW
    would hide a gradient scaled by the accumulation), two optimizer steps, two EMA updates, the lr and weight
    decay of global steps 2 and 3, and the same parameters and EMA in float32: parameters to 1e-5 absolute
    (1 % of the lr; AdamW divides by the root of the second moment, so the few weights whose gradient is near
    0 amplify the rounding of two summation orders), the EMA to 1e-7."""
    big = _batches(2, B=4, seed=7)
    small = [(images[half], mask[half]) for images, mask in big for half in (slice(0, 2), slice(2, 4))]
    runs = {}
    for freq, batches in ((1, big), (2, small)):
        args = _engine_args(epochs=4, update_freq=freq, weight_mask=True)
        runs[freq] = _epoch(args, batches, 1, 2, wd_end=0.01)
    one, two = runs[1], runs[2]
    assert one["stats"]["steps"] == two["stats"]["steps"] == 2
    assert len(one["ema_updates"]) == len(two["ema_updates"]) == 2, "one EMA update per optimizer step"
    for run in (one, two):
        assert {int(s["step"]) for s in run["opt"].state.values()} == {2}
        assert [s["lr"][0] for s in run["steps"]] == [pytest.approx(float(run["lr"][i])) for i in (2, 3)]
        assert [s["wd"][run["decayed"][0]] for s in run["steps"]] == [pytest.approx(float(run["wd"][i]))
                                                                       for i in (2, 3)]
    assert one["stats"]["lr"] == pytest.approx(two["stats"]["lr"])
    for key in ("loss", "pixel_loss", "feature_loss"):
        assert two["stats"][key] == pytest.approx(one["stats"][key], rel=1e-5)
    assert [s["grad_norm"] for s in two["steps"]] == pytest.approx([s["grad_norm"] for s in one["steps"]],
                                                                    rel=1e-5)
    assert _max_diff(_params(one["model"]), _params(one["reference"])) > 1e-3   # two steps of about the lr
    assert _max_diff(_params(two["model"]), _params(one["model"])) <= 1e-5
    assert _max_diff(_params(two["ema"].module), _params(one["ema"].module)) <= 1e-7


def test_clip_grad_bounds_the_applied_gradient_norm():
    """--clip_grad 0.01 (far below this model's gradient norm): at every optimizer step the gradient the
    optimizer sees has norm 0.01 (at most, and within 1e-4 of it), while the logged norm is the unclipped one."""
    clip = 0.01
    batches = _batches(2, B=2, seed=8)
    run = _epoch(_engine_args(epochs=4, clip_grad=clip), batches, 1, 2)
    norms = [s["grad_norm"] for s in run["steps"]]
    assert len(norms) == 2
    assert all(n <= clip * (1 + 1e-5) for n in norms), f"applied gradient norms {norms} exceed --clip_grad {clip}"
    assert all(n >= clip * (1 - 1e-4) for n in norms), norms
    assert run["stats"]["grad_norm"] > 10 * clip


def test_amp_bf16_on_cpu_is_close_to_float32():
    """--amp bf16 on the CPU: the model runs in bfloat16 (its predictions are bf16) and two steps log losses
    within 0.5 % of float32's (bfloat16 keeps 8 significant bits, 0.4 % per rounding; measured: 0.06 %)."""
    batches = _batches(2, B=2, seed=9)
    args = _engine_args(epochs=4, weight_mask=True)
    f32 = _epoch(args, batches, 1, 2)
    bf16 = _epoch(args, batches, 1, 2, amp_dtype=torch.bfloat16)
    assert {o.dtype for o in f32["outputs"][0]} == {torch.float32}
    assert {o.dtype for o in bf16["outputs"][0]} == {torch.bfloat16}
    for key in ("loss", "pixel_loss", "feature_loss"):
        assert math.isfinite(bf16["stats"][key])
        assert bf16["stats"][key] == pytest.approx(f32["stats"][key], rel=5e-3), key


def test_weight_decay_end_moves_the_decayed_groups_along_the_cosine():
    """--weight_decay 0.05 --weight_decay_end 0.01 over 4 epochs of 2 steps: at the optimizer steps of epoch 1
    (global steps 2 and 3) the decayed groups have utils.cosine_scheduler's values, the others 0."""
    schedule = utils.cosine_scheduler(0.05, 0.01, 4, 2)
    assert 0.01 < schedule[3] < schedule[2] < 0.05   # the two steps differ from the start value and each other
    run = _epoch(_engine_args(epochs=4, weight_decay=0.05), _batches(2, B=2, seed=10), 1, 2, wd_end=0.01)
    assert run["decayed"] and run["undecayed"]
    assert len(run["steps"]) == 2
    for it, seen in zip((2, 3), run["steps"]):
        assert [seen["wd"][i] for i in run["decayed"]] == [pytest.approx(schedule[it], rel=1e-12)] * len(
            run["decayed"]), f"step {it}"
        assert [seen["wd"][i] for i in run["undecayed"]] == [0.0] * len(run["undecayed"])


def test_weight_decay_end_reaches_the_optimizer_of_a_cli_run(tmp_path):
    """run_pretraining.py --weight_decay 0.05 --weight_decay_end 0.01, 2 epochs of 2 steps (16 demo images,
    batch 8): the checkpoint's optimizer holds the cosine's last step, utils.cosine_scheduler(0.05, 0.01, 2,
    2)[3], in its decayed group and 0 in the other."""
    from test_pretraining_e2e import COMMON, _load, _ok, run_cli
    out = tmp_path / "run"
    _ok(run_cli(COMMON + ["--data_set", "demo", "--demo_size", "16", "--batch_size", "8", "--epochs", "2",
                          "--weight_decay", "0.05", "--weight_decay_end", "0.01", "--save_ckpt_freq", "0",
                          "--output_dir", str(out)]))
    last = utils.cosine_scheduler(0.05, 0.01, 2, 2)[3]
    assert last == pytest.approx(0.0158579, rel=1e-5)
    decays = sorted(g["weight_decay"] for g in _load(out / "checkpoint-last.pth")["optimizer"]["param_groups"])
    assert decays == [0.0, pytest.approx(last, rel=1e-12)]
