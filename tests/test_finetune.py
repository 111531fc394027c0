"""Fine-tuning: encoder transfer from release and own checkpoints, layer-wise lr decay, the entry point end to end
(one process, torchrun with two processes, DeepSpeed) and its one-line errors.

The end-to-end runs use bootmae_tiny_patch16_224 at 32 px in 4 px patches (pretrained at 16 px) on
an npz set of 10 training and 10 test images (10 classes), 2 steps of 4 per epoch, so each run takes seconds on a CPU.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoints  # noqa: E402
import datasets  # noqa: E402
import modeling_bootmae as mb  # noqa: E402
import run_class_finetuning as rcf  # noqa: E402
import utils  # noqa: E402
from engine_for_finetuning import evaluate  # noqa: E402
from optim_factory import adamw, finetune_param_groups, set_schedules  # noqa: E402
from shared_helpers import read_log  # noqa: E402

REF = os.path.join(ROOT, "tests", "data", "official_small_reference.pt")
SMALL = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=6)
ENCODER = ("patch_embed.", "cls_token", "blocks.")
NEW = ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
SCRIPT = os.path.join(ROOT, "run_class_finetuning.py")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread here and in the subprocesses: these models are tiny, and on a busy 2-core machine
    a second OpenMP thread that has to wait for a core makes every op up to 100x slower. The same thread
    count everywhere also keeps training-time and --eval numbers bitwise comparable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------
# encoder transfer

def test_release_checkpoint_transfers_every_encoder_tensor(tmp_path, capsys):
    release = torch.load(REF, weights_only=True)["student_state_dict"]
    path = tmp_path / "release.pth"
    torch.save({"model": release}, path)
    model = mb.VisionTransformerForClassification(**SMALL, num_classes=10)
    loaded, missing, unused = checkpoints.load_pretrained_encoder(model, str(path), "model")
    expected = sorted(k for k in release if k.startswith(ENCODER))
    assert sorted(loaded) == expected
    state = model.state_dict()
    for key in expected:
        assert torch.equal(state[key], release[key]), key
    assert sorted(missing) == NEW
    # mean pooling + fc_norm replaces the final norm (BEiT/MAE), so the release's norm goes unused
    assert sorted(unused) == ["norm.bias", "norm.weight"]
    out = capsys.readouterr().out
    assert "newly initialised (not in the checkpoint): fc_norm.weight, fc_norm.bias, head.weight, head.bias" in out
    # the new head: trunc-normal std 0.02 scaled by --init_scale 0.001, zero bias; fc_norm 1/0
    assert 0.5e-5 < model.head.weight.std().item() < 4e-5
    assert not model.head.bias.any() and bool((model.fc_norm.weight == 1).all())
    with pytest.raises(utils.UsageError, match="no 'model_ema' entry"):
        checkpoints.load_pretrained_encoder(model, str(path), "model_ema")


def test_own_pretraining_checkpoint_transfers_and_other_input_size(tmp_path):
    torch.manual_seed(0)
    pre = mb.BootMAE(img_size=16, patch_size=4, embed_dim=96, depth=4, num_heads=6, decoder_dim=64)
    ema = mb.BootMAE(img_size=16, patch_size=4, embed_dim=96, depth=4, num_heads=6, decoder_dim=64)
    # the layout run_pretraining.save_checkpoint writes
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": pre.state_dict(), "model_ema": ema.state_dict(), "optimizer": {}, "scaler": {},
                "epoch": 3, "args": argparse.Namespace(model="bootmae_small")}, path)
    for key, source in (("model", pre), ("model_ema", ema)):
        # pretrained on a 4x4 grid, fine-tuned on 8x8: the sin-cos table follows the input grid
        model = mb.VisionTransformerForClassification(**SMALL, num_classes=10).eval()
        loaded, missing, _ = checkpoints.load_pretrained_encoder(model, str(path), key)
        src = source.state_dict()
        assert sorted(loaded) == sorted(k for k in src if k.startswith(ENCODER))
        assert all(torch.equal(model.state_dict()[k], src[k]) for k in loaded)
        assert sorted(missing) == NEW
        assert torch.equal(model.pos_embed, mb.sincos_pos_embed_2d(96, 8, 8))
        source.eval()
        for size in (32, 48):
            x = torch.randn(2, 3, size, size)
            with torch.no_grad():
                _, blocks = source.forward_features(x, return_blocks=(3,))
                tokens = model.forward_features(x)
            torch.testing.assert_close(tokens, blocks[3], atol=1e-5, rtol=0)
            assert model(x).shape == (2, 10)


# ---------------------------------------------------------------------------------------------------------
# layer-wise lr decay

def test_layer_decay_scales_follow_the_rule():
    model = mb.bootmae_tiny_patch16_224(num_classes=10)  # L = 12 blocks
    groups = finetune_param_groups(model, 0.05, 0.6)
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    decay = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert set(scale) == {n for n, _ in model.named_parameters()}
    assert scale["patch_embed.proj.weight"] == pytest.approx(0.6 ** 13)
    assert scale["cls_token"] == pytest.approx(0.6 ** 13)
    assert scale["blocks.0.attn.qkv.weight"] == pytest.approx(0.6 ** 12)
    assert scale["blocks.11.mlp.fc2.weight"] == pytest.approx(0.6)
    assert scale["head.weight"] == scale["head.bias"] == scale["fc_norm.weight"] == 1.0
    assert decay["cls_token"] == decay["blocks.0.attn.q_bias"] == decay["blocks.0.norm1.weight"] == 0.0
    assert decay["head.bias"] == 0.0 and decay["head.weight"] == decay["blocks.0.attn.qkv.weight"] == 0.05
    # --backbone_decay scales the encoder only (the release's rule)
    groups = finetune_param_groups(model, 0.05, 0.6, backbone_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    assert scale["patch_embed.proj.weight"] == pytest.approx(0.5 * 0.6 ** 13)
    assert scale["blocks.11.norm2.bias"] == pytest.approx(0.5 * 0.6)
    assert scale["head.weight"] == 1.0
    # the training loop's step: scheduled lr x lr_scale, scheduled weight decay where it decays
    opt = adamw(groups, 1.0)
    set_schedules(opt, 2e-3, 0.04)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(2e-3 * g["lr_scale"])
        assert g["weight_decay"] in (0.0, 0.04)


# ---------------------------------------------------------------------------------------------------------
# end to end

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    rng = np.random.default_rng(0)
    data = root / "data"
    data.mkdir()
    for name, n in (("train", 10), ("test", 10)):
        labels = np.arange(n) % 10
        np.savez(data / f"{name}.npz", images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), labels=labels)
    torch.manual_seed(0)
    pre = mb.bootmae_tiny(img_size=16, patch_size=4)
    ckpt = root / "pretrain.pth"
    torch.save({"model": pre.state_dict(), "epoch": 0}, ckpt)
    return {"root": root, "data": str(data), "pretrain": str(ckpt)}


def _common(files, out, *extra):
    return ["--model", "bootmae_tiny_patch16_224", "--input_size", "32", "--patch_size", "4", "--data_set", "npz",
            "--data_path", files["data"], "--finetune", files["pretrain"], "--output_dir", str(out),
            "--batch_size", "4", "--num_workers", "0", "--lr", "1e-3", "--warmup_epochs", "1", "--layer_decay",
            "0.75", "--save_ckpt_freq", "0", "--print_freq", "1", *extra]


def _env(threads=1):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    # DeepSpeed builds a small communication extension on first use (about 55 s of compiler time); keep it beside the
    # virtual environment so later runs load it (the folder is ignored by git)
    if "TORCH_EXTENSIONS_DIR" not in env and os.access(sys.prefix, os.W_OK):
        env["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
    return env


def _run(args, threads=1, launcher=()):
    cmd = [sys.executable, *launcher, SCRIPT, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(threads), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _in_process(argv, capsys):
    """The entry point's ``main`` in this process (no interpreter start-up); returns what it printed."""
    capsys.readouterr()
    rcf.main(argparse.ArgumentParser(parents=[rcf.get_args_parser()]).parse_args(argv))
    return capsys.readouterr().out


