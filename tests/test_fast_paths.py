"""The fast paths compute what the plain paths compute (float32, CPU), and the benchmark runs.

plain = the release's style: explicit softmax attention, per-tensor EMA, for-loop AdamW, eager mode.
fast  = the defaults: ``F.scaled_dot_product_attention``, timm's foreach EMA, fused AdamW, torch.compile.
"""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3

import modeling_bootmae as mb
from engine_for_pretraining import bootmae_loss
from masking_generator import build_masking_generator
from optim_factory import adamw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(depth=2):
    torch.manual_seed(0)
    model = mb.BootMAE(img_size=32, patch_size=8, embed_dim=48, depth=depth, num_heads=3, decoder_dim=40,
                       decoder_depth=1, context_blocks=(0, -1))
    with torch.no_grad():  # move every tensor away from its initial value so each one matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _batch(model, batch=4):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, 32, 32, generator=g)
    gen = build_masking_generator("release", (4, 4), 12, 10, 2, 6, rng=np.random.default_rng(0))
    mask = torch.stack([torch.from_numpy(gen()).flatten() for _ in range(batch)])
    return images, mask


def _loss_and_grads(model, teacher, images, mask, fused):
    model.zero_grad()
    with mb.fused_attention(fused):
        target = teacher.target_features(images)
        pixel_pred, feature_pred = model(images, mask)
    pixel, feature = bootmae_loss(pixel_pred, feature_pred, target, images, mask, 8, weight_mask=True)
    (pixel + feature).backward()
    return pixel.detach(), feature.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(a, b):
    pa, fa, ga = a
    pb, fb, gb = b
    assert abs(pa - pb) < 1e-5 and abs(fa - fb) < 1e-5
    for name in ga:
        scale = gb[name].abs().max().clamp(min=1e-12)
        assert ((ga[name] - gb[name]).abs().max() / scale) < 1e-4, name


def test_sdpa_matches_explicit_softmax():
    model = _tiny()
    teacher = copy.deepcopy(model).eval()
    images, mask = _batch(model)
    plain = _loss_and_grads(model, teacher, images, mask, fused=False)
    fast = _loss_and_grads(model, teacher, images, mask, fused=True)
    _assert_same(fast, plain)
    assert plain[1] > 0 and any(g.abs().sum() > 0 for g in plain[2].values())


@pytest.mark.parametrize("head_dim,kv_len", [(42, 17), (42, 5), (64, 17)])
def test_padded_attention_matches_explicit_softmax(head_dim, kv_len):
    # the path GPUs take for head dims that are not multiples of 8 (the release's pixel decoder has 42)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, head_dim, dtype=torch.float64, requires_grad=True) for n in (17, kv_len, kv_len))
    padded = mb.padded_attention(q, k, v)
    with mb.fused_attention(False):
        plain = mb.attention(q, k, v)
    assert padded.shape == plain.shape == (2, 3, 17, head_dim)
    torch.testing.assert_close(padded, plain, rtol=1e-10, atol=1e-10)
    grads_padded = torch.autograd.grad(padded.square().sum(), (q, k, v))
    grads_plain = torch.autograd.grad(plain.square().sum(), (q, k, v))
    for a, b in zip(grads_padded, grads_plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_cpu_bf16_attention_matches_float64_sdpa():
    # bf16 on CPU takes two bf16 matrix products around a float32 softmax instead of the CPU flash kernel
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 3, n, 64, dtype=torch.float64) for n in (17, 65, 65))
    exact = F.scaled_dot_product_attention(q, k, v)
    low = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    out = mb.attention(*low)
    assert out.dtype == torch.bfloat16 and out.shape == exact.shape
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=3e-2)
    assert (out.double() - exact).abs().mean() < 3e-3  # bf16 rounding, not a different attention
    grads = torch.autograd.grad(out.float().square().sum(), low)
    exact_grads = torch.autograd.grad(
        F.scaled_dot_product_attention(*(t.requires_grad_() for t in (q, k, v))).square().sum(), (q, k, v))
    for g, e in zip(grads, exact_grads):
        assert (g.double() - e).norm() / e.norm() < 2e-2
    # float32 on CPU stays on SDPA itself
    q32, k32, v32 = (t.float() for t in (q, k, v))
    assert torch.equal(mb.attention(q32, k32, v32), F.scaled_dot_product_attention(q32, k32, v32))


def test_fused_adamw_matches_default_adamw():
    models = [_tiny(), _tiny()]
    images, mask = _batch(models[0])
    opts = [adamw([{"params": list(m.parameters()), "weight_decay": 0.05}], 1e-3, (0.9, 0.95), fused=f)
            for m, f in zip(models, (True, False))]
    assert opts[0].defaults["fused"] and not opts[1].defaults.get("fused")
    for _ in range(3):
        for m, opt in zip(models, opts):
            opt.zero_grad()
            p, f = bootmae_loss(*m(images, mask), None, images, mask, 8)
            p.backward()
            opt.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_foreach_ema_matches_per_tensor_update():
    model = _tiny()
    ema = ModelEmaV3(model, decay=0.99)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        ema.decay = 0.99 + 0.003 * step
        ema.update(model)
        for k, v in model.state_dict().items():  # the release's update
            reference[k] = reference[k] * ema.decay + (1 - ema.decay) * v
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v, reference[k], rtol=1e-6, atol=1e-6, msg=k)


def test_compiled_model_matches_eager():
    model = _tiny(depth=1)
    teacher = copy.deepcopy(model).eval()
    images, mask = _batch(model)
    eager = _loss_and_grads(model, teacher, images, mask, fused=True)
    compiled_model = torch.compile(model)
    compiled_teacher = torch.compile(teacher.target_features)
    model.zero_grad()
    target = compiled_teacher(images)
    pixel_pred, feature_pred = compiled_model(images, mask, 12)
    pixel, feature = bootmae_loss(pixel_pred, feature_pred, target, images, mask, 8, weight_mask=True)
    (pixel + feature).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    _assert_same((pixel.detach(), feature.detach(), grads), eager)


def test_activation_checkpointing_matches():
    model = _tiny()
    teacher = copy.deepcopy(model).eval()
    images, mask = _batch(model)
    plain = _loss_and_grads(model, teacher, images, mask, fused=True)
    model.set_grad_checkpointing(True)
    checkpointed = _loss_and_grads(model, teacher, images, mask, fused=True)
    _assert_same(checkpointed, plain)


@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_benchmark_runs_on_cpu(task):
    cmd = [sys.executable, "benchmarks/bench_pretrain.py", "--task", task, "--model", "bootmae_tiny",
           "--input_size", "32", "--patch_size", "8", "--batch_size", "2", "--path", "fast", "plain",
           "--warmup", "1", "--steps", "1", "--repeats", "2", "--check_flops", "--peak_tflops", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["path"] for r in rows] == ["fast", "plain"]
    for r in rows:
        assert r["images_per_s"] > 0 and r["repeats"] == 2 and 0 < r["mfu"] < 1
        # analytic FLOPs agree with torch's counter on the plain path (explicit matmuls)
        if r["path"] == "plain":
            assert abs(r["gflops_per_image"] - r["gflops_per_image_flop_counter"]) < 0.02 * r["gflops_per_image"]
    assert "speed-up fast / plain" in out.stdout
