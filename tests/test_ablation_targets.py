"""The target encoders of the ablations: MAE-K, EMA-MAE and MAE-new change exactly when and how they should,
the feature loss on a fraction of the patches, MAE's checkpoint as a fixed target, and their state makes a
resume exact.

Models are tiny (32 px images in 8 px patches, tests/test_ablations.py's flags and helpers) and run in-process
on the CPU.
"""
import pytest
import torch

import checkpoints
import modeling_bootmae as mb
import run_pretraining
import utils
from engine_for_pretraining import feature_loss, loss_weights, sample_target_patches, train_one_epoch
from optim_factory import create_optimizer
from target_encoders import EpochEmaTarget, KEpochTarget, build_target_encoder
from test_ablations import SMALL, batches, mae_checkpoint, one_thread, parse, schedules  # noqa: F401 (fixtures)


def _strategy_args(**kw):
    a = parse(["--model", "bootmae_tiny"] + SMALL + ["--epochs", "6", "--feature_ramp", "0"] +
              [x for k, v in kw.items() for x in (f"--{k}", str(v))])
    return a


def _tiny_model():
    torch.manual_seed(0)
    return mb.BootMAE(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_dim=16, decoder_depth=1)


def _encoder_state(model):
    return {k: v.detach().clone() for k, v in model.encoder_state_dict().items()}


def _run_epochs(args, model, targets, epochs, snapshot):
    """Trains ``epochs`` (2 steps each), returning the online encoder at the start and end of every epoch and
    the target's state at every feature computation."""
    optimizer = create_optimizer(args, model)
    lr, wd = schedules(args, 2)
    starts, ends = {}, {}
    for epoch in epochs:
        starts[epoch] = _encoder_state(model)
        seen = []
        fn_holder = targets
        fn = fn_holder.net.target_features

        def recorder(images, ids=None, fn=fn, seen=seen):
            seen.append(snapshot())
            return fn(images, ids)
        fn_holder.target_fn = recorder
        train_one_epoch(model, targets, batches(args, 2, seed=epoch), optimizer, utils.LossScaler("cpu", False),
                        torch.device("cpu"), epoch, lr, wd, args)
        ends[epoch] = _encoder_state(model)
        yield epoch, starts, ends, seen


def _close(a, b, atol=1e-6):
    return all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


