"""Learning check on real data (CPU-sized): does BootMAE pretraining make better features than the baselines?

    python benchmarks/cifar10_learning_check.py --data_path ../shared/data/cifar10

1. pretrains ``bootmae_tiny`` on ``train.npz`` (32 px images; ``--patch_size`` 8: 16 patches, 8 masked, or 4:
   64 patches, 48 masked; the release's block-then-random masks on that grid; pixel decoder width 128);
2. evaluates frozen features on ``test.npz`` with weighted kNN (k=20, T=0.07) and a linear probe, for the
   pretrained momentum encoder, for the same encoder at initialisation and for raw pixels, all through one
   evaluation transform (``--crop_pct``: by default eval_knn.py's, resize to 36 px and centre-crop 32).

The linear probe (``--probe features``, default) is ``main_linprobe.py``'s head (BatchNorm without affine +
linear, LARS, warm-up + cosine, the same functions) trained on features computed once, without augmentation
(raw pixels: the 3,072 values of each image); 100 epochs take about a minute per encoder on 2 CPU cores, where
the full recipe (``--probe mae``: a ``main_linprobe.py`` run with its random-resized crops) needs minutes per
epoch. ``--data_path`` is a folder with ``train.npz`` / ``test.npz`` (arrays ``images`` [n, 32, 32, 3] uint8
and ``labels``). Writes ``results.json`` and ``results.md`` into ``--output_dir`` and prints the table.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoints  # noqa: E402
import engine_for_linprobe  # noqa: E402
import knn  # noqa: E402
import modeling_bootmae  # noqa: E402
import pretrained  # noqa: E402
from benchmarks import cached_probe  # noqa: E402
from datasets import EvalDataConfig, build_dataset  # noqa: E402


# patch size -> (masked patches, block budget, smallest and largest block) on the grid of a 32 px image. 4 px: the
# release's 75 % (147 of 196, block budget 120) on 8x8. 8 px: half of the 4x4 grid, since 75 % would leave the
# encoder 4 patches (measured: kNN 32.3 % against 31.0 % for 75 % after 8 epochs of the default run)
MASKS = {4: (48, 39, 4, 16), 8: (8, 7, 2, 6)}


def run(cmd, log_path):
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"command failed ({proc.returncode}); see {log_path}")
    return time.time() - t0


def knn_of_checkpoint(args, path):
    train_set, val_set = eval_sets(args)
    model = pretrained.build_encoder("tiny", 32, args.patch_size)
    checkpoints.load_pretrained_encoder(model, path, "model_ema|model", new=("norm.",))
    loaders = [knn.build_loader(s, 500, 0) for s in (train_set, val_set)]
    return knn.knn_accuracy(model, *loaders, torch.device("cpu"), 20, 0.07, "avg")["top1"]


def eval_sets(args):
    """(train, test) data sets with the evaluation transform every row of the table shares (``--crop_pct``)."""
    ns = EvalDataConfig(data_set="npz", data_path=args.data_path, input_size=32, crop_pct=args.crop_pct)
    return build_dataset(True, ns)[0], build_dataset(False, ns)[0]


def load_pixels(args):
    """[(pixels [n, 3072], labels [n]) of the train set, the same of the test set]: the encoder's input (the
    evaluation transform and the release's normalisation, 0.5 mean and std for every channel), flattened."""
    data = []
    for dataset in eval_sets(args):
        batches = list(knn.build_loader(dataset, 500, 0))
        data.append((torch.cat([x.flatten(1) for x, _ in batches]),
                     torch.cat([torch.as_tensor(y) for _, y in batches]).long()))
    return data


def knn_of_pixels(pixels, centre=True):
    """kNN top-1 (%) on ``load_pixels``' output, each image centred on its own mean (the same as centring the
    0-255 values: the normalisation is one affine map for all channels) or as the encoder sees them."""
    def features(x, y):
        return F.normalize(x - x.mean(dim=1, keepdim=True) if centre else x, dim=1), y
    (train_x, train_y), (test_x, test_y) = pixels
    return knn.knn_classify(*features(train_x, train_y), *features(test_x, test_y), k=20, temperature=0.07)[0]


