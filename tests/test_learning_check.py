"""The CIFAR-10 learning check (``benchmarks/cifar10_learning_check.py``) end to end on a made-up npz set, so the
script cannot rot: pretraining, kNN and linear probes for raw pixels, the encoder at initialisation and the
pretrained one, the result files, ``--skip_pretrain`` and its error."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from shared_helpers import clean_env, read_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "cifar10_learning_check.py")
# 40 probe epochs of one step each: the probe's BatchNorm needs that many updates before its running statistics
# (used at test time) describe raw 0-255 pixels
FAST = ["--epochs", "1", "--batch_size", "20", "--warmup_epochs", "1", "--probe_epochs", "40", "--no-compile",
        "--amp", "none"]


def _npz(path, n, seed):
    """4 classes, each a flat colour plus noise: raw pixels separate them perfectly."""
    rng = np.random.default_rng(seed)
    colours = np.array([[230, 20, 20], [20, 230, 20], [20, 20, 230], [230, 230, 20]])
    labels = np.arange(n) % 4
    images = colours[labels][:, None, None, :] + rng.integers(-20, 21, size=(n, 32, 32, 3))
    np.savez(path, images=images.clip(0, 255).astype(np.uint8), labels=labels)


def _run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=clean_env(OMP_NUM_THREADS=1))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("npz")
    _npz(d / "train.npz", 40, 0)
    _npz(d / "test.npz", 20, 1)
    return str(d)


@pytest.mark.parametrize("patch_size", ["8", "4"])
def test_learning_check_end_to_end(data, tmp_path, patch_size):
    out = str(tmp_path / "check")
    proc = _run("--data_path", data, "--output_dir", out, "--patch_size", patch_size, *FAST)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    names = {"raw pixels", "random init", "BootMAE"}
    assert set(results["knn_top1"]) == names | {"raw pixels, encoder input"} and set(results["linear_top1"]) == names
    assert all(0.0 <= v <= 100.0 for r in ("knn_top1", "linear_top1") for v in results[r].values())
    # colour-coded classes: the pixel baselines must find them all
    assert results["knn_top1"]["raw pixels"] == 100.0 and results["linear_top1"]["raw pixels"] == 100.0
    assert results["knn_top1"]["raw pixels, encoder input"] == 100.0
    assert results["config"]["patch_size"] == int(patch_size)
    table = open(os.path.join(out, "results.md")).read()
    assert table.count("\n") == 6 and "| BootMAE |" in table and "| raw pixels, encoder input | 100.00 | - |" in table
    for name in ("init.pth", "pretrain/checkpoint-last.pth", "pretrain/log.txt"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert [record["epoch"] for record in read_log(os.path.join(out, "pretrain"))] == [0]

    # --skip_pretrain evaluates the same checkpoint again and gives the same figures
    again = _run("--data_path", data, "--output_dir", out, "--patch_size", patch_size, *FAST, "--skip_pretrain")
    assert again.returncode == 0, again.stderr[-2000:]
    with open(os.path.join(out, "results.json")) as f:
        rerun = json.load(f)
    assert rerun["knn_top1"] == results["knn_top1"] and rerun["linear_top1"] == results["linear_top1"]


def test_skip_pretrain_without_a_run_is_one_line(data, tmp_path):
    proc = _run("--data_path", data, "--output_dir", str(tmp_path / "none"), *FAST, "--skip_pretrain")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "run once without --skip_pretrain" in proc.stderr.strip().splitlines()[-1]


def test_bad_crop_pct_is_one_line(data, tmp_path):
    out = tmp_path / "bad"
    proc = _run("--data_path", data, "--output_dir", str(out), *FAST, "--crop_pct", "1.5")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--crop_pct 1.5" in proc.stderr.strip().splitlines()[-1] and not out.exists()