def _eval(argv, capsys):
    """``--eval``: the results the entry point prints as its ``eval:`` line."""
    out = _in_process(argv, capsys)
    return json.loads(next(l for l in out.splitlines() if l.startswith("eval: "))[len("eval: "):])


def test_single_process_train_resume_and_eval(files, capsys):
    out = files["root"] / "single"
    flags = ["--mixup", "0.8", "--cutmix", "1.0", "--model_ema", "--model_ema_decay", "0.9"]
    _in_process(_common(files, out, "--epochs", "1", *flags), capsys)
    stdout = _in_process(_common(files, out, "--epochs", "2", *flags), capsys)  # auto-resume: checkpoint-last.pth
    assert "resume: continuing at epoch 1" in stdout and "moments restart" not in stdout
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1]
    assert log[-1]["test_num_images"] == 10
    written = os.listdir(out)
    assert {"checkpoint-best.pth", "checkpoint-last.pth", "log.txt"} <= set(written)
    assert any(name.startswith("events.out.tfevents") for name in written)
    best = checkpoints.load_checkpoint(str(out / "checkpoint-best.pth"))
    assert best["max_accuracy"] == max(max(r["test_acc1"], r["test_ema_acc1"]) for r in log)
    assert log[best["epoch"]]["max_accuracy"] == best["max_accuracy"]
    # --eval of the last checkpoint gives exactly the numbers logged at the end of training
    result = _eval(_common(files, out, "--eval", "--resume", str(out / "checkpoint-last.pth"), "--model_ema"),
                   capsys)
    for key in ("acc1", "acc5", "loss"):
        assert result[key] == log[-1][f"test_{key}"], key
        assert result[f"ema_{key}"] == log[-1][f"test_ema_{key}"], key