PROBE_BATCH = 256  # the linear probe's batch: its lr is probe_blr * PROBE_BATCH / 256 = probe_blr


def probe_args(args):
    return argparse.Namespace(size="tiny", global_pool=True, depth=12, input_size=32, patch_size=args.patch_size,
                              crop_pct=args.crop_pct, data_set="npz", data_path=args.data_path,
                              epochs=args.probe_epochs,
                              warmup_epochs=max(1, args.probe_epochs // 10), lr=args.probe_blr, min_lr=0.0,
                              weight_decay=0.0, momentum=0.9)


def encoder_features(args, checkpoint):
    """((train features, labels), (test features, labels)) of the frozen encoder, pooled as the probe pools."""
    ns = probe_args(args)
    model = engine_for_linprobe.build_probe(ns, 10)
    engine_for_linprobe.load_probe_encoder(model, checkpoint, "model_ema|model")
    model.eval()
    data = []
    for dataset in eval_sets(args):  # the evaluation transform: no augmentation
        batches = [(engine_for_linprobe.features(model, x, None), torch.as_tensor(y))
                   for x, y in knn.build_loader(dataset, 500, 0)]
        data.append((torch.cat([f for f, _ in batches]), torch.cat([y for _, y in batches]).long()))
    return data


def feature_probe(args, train, test):
    """Top-1 (%) of main_linprobe's head trained on cached features (see the docstring): ``train`` and ``test``
    are (features [n, d], labels [n])."""
    ns = probe_args(args)
    (train_x, train_y), (test_x, test_y) = train, test
    torch.manual_seed(0)
    head = engine_for_linprobe.probe_head(train_x.shape[1], 10)
    optimizer = engine_for_linprobe.build_optimizer(head, ns)
    generator = torch.Generator().manual_seed(0)
    cached_probe.train_head(head, optimizer, train_x, train_y, args.probe_epochs, PROBE_BATCH, generator,
                            before_step=lambda progress: engine_for_linprobe.adjust_learning_rate(optimizer, progress, ns))
    return cached_probe.top1(head, test_x, test_y)


def probe(args, checkpoint, out_dir, name):
    cmd = [sys.executable, "main_linprobe.py", "--model", "bootmae_tiny_patch16_224",
           "--patch_size", str(args.patch_size), "--input_size", "32", "--data_set", "npz",
           "--data_path", args.data_path, "--finetune", checkpoint, "--model_key", "model_ema|model", "--global_pool",
           "--depth", "12", "--epochs", str(args.probe_epochs), "--warmup_epochs", "1",
           "--batch_size", str(PROBE_BATCH), "--blr", str(args.probe_blr), "--num_workers", str(args.num_workers),
           "--device", args.device, "--output_dir", os.path.join(out_dir, name), "--no_auto_resume"]
    if args.crop_pct is not None:
        cmd += ["--crop_pct", str(args.crop_pct)]
    run(cmd, os.path.join(out_dir, f"{name}.log"))
    with open(os.path.join(out_dir, name, "log.txt")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return records[-1]["test_acc1"]


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default=os.path.join(ROOT, "..", "shared", "data", "cifar10"))
    p.add_argument("--output_dir", default=os.path.join(ROOT, "output", "cifar10_learning_check"))
    p.add_argument("--epochs", default=80, type=int,
                   help="pretraining epochs (80: 49 minutes on 2 CPU cores with --knn_freq 16)")
    p.add_argument("--crop_pct", default=None, type=float,
                   help="evaluation transform of every row (pixels too): resize to 32 / crop_pct, centre crop 32; "
                        "default 224/256, as eval_knn.py and the kNN during pretraining; 1 = the whole image")
    p.add_argument("--patch_size", default=8, type=int, choices=sorted(MASKS),
                   help="8: 16 patches of 8 px (about 3x more images per second on a CPU than 4)")
    p.add_argument("--probe", default="features", choices=["features", "mae"],
                   help="linear probe on cached features, or a main_linprobe.py run (see above)")
    p.add_argument("--probe_epochs", default=100, type=int, help="linear-probe epochs")
    p.add_argument("--probe_blr", default=1.0, type=float,
                   help="linear-probe base lr, batch 256 (MAE's 0.1 suits 90 ImageNet epochs; 10k images need more)")
    p.add_argument("--skip_pretrain", action="store_true",
                   help="evaluate the checkpoint an earlier run left in --output_dir instead of pretraining again")
    p.add_argument("--batch_size", default=128, type=int, help="pretraining batch")
    p.add_argument("--lr", default=2e-3, type=float,
                   help="base lr (scaled by batch / 256, as run_pretraining.py does)")
    p.add_argument("--warmup_epochs", default=5, type=int)
    p.add_argument("--weight_mask", action=argparse.BooleanOptionalAction, default=True,
                   help="the release's neighbourhood-weighted loss")
    p.add_argument("--model_ema_decay", default=0.99, type=float)
    p.add_argument("--knn_freq", default=0, type=int,
                   help="also log the kNN accuracy during pretraining every N epochs (run_pretraining.py --knn_freq)")
    p.add_argument("--num_workers", default=0, type=int, help="loader processes (0: on 2 cores a worker only competes)")
    p.add_argument("--device", default="cpu", help="device for pretraining and the linear probes")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile the pretraining step (about 1.2x more images per second on a CPU)")
    p.add_argument("--amp", default="bf16", choices=["bf16", "none"], help="pretraining precision")
    p.add_argument("--pretrain_args", default="", help="further run_pretraining.py flags, e.g. '--pixel_norm patch'")
    return p


def check_args(args):
    """Refuses a bad --crop_pct, creates --output_dir and refuses a --data_path without train.npz / test.npz."""
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise SystemExit(f"--crop_pct {args.crop_pct} is not a fraction; give a value in (0, 1] or leave it out")
    os.makedirs(args.output_dir, exist_ok=True)
    for name in ("train.npz", "test.npz"):
        if not os.path.isfile(os.path.join(args.data_path, name)):
            raise SystemExit(f"--data_path {args.data_path} has no {name}")


def save_init(args, out):
    """The encoder at initialisation (the same construction and seed as the pretraining run) in out/init.pth;
    returns that path."""
    torch.manual_seed(0)
    tiny = {k: v for k, v in modeling_bootmae.MODEL_SIZES["tiny"].items() if k != "patch_size"}
    init = modeling_bootmae.BootMAE(img_size=32, patch_size=args.patch_size, decoder_dim=128, **tiny)
    init_path = os.path.join(out, "init.pth")
    checkpoints.save_on_master({"model": init.state_dict(), "epoch": -1}, init_path)
    return init_path


def pretrain_command(args, pre_dir):
    """The run_pretraining.py command line of the check (see the module docstring)."""
    mask_num, block_budget, min_block, max_block = MASKS[args.patch_size]
    cmd = [sys.executable, "run_pretraining.py", "--data_set", "npz", "--data_path", args.data_path,
           "--model", "bootmae_tiny", "--input_size", "32", "--patch_size", str(args.patch_size),
           "--decoder_dim", "128", "--mask_num", str(mask_num), "--num_mask_patches", str(block_budget),
           "--min_mask_patches_per_block", str(min_block), "--max_mask_patches_per_block", str(max_block),
           "--amp", args.amp, "--compile" if args.compile else "--no-compile",
           "--batch_size", str(args.batch_size),
           "--epochs", str(args.epochs), "--warmup_epochs", str(args.warmup_epochs), "--lr", str(args.lr),
           "--min_lr", "1e-5", "--drop_path", "0", "--model_ema_decay", str(args.model_ema_decay),
           "--model_ema_warmup_epochs", str(args.epochs),
           "--num_workers", str(args.num_workers), "--device", args.device, "--print_freq", "20",
           "--save_ckpt_freq", str(args.epochs), "--output_dir", pre_dir, "--no_auto_resume"]
    if args.weight_mask:
        cmd.append("--weight_mask")
    cmd += shlex.split(args.pretrain_args)
    if args.knn_freq:
        cmd += ["--knn_freq", str(args.knn_freq), "--knn_data_set", "npz", "--knn_data_path", args.data_path,
                "--knn_batch_size", "500"]
        if args.crop_pct is not None:
            cmd += ["--knn_crop_pct", str(args.crop_pct)]
    return cmd


def pretrain(args, out):
    """(the pretrained checkpoint, the seconds pretraining took: NaN with --skip_pretrain, which reuses the
    checkpoint of an earlier run)."""
    pre_dir = os.path.join(out, "pretrain")
    pretrain_cmd = pretrain_command(args, pre_dir)
    ckpt = os.path.join(pre_dir, "checkpoint-last.pth")
    if args.skip_pretrain:
        if not os.path.isfile(ckpt):
            raise SystemExit(f"--skip_pretrain: {ckpt} does not exist; run once without --skip_pretrain")
        return ckpt, float("nan")
    return ckpt, run(pretrain_cmd, os.path.join(out, "pretrain.log"))


def evaluate_all(args, results, init_path, ckpt, out):
    """Fills results["knn_top1"] and results["linear_top1"] for every row of the table; each figure is printed as
    soon as it is known, so a long evaluation shows progress."""
    pixels = load_pixels(args)
    for name, fn in (("raw pixels", lambda: knn_of_pixels(pixels)),
                     ("raw pixels, encoder input", lambda: knn_of_pixels(pixels, centre=False)),
                     ("random init", lambda: knn_of_checkpoint(args, init_path)),
                     ("BootMAE", lambda: knn_of_checkpoint(args, ckpt))):
        results["knn_top1"][name] = fn()
        print(f"kNN top-1 {name}: {results['knn_top1'][name]:.2f} %", flush=True)
    if args.probe == "features":
        results["linear_top1"]["raw pixels"] = feature_probe(args, *pixels)
        print(f"linear probe top-1 raw pixels: {results['linear_top1']['raw pixels']:.2f} %", flush=True)
    for name, path, sub in (("random init", init_path, "probe_init"), ("BootMAE", ckpt, "probe_bootmae")):
        results["linear_top1"][name] = (feature_probe(args, *encoder_features(args, path))
                                        if args.probe == "features" else probe(args, path, out, sub))
        print(f"linear probe top-1 {name}: {results['linear_top1'][name]:.2f} %", flush=True)


def write_results(results, out):
    """results.json and results.md (the table, also printed) in ``out``."""
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    rows = ["| features | kNN top-1 (%) | linear probe top-1 (%) |", "| --- | --- | --- |"]
    for name in ("raw pixels", "raw pixels, encoder input", "random init", "BootMAE"):
        lin = results["linear_top1"].get(name)
        rows.append(f"| {name} | {results['knn_top1'][name]:.2f} | {'-' if lin is None else f'{lin:.2f}'} |")
    table = "\n".join(rows)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    print(table)


def main():
    args = get_args_parser().parse_args()
    check_args(args)
    out = args.output_dir
    init_path = save_init(args, out)
    ckpt, pretrain_s = pretrain(args, out)

    results = {"pretrain_epochs": args.epochs, "pretrain_seconds": pretrain_s, "threads": torch.get_num_threads(),
               "config": {k: v for k, v in vars(args).items() if k not in ("data_path", "output_dir")},
               "knn_top1": {}, "linear_top1": {}}
    print(f"pretraining: {pretrain_s / 60:.1f} min", flush=True)
    t0 = time.time()
    evaluate_all(args, results, init_path, ckpt, out)
    results["eval_seconds"] = time.time() - t0
    write_results(results, out)
    print(f"pretraining {args.epochs} epochs: {pretrain_s / 60:.1f} min; "
          f"evaluation {results['eval_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