def test_k_epoch_target_changes_only_at_multiples_of_k():
    """MAE-K, K = 2: the target during epoch e is the online encoder as it was at the start of epoch
    2 * floor(e / 2), the same at every step of the epoch."""
    args = _strategy_args(pixel_weight=0, target_encoder="k_epoch", target_k=2)
    model = _tiny_model()
    targets = KEpochTarget(model, 2)
    assert not targets.ready
    for epoch, starts, ends, seen in _run_epochs(args, model, targets, range(5), lambda: _encoder_state(targets.net)):
        expected = starts[2 * (epoch // 2)]
        assert len(seen) == 2 and all(_close(s, expected, 0) for s in seen), epoch
        assert _close(targets.net.state_dict(), expected, 0)
        if epoch % 2 == 1:   # the online encoder moved, the target did not
            assert not _close(expected, ends[epoch], 1e-4)


def test_epoch_ema_target_follows_the_formula_once_per_epoch_after_warmup():
    """EMA-MAE, WSE = 2, tau = 0.25: no target during the warm-up; at the start of epoch 2 a copy of the online
    encoder; after every epoch e >= 2, target = (1 - tau) target + tau online(end of e), by hand, per tensor;
    unchanged within an epoch."""
    tau = 0.25
    args = _strategy_args(pixel_weight=0, target_encoder="epoch_ema", target_tau=tau, pixel_warmup_epochs=2)
    model = _tiny_model()
    targets = EpochEmaTarget(model, tau)
    expected = None
    for epoch, starts, ends, seen in _run_epochs(args, model, targets, range(5), lambda: _encoder_state(targets.net)):
        if epoch < 2:
            assert seen == [] and not targets.ready
            continue
        if epoch == 2:
            expected = starts[2]
        assert len(seen) == 2 and all(_close(s, expected, 0) for s in seen), epoch
        expected = {k: (1 - tau) * expected[k] + tau * ends[epoch][k] for k in expected}
        assert _close(targets.net.state_dict(), expected), epoch


def test_mae_new_loss_is_fast_plus_lambda_slow():
    """MAE-new: one prediction, two targets; the feature loss is L_fast + 0.2 L_slow."""
    args = _strategy_args(pixel_weight=0, target_encoder="mae_new", target_k=5, slow_weight=0.2)
    model = _tiny_model()
    targets = build_target_encoder(args, model)
    targets.begin_epoch(1, model)
    with torch.no_grad():   # make the two targets differ
        for p in targets.slow.net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    images, mask = batches(args, 1)[0]
    model.eval()
    with torch.no_grad():
        _, pred = model(images, mask, pixel=False)
        weight = loss_weights(mask, (4, 4))
        fast = feature_loss(pred, targets.fast.net.target_features(images), weight)
        slow = feature_loss(pred, targets.slow.net.target_features(images), weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    lr = [0.0] * 12
    stats = train_one_epoch(model, targets, [(images, mask)], optimizer, utils.LossScaler("cpu", False),
                            torch.device("cpu"), 1, lr, lr, args)
    assert abs(fast - slow) > 1e-3
    assert stats["feature_loss"] == pytest.approx((fast + 0.2 * slow).item(), rel=1e-5)


def test_target_fraction_draws_masked_patches_from_the_global_rng():
    mask = torch.zeros(3, 16, dtype=torch.bool)
    for b in range(3):
        mask[b, torch.randperm(16)[:12]] = True
    torch.manual_seed(5)
    a = sample_target_patches(mask, 12, 4)
    torch.manual_seed(5)
    b = sample_target_patches(mask, 12, 4)
    assert torch.equal(a, b) and a.shape == (3, 4)
    assert all(mask[i, a[i]].all() and len(set(a[i].tolist())) == 4 for i in range(3))
    assert not torch.equal(a, sample_target_patches(mask, 12, 4))   # a new draw every step
    # all the masked patches, in patch order, at the mask ratio
    assert torch.equal(sample_target_patches(mask, 12, 12), torch.stack([m.nonzero().flatten() for m in mask]))


def test_feature_loss_on_a_subset_is_the_loss_of_those_patches():
    g = torch.Generator().manual_seed(0)
    pred, full = torch.randn(2, 16, 8, generator=g), torch.randn(2, 16, 8, generator=g)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 4:] = True
    ids = torch.tensor([[4, 9, 15], [5, 6, 7]])
    weight = loss_weights(mask, (4, 4))
    sub = feature_loss(pred, torch.gather(full, 1, ids[..., None].expand(-1, -1, 8)), weight, ids)
    only = torch.zeros_like(mask)
    only.scatter_(1, ids, True)
    assert sub.item() == pytest.approx(feature_loss(pred, full, only.float()).item(), rel=1e-6)


def test_mae_checkpoint_as_fixed_target(mae_checkpoint):
    """MAE's layout loads: q and v biases from its qkv bias (the key bias changes no output) and its own
    position table."""
    path, state = mae_checkpoint
    args = parse(["--model", "bootmae_tiny"] + SMALL + ["--pixel_weight", "0", "--target_encoder", "fixed",
                                                        "--target_checkpoint", path])
    model = run_pretraining.build_model(args)
    net = run_pretraining.load_fixed_target(args, model)
    assert torch.equal(net.pos_embed, state["pos_embed"])
    q, k, v = state["blocks.3.attn.qkv.bias"].chunk(3)
    assert torch.equal(net.blocks[3].attn.q_bias, q) and torch.equal(net.blocks[3].attn.v_bias, v)
    # a full-bias attention (MAE's) gives the same output: the key bias shifts each query's logits equally
    attn = net.blocks[3].attn
    x = torch.randn(2, 17, 32)
    qkv = torch.nn.functional.linear(x, attn.qkv.weight, state["blocks.3.attn.qkv.bias"]).reshape(2, 17, 3, 2, 16)
    qq, kk, vv = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    ref = torch.softmax(qq @ kk.transpose(-1, -2) / 4.0, -1) @ vv
    ref = attn.proj(ref.transpose(1, 2).reshape(2, 17, 32))
    with torch.no_grad():
        torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in net.parameters())


# ------------------------------------------------------------------------------------ resume and checkpoints

def _train_and_save(args, model, targets, epochs, out, optimizer, scaler):
    lr, wd = schedules(args, 2)
    for epoch in epochs:
        utils.seed_everything(args.seed + 1000003 * epoch)
        train_one_epoch(model, targets, batches(args, 2, seed=epoch), optimizer, scaler, torch.device("cpu"), epoch,
                        lr, wd, args)
        run_pretraining.save_checkpoint(args, epoch, model, targets, optimizer, scaler)


def test_target_encoder_state_resumes_exactly(tmp_path):
    """MAE-new (both an epoch-EMA and a K-epoch target) with a pixel warm-up and half the image for the
    targets: stopping after epoch 2 and resuming gives, bit for bit, the uninterrupted run's model, targets
    and optimizer."""
    flags = dict(pixel_weight=0.5, target_encoder="mae_new", target_k=2, target_tau=0.3, pixel_warmup_epochs=1,
                 target_fraction=0.5, save_ckpt_freq=1)
    results = []
    for stop in (None, 2):
        out = tmp_path / f"run_{stop}"
        out.mkdir()
        args = _strategy_args(output_dir=out, epochs=5, **flags)
        model = _tiny_model()
        targets = build_target_encoder(args, model)
        optimizer, scaler = create_optimizer(args, model), utils.LossScaler("cpu", False)
        if stop is None:
            _train_and_save(args, model, targets, range(5), str(out), optimizer, scaler)
        else:
            _train_and_save(args, model, targets, range(stop + 1), str(out), optimizer, scaler)
            torch.manual_seed(99)   # a different model, replaced by the checkpoint
            model = mb.BootMAE(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_dim=16,
                               decoder_depth=1)
            model.default_cfg_name = "tiny test model"
            targets = build_target_encoder(args, model)
            optimizer = create_optimizer(args, model)
            args.resume = str(out / f"checkpoint-{stop}.pth")
            start = run_pretraining.resume(args, model, targets, optimizer, scaler)
            assert start == stop + 1
            _train_and_save(args, model, targets, range(start, 5), str(out), optimizer, scaler)
        results.append(checkpoints.load_checkpoint(str(out / "checkpoint-last.pth")))
    a, b = results
    assert a["target_encoder"]["kind"] == "mae_new" and "model_ema" not in a
    for key in ("fast", "slow"):
        sa, sb = a["target_encoder"]["state"][key], b["target_encoder"]["state"][key]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), key
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)