def test_compiled_training_matches_eager(files, capsys):
    # --compile (on by default for CUDA) trains the same model as the eager path
    logs = {}
    for name, flag in (("eager", "--no-compile"), ("compiled", "--compile")):
        out = files["root"] / name
        stdout = _in_process(_common(files, out, "--epochs", "1", "--seed", "3", flag), capsys)
        assert ("torch.compile: training forward compiled" in stdout) == (name == "compiled")
        logs[name] = read_log(out)[-1]
    assert logs["compiled"]["train_loss"] == pytest.approx(logs["eager"]["train_loss"], rel=1e-4)
    assert logs["compiled"]["test_loss"] == pytest.approx(logs["eager"]["test_loss"], rel=1e-4)


def test_error_compile_with_deepspeed(files, guarded_out, monkeypatch, capsys):
    err = _cli_error(monkeypatch, capsys, _common(files, guarded_out, "--enable_deepspeed", "--compile"))
    assert "--compile is not supported with --enable_deepspeed" in err


def test_torchrun_two_processes_and_sharded_eval(files):
    out = files["root"] / "torchrun"
    launcher = ("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(utils.free_port()))
    stdout = _run(_common(files, out, "--epochs", "1", "--batch_size", "2", "--dist_eval"), launcher=launcher)
    assert "distributed: 2 processes, backend gloo" in stdout
    (record,) = read_log(out)
    assert record["test_num_images"] == 10  # the shards hold each test image once
    # the checkpoint, evaluated in this single process, scores what the two shards scored together
    ckpt = checkpoints.load_checkpoint(str(out / "checkpoint-last.pth"))
    model = mb.bootmae_tiny_patch16_224(img_size=32, patch_size=4, num_classes=10)
    rcf.load_classifier(model, ckpt["model"], "checkpoint-last.pth")
    args = datasets.EvalDataConfig(data_set="npz", data_path=files["data"], input_size=32, crop_pct=1.0)
    val, _ = datasets.build_dataset(False, args)
    stats = evaluate(torch.utils.data.DataLoader(val, batch_size=5), model, torch.device("cpu"))
    assert (stats["acc1"], stats["acc5"]) == (record["test_acc1"], record["test_acc5"])
    assert stats["loss"] == pytest.approx(record["test_loss"], rel=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="DeepSpeed is not installed (pip install deepspeed)")
def test_deepspeed_zero1_bf16_train_resume_and_eval(files, capsys):
    out = files["root"] / "deepspeed"
    flags = ["--enable_deepspeed", "--zero_stage", "1", "--amp", "bf16", "--model_ema", "--model_ema_decay", "0.9",
             "--smoothing", "0.1"]
    stdout = _run(_common(files, out, "--epochs", "1", *flags))
    assert "DeepSpeed: ZeRO stage 1, bf16" in stdout
    stdout = _run(_common(files, out, "--epochs", "2", *flags))
    assert "resume: DeepSpeed state from" in stdout and "resume: continuing at epoch 1" in stdout
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1]
    # the lr_scale of every group reached DeepSpeed's optimizer: the patch embedding's lr is 0.75^13 x the head's
    assert log[-1]["train_min_lr"] == pytest.approx(log[-1]["train_lr"] * 0.75 ** 13)
    best_epoch = checkpoints.load_checkpoint(str(out / "checkpoint-last.pth"))["best_epoch"]
    assert sorted(os.listdir(out / "deepspeed")) == sorted(
        {f"epoch-{e}" for e in (1, best_epoch)} | {"latest", "zero_to_fp32.py", "zero_to_torch.py"})
    # the plain checkpoint holds the fp32 weights; --eval in the engine's precision reproduces the log exactly
    result = _eval(_common(files, out, "--eval", "--resume", str(out / "checkpoint-last.pth"), "--model_ema",
                           "--enable_deepspeed", "--amp", "bf16"), capsys)
    for key in ("acc1", "acc5", "loss"):
        assert result[key] == log[-1][f"test_{key}"], key
        assert result[f"ema_{key}"] == log[-1][f"test_ema_{key}"], key


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="DeepSpeed is not installed (pip install deepspeed)")
def test_deepspeed_fp32_zero0_logs_the_gradient_norm(files):
    # fp32 without ZeRO, the CPU default: DeepSpeed's engine computes no norm there (the lines said nan)
    out = files["root"] / "deepspeed_fp32"
    stdout = _run(_common(files, out, "--epochs", "1", "--enable_deepspeed", "--amp", "none"))
    assert "DeepSpeed: ZeRO stage 0, fp32" in stdout
    norms = [float(line.split("grad_norm ")[1].split()[0]) for line in stdout.splitlines() if "grad_norm " in line]
    assert len(norms) == 2 and all(0 < n < 1e3 for n in norms), norms
    (record,) = read_log(out)
    assert record["train_grad_norm"] == pytest.approx(sum(norms) / 2, abs=1e-3)


