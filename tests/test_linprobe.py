"""Linear probing (main_linprobe.py): LARS semantics, the frozen encoder, single-process and torchrun runs
whose --eval reproduces the logged accuracy, and bad input. Tiny encoder at 32 px (2x2 patches of 16 px)
on a 4-class npz data set made here, so every run takes seconds."""
import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoints  # noqa: E402
import engine_for_linprobe  # noqa: E402
import main_linprobe  # noqa: E402
import modeling_bootmae  # noqa: E402
import utils  # noqa: E402
from pretrained import parse_model_size  # noqa: E402
from shared_helpers import clean_env, read_log  # noqa: E402

COLORS = np.array([[220, 30, 30], [30, 200, 40], [40, 40, 220], [230, 220, 40]])


def make_npz(folder, n_train=64, n_test=32, seed=0):
    """Four colour classes with pixel noise, 40 px images (train.npz / test.npz, as datasets.NpzImages reads)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 4
        images = COLORS[labels][:, None, None, :] + rng.integers(-40, 40, (n, 40, 40, 3))
        np.savez(os.path.join(folder, f"{split}.npz"), images=np.clip(images, 0, 255).astype(np.uint8),
                 labels=labels)


def make_pretrained(path, seed=0):
    """A bootmae_tiny pretraining checkpoint (random weights, q/v biases non-zero) in our layout."""
    torch.manual_seed(seed)
    model = modeling_bootmae.bootmae_tiny(img_size=32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save({"model": model.state_dict(), "epoch": 0, "args": argparse.Namespace(input_size=32)}, path)
    return model


@pytest.fixture(scope="module")
def probe_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("linprobe")
    make_npz(str(root))
    make_pretrained(str(root / "pretrained.pth"))
    return root


def common(root, *extra):
    return ["--model", "bootmae_tiny_patch16_224", "--data_set", "npz", "--data_path", str(root),
            "--input_size", "32", "--num_workers", "0", "--print_freq", "2", *extra]


def parse(argv):
    return main_linprobe.get_args_parser().parse_args(argv)


def test_model_names():
    assert parse_model_size("base_patch16_224") == "base"  # the release's linear-probe name
    assert parse_model_size("bootmae_large_patch16_224") == "large"
    assert parse_model_size("bootmae_huge_patch14_224") == "huge"
    assert parse_model_size("bootmae_tiny") == "tiny"
    with pytest.raises(utils.UsageError):
        parse_model_size("resnet50")


def test_lars_is_maes_lars():
    """Three steps of build_optimizer's timm Lars equal MAE's LARS written out: 2-D tensors scaled by the
    trust ratio 0.001 ||w|| / ||g||, 1-D tensors plain momentum SGD, momentum 0.9 from a zero buffer."""
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(8, affine=False), torch.nn.Linear(8, 5))
    torch.nn.init.normal_(head[1].bias)
    ref = [p.detach().clone() for p in head.parameters()]
    mu = [torch.zeros_like(p) for p in ref]
    args = argparse.Namespace(lr=0.7, weight_decay=0.0, momentum=0.9)
    opt = engine_for_linprobe.build_optimizer(head, args)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in ref]
        for p, g in zip(head.parameters(), grads):
            p.grad = g.clone()
        opt.step()
        for i, (w, g) in enumerate(zip(ref, grads)):
            if w.ndim > 1:
                g = g * (0.001 * w.norm() / g.norm())
            mu[i] = 0.9 * mu[i] + g
            ref[i] = w - args.lr * mu[i]
    for p, r in zip(head.parameters(), ref):
        torch.testing.assert_close(p.detach(), r, rtol=1e-6, atol=1e-7)


def test_encoder_stays_frozen(probe_data):
    """After a probe epoch every encoder tensor is bit-identical and has no gradient; the Linear and the BN
    statistics changed; fc_norm keeps its fixed unit scale / zero shift."""
    args = parse(common(probe_data, "--finetune", str(probe_data / "pretrained.pth"), "--global_pool",
                        "--depth", "6", "--batch_size", "16", "--epochs", "1", "--warmup_epochs", "0", "--lr", "5"))
    main_linprobe.check_args(args)
    args.distributed = False
    from datasets import build_dataset
    train_set, nb = build_dataset(True, args, transform=engine_for_linprobe.build_train_transform(args))
    loader = torch.utils.data.DataLoader(train_set, batch_size=16, shuffle=True, drop_last=True)
    model = engine_for_linprobe.build_probe(args, nb)
    engine_for_linprobe.load_probe_encoder(model, args.finetune, args.model_key)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = engine_for_linprobe.build_optimizer(model.head, args)
    engine_for_linprobe.train_one_epoch(model, model.head, loader, optimizer, torch.device("cpu"), 0, args, None)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.0.running_mean", "head.0.running_var", "head.0.num_batches_tracked",
                       "head.1.weight", "head.1.bias"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.1.weight", "head.1.bias"}
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("head."))
    assert len(model.blocks) == 6
    assert torch.equal(after["fc_norm.weight"], torch.ones(192)) and torch.equal(after["fc_norm.bias"], torch.zeros(192))


def test_single_process_then_eval_reproduces(probe_data, tmp_path):
    out = tmp_path / "probe"
    args = parse(common(probe_data, "--finetune", str(probe_data / "pretrained.pth"), "--global_pool", "--depth", "6",
                        "--batch_size", "16", "--epochs", "2", "--warmup_epochs", "1", "--lr", "10",
                        "--output_dir", str(out)))
    main_linprobe.main(args)
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1]
    assert all(0 <= r["test_acc1"] <= r["test_acc5"] <= 100 and r["test_n"] == 32 for r in log)
    ckpt = checkpoints.load_checkpoint(str(out / "checkpoint-last.pth"))
    # only what trains: the head's Linear and BN statistics, plus optimizer, epoch, args
    assert set(ckpt["model"]) == {"head.0.running_mean", "head.0.running_var", "head.0.num_batches_tracked",
                                  "head.1.weight", "head.1.bias"}
    assert ckpt["epoch"] == 1 and "optimizer" in ckpt and (out / "checkpoint-best.pth").is_file()
    # --eval takes depth, pooling and the encoder path from the checkpoint's args
    stats = main_linprobe.main(parse(common(probe_data, "--eval", "--resume", str(out / "checkpoint-last.pth"),
                                            "--batch_size", "5")))
    assert stats["acc1"] == log[-1]["test_acc1"] and stats["acc5"] == log[-1]["test_acc5"]


def test_torchrun_two_processes_then_eval_reproduces(probe_data, tmp_path):
    """gloo DDP over the head, gradient accumulation, cls-token pooling, sharded evaluation; a single-process
    --eval of its checkpoint gives the logged accuracy exactly."""
    out = tmp_path / "probe2"
    port = str(utils.free_port())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           "main_linprobe.py", *common(probe_data, "--finetune", str(probe_data / "pretrained.pth"), "--depth", "4",
                                       "--batch_size", "8", "--accum_iter", "2", "--epochs", "2",
                                       "--warmup_epochs", "1", "--lr", "10", "--dist_eval", "--output_dir", str(out))]
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(OMP_NUM_THREADS=1), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "distributed: 2 processes, backend gloo" in proc.stdout
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1] and log[-1]["test_n"] == 32
    stats = main_linprobe.main(parse(common(probe_data, "--eval", "--resume", str(out / "checkpoint-last.pth"),
                                            "--batch_size", "32")))
    assert stats["acc1"] == log[-1]["test_acc1"] and stats["acc5"] == log[-1]["test_acc5"]


@pytest.mark.parametrize("case", ["depth", "no_encoder", "missing_finetune"])
def test_bad_input_one_line_exit_2(probe_data, tmp_path, monkeypatch, capsys, case):
    out = tmp_path / "out"
    out.mkdir()
    (out / "log.txt").write_text("previous run\n")
    finetune = str(probe_data / "pretrained.pth")
    depth = "6"
    if case == "depth":
        depth = "13"  # bootmae_tiny has 12 blocks
    elif case == "no_encoder":
        finetune = str(tmp_path / "decoder_only.pth")
        torch.save({"model": {"pixel_decoder.norm.weight": torch.ones(4)}}, finetune)
    else:
        finetune = str(tmp_path / "missing.pth")
    argv = common(probe_data, "--finetune", finetune, "--depth", depth, "--output_dir", str(out), "--epochs", "1",
                  "--batch_size", "16")
    monkeypatch.setattr(sys, "argv", ["main_linprobe.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main_linprobe.cli()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    expected = {"depth": "--depth 13", "no_encoder": "no encoder tensors", "missing_finetune": "does not exist"}[case]
    assert expected in err[0]
    assert sorted(os.listdir(out)) == ["log.txt"] and (out / "log.txt").read_text() == "previous run\n"