def test_default_checkpoint_keeps_the_release_layout(tmp_path):
    args = _strategy_args(output_dir=tmp_path, epochs=2)
    model = _tiny_model()
    targets = build_target_encoder(args, model)
    run_pretraining.save_checkpoint(args, 1, model, targets, create_optimizer(args, model),
                                    utils.LossScaler("cpu", False))
    ckpt = checkpoints.load_checkpoint(str(tmp_path / "checkpoint-last.pth"))
    assert set(ckpt) == {"model", "model_ema", "optimizer", "scaler", "epoch", "args"}
    assert ckpt["model_ema"].keys() == ckpt["model"].keys()


def test_resume_refuses_another_target_encoder(tmp_path):
    args = _strategy_args(output_dir=tmp_path, pixel_weight=0, target_encoder="k_epoch")
    model = _tiny_model()
    model.default_cfg_name = "tiny"
    targets = build_target_encoder(args, model)
    opt = create_optimizer(args, model)
    run_pretraining.save_checkpoint(args, 0, model, targets, opt, utils.LossScaler("cpu", False))
    args.resume = str(tmp_path / "checkpoint-last.pth")
    with pytest.raises(utils.UsageError, match="trained with --target_encoder k_epoch, not epoch_ema"):
        run_pretraining.resume(args, model, EpochEmaTarget(model, 0.1), opt, utils.LossScaler("cpu", False))