# ---------------------------------------------------------------------------------------------------------
# bad input: one line on stderr, exit status 2, nothing written

def _cli_error(monkeypatch, capsys, argv):
    monkeypatch.setattr(sys, "argv", ["run_class_finetuning.py", *argv])
    with pytest.raises(SystemExit) as exc:
        rcf.cli()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.fixture
def guarded_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "log.txt").write_text("earlier run\n")
    yield out
    assert os.listdir(out) == ["log.txt"] and (out / "log.txt").read_text() == "earlier run\n"


def test_error_checkpoint_without_encoder(files, guarded_out, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "not_an_encoder.pth"
    torch.save({"model": {"decoder.weight": torch.zeros(3)}}, bad)
    argv = _common(files, guarded_out)
    argv[argv.index("--finetune") + 1] = str(bad)
    err = _cli_error(monkeypatch, capsys, argv)
    assert "holds no encoder tensors" in err and str(bad) in err


def test_error_nb_classes_below_the_data(files, guarded_out, monkeypatch, capsys):
    err = _cli_error(monkeypatch, capsys, _common(files, guarded_out, "--nb_classes", "5"))
    assert "--nb_classes 5 is too small" in err and "training set" in err and "labels 0..9" in err


def test_more_classes_than_the_data_is_allowed():
    args = argparse.Namespace(nb_classes=12, data_set="npz")
    rcf.check_nb_classes(args, [("training", 10), ("validation", 10)])
    assert args.nb_classes == 12


def test_error_missing_finetune_file(files, guarded_out):
    argv = _common(files, guarded_out)
    argv[argv.index("--finetune") + 1] = str(guarded_out / "missing.pth")
    # a real process: nothing but the one line may reach stderr
    proc = subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True, env=_env(), cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: --finetune {guarded_out / 'missing.pth'} does not exist; give the path of a checkpoint (.pth) file"]
