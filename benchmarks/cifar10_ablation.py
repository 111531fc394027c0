"""Scaled-down CIFAR-10 comparison on the CPU: MAE vs BootMAE vs MAE-K vs EMA-MAE vs no pretraining.

    python benchmarks/cifar10_ablation.py                       # ~40 min on 2 busy CPU cores, 2 seeds
    python benchmarks/cifar10_ablation.py --seeds 0 --variants mae bootmae --out output/quick

The CIFAR-10 report's comparison (DeiT-Tiny, 50k images, 200 + 100 epochs on a GPU) shrunk to what two CPU
cores finish in about 40 minutes, every variant with the same budget:

- data: the CIFAR-10 subset in ``--data_path`` (``train.npz`` / ``test.npz``, 10k + 10k images, 32 px);
  pretraining runs ``--epochs`` passes over the first ``--train_images`` // 10 training images of each class;
- encoder: 4 blocks x 96 wide x 3 heads, 4 px patches (an 8x8 grid, 48 masked); one 96-wide decoder block;
  batch 64, lr 1e-3 (base 4e-3 x 64 / 256), one warm-up epoch;
- each variant is ``run_pretraining.py`` with the flags of ``VARIANTS`` on top of ``COMMON``: the same
  code and flags as the full-size runs (scripts/ablations/), with K, tau, WSE and the EMA momentum scaled to
  the short schedule (K = 2 of 5 epochs for 10 of 200; tau 0.2 per epoch leaves the first target's share
  that 0.005 leaves after the report's 195 epochs, 0.8^4 ~ 0.995^195 ~ 0.4; WSE 1 epoch; BootMAE's momentum
  0.99 instead of 0.999 for 75 steps);
- evaluation of the online encoder (``model``), or of a freshly initialised one for "no pretraining":
  features = mean of the patch tokens after the final norm, computed once for the first 5,000 train and 5,000
  test images (500 per class; no augmentation); weighted kNN (k 20, T 0.07, DINO's) and a linear probe (BatchNorm without
  affine + Linear, SGD momentum 0.9, lr 0.1 cosine, 100 epochs on the cached features, batch 256).

Every run writes ``<out>/<variant>-seed<s>/result.json``; runs with a result are skipped, so an interrupted
comparison continues where it stopped. At the end the table (mean and the two seeds' values) is printed as
Markdown and written to ``<out>/table.md`` with the hardware and wall time.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoints  # noqa: E402
import knn  # noqa: E402
import modeling_bootmae  # noqa: E402
from benchmarks import cached_probe  # noqa: E402
from datasets import EvalDataConfig, build_dataset  # noqa: E402

ENCODER = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3)
COMMON = ["--model", "bootmae_tiny", "--input_size", "32", "--patch_size", "4", "--encoder_dim", "96",
          "--encoder_depth", "4", "--encoder_heads", "3", "--decoder_dim", "96", "--decoder_depth", "1",
          "--drop_path", "0.0", "--mask_num", "48", "--num_mask_patches", "39", "--min_mask_patches_per_block", "4",
          "--max_mask_patches_per_block", "16", "--batch_size", "64", "--lr", "4e-3", "--min_lr", "1e-5",
          "--warmup_epochs", "1", "--num_workers", "1", "--print_freq", "1000", "--device", "cpu",
          "--save_ckpt_freq", "1000", "--no_auto_resume"]
# the report's variants (MAE, MAE-K, EMA-MAE: MAE's random masks, no context injection) and the release's BootMAE
VARIANTS = {
    "none": None,
    "mae": ["--feature_weight", "0", "--mask_type", "random", "--context", "none"],
    "bootmae": ["--weight_mask", "--model_ema_decay", "0.99"],
    "mae_k": ["--pixel_weight", "0", "--target_encoder", "k_epoch", "--target_k", "2", "--feature_ramp", "0",
              "--mask_type", "random", "--context", "none"],
    "ema_mae": ["--pixel_weight", "0", "--target_encoder", "epoch_ema", "--target_tau", "0.2",
                "--pixel_warmup_epochs", "1", "--feature_ramp", "0", "--mask_type", "random", "--context", "none"],
}
LABELS = {"none": "no pretraining", "mae": "MAE", "bootmae": "BootMAE", "mae_k": "MAE-K (K = 2)",
          "ema_mae": "EMA-MAE (tau 0.2, WSE 1)"}


def subset_npz(src, dst, n):
    """The first n/10 images of every class of ``src`` (class-balanced pretraining data)."""
    if os.path.isfile(dst):
        return
    with np.load(src) as data:
        images, labels = data["images"], data["labels"]
    per_class = n // 10
    keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    np.savez(dst + ".tmp.npz", images=images[keep], labels=labels[keep])
    os.replace(dst + ".tmp.npz", dst)


def pretrain(args, variant, seed, run_dir, data_dir):
    """run_pretraining.py for one variant and seed; returns its metrics (the last epoch's record)."""
    cmd = [sys.executable, os.path.join(ROOT, "run_pretraining.py"), *COMMON, *VARIANTS[variant],
           "--data_set", "npz", "--data_path", data_dir, "--epochs", str(args.epochs), "--seed", str(seed),
           "--output_dir", run_dir, "--metrics_json", os.path.join(run_dir, "pretrain_metrics.json")]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with open(os.path.join(run_dir, "pretrain.log"), "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"pretraining {variant} seed {seed} failed (exit {proc.returncode}); see "
                         f"{os.path.join(run_dir, 'pretrain.log')}")
    with open(os.path.join(run_dir, "pretrain_metrics.json")) as f:
        return json.load(f)


@torch.no_grad()
def features(encoder, dataset, batch_size=500):
    """Mean of the patch tokens after the final norm, [n, D], and the labels [n], in dataset order."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    feats, labels = [], []
    for images, targets in loader:
        feats.append(knn.pooled_features(encoder, images).float())
        labels.append(torch.as_tensor(targets))
    return torch.cat(feats), torch.cat(labels).long()


def linear_probe(train_f, train_l, test_f, test_l, epochs=100, batch_size=256, lr=0.1, seed=0):
    """MAE's probe head (BatchNorm without affine + Linear) on fixed features; test top-1 % at the end."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = nn.Sequential(nn.BatchNorm1d(train_f.shape[1], affine=False, eps=1e-6), nn.Linear(train_f.shape[1], 10))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
    steps = epochs * (len(train_f) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    cached_probe.train_head(head, opt, train_f, train_l, epochs, batch_size, g, drop_last=True,
                            after_step=sched.step)
    return cached_probe.top1(head, test_f, test_l)


def evaluate(checkpoint, seed, train_set, test_set):
    """kNN and linear-probe top-1 of the online encoder of ``checkpoint`` (None: a fresh initialisation)."""
    torch.manual_seed(seed)
    encoder = modeling_bootmae.VisionTransformer(**ENCODER)
    encoder._init_encoder()  # the pretraining model's initialisation, for "no pretraining"
    if checkpoint is not None:
        ckpt = checkpoints.load_checkpoint(checkpoint)
        _, missing, _ = modeling_bootmae.load_encoder(encoder, modeling_bootmae.encoder_state_dict(ckpt, "model"))
        if missing:
            raise SystemExit(f"{checkpoint} lacks encoder tensors {missing[:3]}")
    encoder.eval()
    train_f, train_l = features(encoder, train_set)
    test_f, test_l = features(encoder, test_set)
    knn1, _ = knn.knn_classify(F.normalize(train_f, dim=1), train_l, F.normalize(test_f, dim=1), test_l,
                                    k=20, temperature=0.07)
    return {"knn_top1": knn1, "linear_top1": linear_probe(train_f, train_l, test_f, test_l, seed=seed)}


def hardware():
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = platform.processor()
    return f"{model or platform.machine()}, {os.cpu_count()} cores visible, torch {torch.__version__}"


def table(args, results, wall):
    rows = ["| pretraining | kNN top-1 (mean; seeds) | linear top-1 (mean; seeds) | pretraining s/step | final loss |",
            "| --- | --- | --- | --- | --- |"]
    for variant in args.variants:
        rs = [results[(variant, s)] for s in args.seeds if (variant, s) in results]
        if not rs:
            continue

        def cell(key, rs=rs):
            vals = [r[key] for r in rs]
            return f"{np.mean(vals):.2f} ({', '.join(f'{v:.2f}' for v in vals)})"
        steps = [r["pretrain"]["s_per_step"] for r in rs if r.get("pretrain")]
        loss = [r["pretrain"]["train_loss"] for r in rs if r.get("pretrain")]
        rows.append(f"| {LABELS[variant]} | {cell('knn_top1')} | {cell('linear_top1')} | "
                    f"{f'{np.median(steps):.3f}' if steps else '-'} | "
                    f"{', '.join(f'{v:.3f}' for v in loss) if loss else '-'} |")
    load = os.getloadavg()
    run_time = sum(r["pretrain_seconds"] + r["eval_seconds"] for r in results.values())
    rows.append("")
    rows.append(f"Hardware: {hardware()}; load average at the end {load[0]:.1f} (shared machine). "
                f"{len(results)} runs (pretraining and evaluation) took {run_time / 60:.1f} min in all; this "
                f"invocation's wall time {wall / 60:.1f} min.")
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default=os.path.join(os.path.dirname(ROOT), "shared", "data", "cifar10"),
                   help="folder with train.npz and test.npz")
    p.add_argument("--out", default=os.path.join(ROOT, "output", "cifar10_ablation"))
    p.add_argument("--seeds", default=[0, 1], type=int, nargs="+")
    p.add_argument("--variants", default=list(VARIANTS), nargs="+", choices=list(VARIANTS))
    p.add_argument("--epochs", default=5, type=int, help="pretraining epochs")
    p.add_argument("--train_images", default=1024, type=int, help="pretraining images per epoch (class-balanced)")
    p.add_argument("--threads", default=2, type=int, help="torch threads")
    p.add_argument("--eval_images", default=5000, type=int, help="evaluate on the first N train and test images "
                   "(5000: 500 per class in the shared subset; 0 = all)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for split in ("train", "test"):
        if not os.path.isfile(os.path.join(args.data_path, f"{split}.npz")):
            raise SystemExit(f"error: {args.data_path} has no {split}.npz; give --data_path the CIFAR-10 npz folder")
    data_dir = os.path.join(args.out, "pretrain_data")
    subset_npz(os.path.join(args.data_path, "train.npz"), os.path.join(data_dir, "train.npz"), args.train_images)
    eval_args = EvalDataConfig(data_set="npz", data_path=args.data_path, input_size=32, crop_pct=1.0)
    train_set, _ = build_dataset(True, eval_args)
    test_set, _ = build_dataset(False, eval_args)
    if args.eval_images:
        train_set = torch.utils.data.Subset(train_set, range(args.eval_images))
        test_set = torch.utils.data.Subset(test_set, range(args.eval_images))

    start = time.time()
    results = {}
    for seed in args.seeds:
        for variant in args.variants:
            run_dir = os.path.join(args.out, f"{variant}-seed{seed}")
            result_path = os.path.join(run_dir, "result.json")
            if os.path.isfile(result_path):
                with open(result_path) as f:
                    results[(variant, seed)] = json.load(f)
                continue
            os.makedirs(run_dir, exist_ok=True)
            t0 = time.time()
            metrics, checkpoint = None, None
            if VARIANTS[variant] is not None:
                metrics = pretrain(args, variant, seed, run_dir, data_dir)
                checkpoint = os.path.join(run_dir, "checkpoint-last.pth")
            t1 = time.time()
            result = {"variant": variant, "seed": seed, **evaluate(checkpoint, seed, train_set, test_set),
                      "pretrain": metrics, "pretrain_seconds": t1 - t0, "eval_seconds": time.time() - t1}
            with open(result_path, "w") as f:
                json.dump(result, f, indent=1)
            results[(variant, seed)] = result
            print(f"{variant} seed {seed}: kNN {result['knn_top1']:.2f} %, linear {result['linear_top1']:.2f} % "
                  f"(pretraining {t1 - t0:.0f} s, evaluation {result['eval_seconds']:.0f} s)", flush=True)
    text = table(args, results, time.time() - start)
    print(text)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
