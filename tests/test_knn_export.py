"""kNN evaluation (eval_knn.py and run_pretraining.py --knn_freq) and the timm export (export_timm.py)."""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import eval_knn  # noqa: E402
import export_timm  # noqa: E402
import knn  # noqa: E402
import modeling_bootmae  # noqa: E402
import utils  # noqa: E402
from shared_helpers import clean_env, read_log  # noqa: E402


def perturbed(model, seed=0):
    """Random non-trivial weights everywhere (q/v biases, norms, cls token), so nothing matches by accident."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# kNN core on constructed features

def test_knn_classify_known_answers():
    # three classes on orthogonal axes; each test point sits on its class's axis -> all right
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(3, 8)
    train_l = torch.arange(30) % 3
    train_f = F.normalize(centres[train_l] + 0.05 * torch.randn(30, 8, generator=gen), dim=1)
    test_l = torch.tensor([0, 1, 2, 0])
    test_f = F.normalize(centres[test_l] + 0.05 * torch.randn(4, 8, generator=gen), dim=1)
    assert knn.knn_classify(train_f, train_l, test_f, test_l, k=5, temperature=0.07) == (100.0, 100.0)
    # the same points labelled with the next class: top-1 wrong everywhere, but within the top 2 classes
    # (only classes among the neighbours are ranked: top-5 counts min(5, k, classes) = 2 predictions here)
    top1, top5 = knn.knn_classify(train_f, train_l, test_f, (test_l + 1) % 3, k=2, temperature=0.07)
    assert top1 == 0.0

    # weighting: one neighbour of class 1 at cosine 0.9 against two of class 0 at cosine 0.6.
    # T = 0.07: exp(0.9/T) > 2 exp(0.6/T) -> class 1 wins; T = 10: votes ~ 1 each -> the majority, class 0
    q = torch.tensor([[1.0, 0.0]])
    bank = torch.tensor([[0.9, (1 - 0.81) ** 0.5], [0.6, 0.8], [0.6, -0.8]])
    labels = torch.tensor([1, 0, 0])
    assert knn.knn_classify(bank, labels, q, torch.tensor([1]), k=3, temperature=0.07)[0] == 100.0
    assert knn.knn_classify(bank, labels, q, torch.tensor([0]), k=3, temperature=10.0)[0] == 100.0
    # chunking does not change anything
    a = knn.knn_classify(train_f, train_l, test_f, test_l, k=7, temperature=0.1, chunk_size=1)
    b = knn.knn_classify(train_f, train_l, test_f, test_l, k=7, temperature=0.1)
    assert a == b


def test_shard_sampler_partitions():
    ds = list(range(11))
    shards = [list(utils.ShardSampler(ds, num_replicas=3, rank=r)) for r in range(3)]
    assert sorted(sum(shards, [])) == ds and [len(s) for s in shards] == [4, 4, 3]
    # the row-major (row, rank) read that gather_shards does, on the padded shards
    padded = torch.tensor([s + [-1] * (4 - len(s)) for s in shards])
    assert padded.T.flatten()[:11].tolist() == ds


# ---------------------------------------------------------------------------------------------------------
# kNN end to end

@pytest.fixture(scope="module")
def knn_data(tmp_path_factory):
    """Noise images with random labels (an accuracy well away from 0 and 100, so a feature/label mix-up in the
    gathering would show) in odd-sized splits (uneven shards over two processes), and a tiny checkpoint."""
    root = tmp_path_factory.mktemp("knn")
    rng = np.random.default_rng(1)
    for split, n in (("train", 63), ("test", 31)):
        np.savez(root / f"{split}.npz", images=rng.integers(0, 256, (n, 36, 36, 3), dtype=np.uint8),
                 labels=rng.integers(0, 4, n))
    torch.manual_seed(0)
    model = perturbed(modeling_bootmae.bootmae_tiny(img_size=32, decoder_dim=64, decoder_depth=1))
    torch.save({"model": model.state_dict(), "model_ema": model.state_dict()}, root / "pre.pth")
    return root


def knn_argv(root, *extra):
    return ["--model", "bootmae_tiny", "--checkpoint", str(root / "pre.pth"), "--data_set", "npz",
            "--data_path", str(root), "--input_size", "32", "--num_workers", "0", "--k", "10", *extra]


def test_knn_single_process_and_torchrun_agree(knn_data):
    args = eval_knn.get_args_parser().parse_args(knn_argv(knn_data, "--batch_size", "16"))
    single = eval_knn.main(args)
    assert single["n_train"] == 63 and single["n_val"] == 31 and 0 <= single["top1"] <= single["top5"] <= 100
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(utils.free_port()), "eval_knn.py", *knn_argv(knn_data, "--batch_size", "5")]
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(OMP_NUM_THREADS=1), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("result: ")]
    assert len(line) == 1  # printed by rank 0 only
    double = json.loads(line[0][len("result: "):])
    assert (double["top1"], double["top5"], double["n_train"], double["n_val"]) == \
        (single["top1"], single["top5"], 63, 31)


def test_pretraining_knn_hook_uses_momentum_encoder(knn_data, tmp_path, monkeypatch):
    import run_pretraining
    folder = tmp_path / "images" / "c0"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    seen = []
    real = knn.knn_accuracy

    def spy(model, *a, **kw):
        seen.append((model, model.training))
        return real(model, *a, **kw)

    monkeypatch.setattr(knn, "knn_accuracy", spy)
    out = tmp_path / "pre"
    args = run_pretraining.get_args_parser().parse_args([
        "--model", "bootmae_tiny", "--data_path", str(tmp_path / "images"), "--input_size", "32",
        "--mask_type", "random", "--mask_num", "2", "--num_mask_patches", "1", "--decoder_dim", "64",
        "--decoder_depth", "1", "--batch_size", "4", "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0",
        "--output_dir", str(out), "--knn_freq", "5", "--knn_data_set", "npz", "--knn_data_path", str(knn_data),
        "--knn_batch_size", "32"])
    run_pretraining.main(args)
    record = read_log(out)[0]
    # --knn_freq 5 with one epoch: the last epoch is evaluated
    assert 0 <= record["knn_top1"] <= record["knn_top5"] <= 100
    # the momentum encoder (timm keeps the EMA copy in eval mode; the online model is training at that point)
    assert len(seen) == 1 and isinstance(seen[0][0], modeling_bootmae.BootMAE) and seen[0][1] is False


def test_knn_monitor_crop_pct(tmp_path):
    """--knn_crop_pct sets the monitor's evaluation transform (default 224/256, as eval_knn.py); a value outside
    (0, 1] is a one-line error before training starts."""
    np.savez(tmp_path / "train.npz", images=np.zeros((4, 32, 32, 3), np.uint8), labels=np.arange(4))
    np.savez(tmp_path / "test.npz", images=np.zeros((2, 32, 32, 3), np.uint8), labels=np.arange(2))

    def monitor(crop_pct):
        args = argparse.Namespace(knn_freq=1, knn_k=20, knn_temperature=0.07, knn_data_set="npz",
                                  knn_data_path=str(tmp_path), input_size=32, knn_batch_size=2, batch_size=2,
                                  num_workers=0, knn_pool="avg", knn_crop_pct=crop_pct, demo_size=2048,
                                  imagenet_default_mean_and_std=False)
        return knn.KnnMonitor.from_args(args, torch.device("cpu"))

    resize = [t for t in monitor(None).val_loader.dataset.transform.transforms if type(t).__name__ == "Resize"]
    assert resize[0].size == 36  # 32 / (224 / 256)
    resize = [t for t in monitor(1.0).train_loader.dataset.transform.transforms if type(t).__name__ == "Resize"]
    assert resize[0].size == 32
    for bad in (0.0, 1.5):
        with pytest.raises(utils.UsageError, match=r"--knn_crop_pct .* \(0, 1\]"):
            monitor(bad)


# ---------------------------------------------------------------------------------------------------------
# timm export

def load_printed(line):
    """Runs the create_model line export() prints, exactly as a user would."""
    return eval(line, {"timm": timm}).eval()


@pytest.mark.parametrize("release", [False, True], ids=["ours", "release_keys"])
def test_export_pretrained_features_match(tmp_path, release):
    small = dict(img_size=32, decoder_dim=64, decoder_depth=1)  # the decoders are not exported; keep them cheap
    model = perturbed(modeling_bootmae.bootmae_tiny(**small))
    online = perturbed(modeling_bootmae.bootmae_tiny(**small), seed=1)
    to_file = modeling_bootmae.to_release_state_dict if release else (lambda m: m.state_dict())
    path = tmp_path / "pre.pth"
    torch.save({"model": to_file(online), "model_ema": to_file(model), "args": argparse.Namespace(input_size=32)}, path)
    line = export_timm.export(str(path), str(tmp_path / "timm.pth"), model_key="model_ema")
    assert "vit_tiny_patch16_224" in line and "num_classes=0" in line and "img_size=32" in line
    ours_timm = load_printed(line)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        diff = (model.forward_features(x) - ours_timm.forward_features(x)).abs().max().item()
        wrong = (online.forward_features(x) - ours_timm.forward_features(x)).abs().max().item()
    assert diff < 1e-5 and wrong > 1e-2  # the momentum encoder was exported, not the online one
    if release:
        return
    # global_pool='avg', fc_norm=False: timm's pooled feature is eval_knn's 'avg' feature
    avg = eval(line.replace("global_pool='token'", "global_pool='avg', fc_norm=False"), {"timm": timm}).eval()
    with torch.no_grad():
        pooled = avg.forward_head(avg.forward_features(x), pre_logits=True)
        assert (knn.pooled_features(model, x, "avg") - pooled).abs().max().item() < 1e-5


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_export_finetuned_logits_match(tmp_path, pool):
    model = perturbed(modeling_bootmae.bootmae_tiny_patch16_224(img_size=32, num_classes=10, global_pool=pool))
    path = tmp_path / "ft.pth"
    torch.save({"model": model.state_dict(), "epoch": 3}, path)
    line = export_timm.export(str(path), str(tmp_path / "timm.pth"), input_size=32)
    assert f"global_pool='{pool}'" in line and "num_classes=10" in line
    ours_timm = load_printed(line)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - ours_timm(x)).abs().max().item() < 1e-5


def test_export_bad_checkpoint(tmp_path, monkeypatch, capsys):
    path = tmp_path / "decoder_only.pth"
    torch.save({"model": {"pixel_decoder.norm.weight": torch.ones(4)}}, path)
    out = tmp_path / "timm.pth"
    monkeypatch.setattr(sys, "argv", ["export_timm.py", "--checkpoint", str(path), "--output", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        export_timm.cli()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and "no encoder" in err[0]
    assert not out.exists()
