"""Runs the rows of one ablation table: pretraining, evaluation, and each row's final metrics as JSON.

    python scripts/ablations/run_table.py paper_t2 --data_path /data/imagenet          # every row in turn
    python scripts/ablations/run_table.py paper_t2 --row_index 1 ...                   # one row (slurm arrays)
    python scripts/ablations/run_table.py report_mae_k --data_path /data/cifar --dry_run   # print the commands

For each row of ``tables.TABLES[table]``, in ``<out>/<table>/<row>/``:

1. ``pretrain/``: ``run_pretraining.py <table base> <row flags>`` under torchrun with ``--nproc`` processes
   (``--launcher local``: one plain process); the total batch of the setting is kept (ImageNet: 4096 through
   ``--update_freq``; CIFAR-10: 512 split over the processes). A row without pretraining gets a freshly
   initialised checkpoint instead. Pretraining resumes by itself when the command is run again.
2. ``finetune/``: the fine-tuning recipe of the setting (scripts/finetune/bootmae_base_finetune.sh for the paper's
   tables, scripts/finetune/bootmae_tiny_cifar10.sh for the report's) on the online encoder (``model``).
3. ``linear/`` (report tables): scripts/linear/bootmae_tiny_cifar10_linprobe.sh.
4. ``metrics.json``: ``finetune_top1`` and ``linear_top1`` (best top-1 of the run's log), ``pretrain`` (the
   pretraining run's final metrics: losses, median s/step, ...), the row's flags.

A row with ``metrics.json`` is skipped (``--force`` reruns it). ``gather.py`` turns the JSON files into the
table next to the published numbers.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import tables  # noqa: E402

EVAL_SCRIPTS = {
    "imagenet": {"finetune": "scripts/finetune/bootmae_base_finetune.sh"},
    "cifar10": {"finetune": "scripts/finetune/bootmae_tiny_cifar10.sh",
                "linear": "scripts/linear/bootmae_tiny_cifar10_linprobe.sh"},
}
TOTAL_BATCH = {"imagenet": 4096, "cifar10": 512}


def pretrain_command(args, table, row, row_dir):
    flags = tables.command_flags(table, row, args.mae_checkpoint)
    per_process = 256 if table.setting == "imagenet" else TOTAL_BATCH["cifar10"] // args.nproc
    update_freq = max(1, TOTAL_BATCH[table.setting] // (args.nproc * per_process))
    out = os.path.join(row_dir, "pretrain")
    flags += ["--batch_size", str(per_process), "--update_freq", str(update_freq), "--data_path", args.data_path,
              "--output_dir", out, "--metrics_json", os.path.join(out, "metrics.json"), *args.extra]
    if args.launcher == "local":
        return [args.python, "run_pretraining.py", *flags]
    return [args.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
            "run_pretraining.py", *flags]


def init_checkpoint(table, path):
    """A freshly initialised model of the table's setting (the "no pretraining" rows), in our layout."""
    import torch
    import run_pretraining
    import utils
    parser = argparse.ArgumentParser("init", parents=[run_pretraining.get_args_parser()])
    args = parser.parse_args(list(table.base) + ["--data_set", "demo"])
    run_pretraining.check_args(args)
    torch.manual_seed(args.seed)
    model = run_pretraining.build_model(args)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    utils.save_on_master({"model": model.state_dict(), "epoch": -1, "args": args}, path)


def best_top1(log_path):
    """The best test top-1 of a fine-tuning or linear-probing log.txt (one JSON record per epoch)."""
    best = None
    with open(log_path) as f:
        for line in f:
            record = json.loads(line)
            for key in ("test_acc1", "test_ema_acc1"):
                if isinstance(record.get(key), (int, float)):
                    best = record[key] if best is None else max(best, record[key])
    return best


def run(cmd, env, dry_run):
    shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    print((shown + " " if shown else "") + shlex.join(cmd), flush=True)
    if not dry_run:
        subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, check=True)


def run_row(args, table, row):
    row_dir = os.path.join(args.out, table.key, row.key)
    metrics_path = os.path.join(row_dir, "metrics.json")
    if os.path.isfile(metrics_path) and not args.force and not args.dry_run:
        print(f"{table.key}/{row.key}: done ({metrics_path})", flush=True)
        return
    print(f"# {table.key}/{row.key}: {row.label}", flush=True)
    checkpoint = os.path.join(row_dir, "pretrain", "checkpoint-last.pth")
    if row.flags is None:
        checkpoint = os.path.join(row_dir, "init", "checkpoint-init.pth")
        print(f"# freshly initialised encoder -> {checkpoint}", flush=True)
        if not args.dry_run:
            init_checkpoint(table, checkpoint)
    else:
        run(pretrain_command(args, table, row, row_dir), {}, args.dry_run)
    metrics = {"table": table.key, "row": row.key, "label": row.label,
               "flags": None if row.flags is None else tables.command_flags(table, row, args.mae_checkpoint)}
    for kind, script in EVAL_SCRIPTS[table.setting].items():
        out = os.path.join(row_dir, kind)
        env = {"FINETUNE": checkpoint, "DATA_PATH": args.data_path, "OUTPUT_DIR": out, "NPROC": str(args.nproc),
               "GPUS": str(args.nproc), "PYTHON": args.python}
        run(["bash", script], env, args.dry_run)
        if not args.dry_run:
            metrics[f"{kind}_top1"] = best_top1(os.path.join(out, "log.txt"))
    if args.dry_run:
        return
    if row.flags is not None:
        with open(os.path.join(row_dir, "pretrain", "metrics.json")) as f:
            metrics["pretrain"] = json.load(f)
    with open(metrics_path + ".tmp", "w") as f:
        json.dump(metrics, f, indent=1)
    os.replace(metrics_path + ".tmp", metrics_path)
    print(f"{table.key}/{row.key}: {json.dumps({k: v for k, v in metrics.items() if k.endswith('_top1')})}",
          flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", choices=list(tables.TABLES))
    p.add_argument("--rows", nargs="+", default=None, help="row keys to run (default: all)")
    p.add_argument("--row_index", type=int, default=None, help="run only the row at this index (slurm array task)")
    p.add_argument("--data_path", default=os.environ.get("DATA_PATH"),
                   help="ImageNet folder (paper tables) or the CIFAR-10 folder (report tables)")
    p.add_argument("--mae_checkpoint", default=os.environ.get("MAE_CHECKPOINT"),
                   help="an 800-epoch MAE encoder (MAE's checkpoint, ours or the release's) for the feature-target rows")
    p.add_argument("--out", default=os.path.join(ROOT, "output", "ablations"))
    p.add_argument("--launcher", default="torchrun", choices=["torchrun", "local"])
    p.add_argument("--nproc", type=int, default=int(os.environ.get("GPUS", "8")), help="processes (GPUs) per row")
    p.add_argument("--python", default=os.environ.get("PYTHON", sys.executable))
    p.add_argument("--dry_run", action="store_true", help="print the commands only")
    p.add_argument("--force", action="store_true", help="rerun rows that have metrics.json")
    args, extra = p.parse_known_args()
    args.extra = extra   # further run_pretraining.py flags, appended to every row (e.g. --amp fp16)
    table = tables.TABLES[args.table]
    rows = list(table.rows)
    if args.row_index is not None:
        if not 0 <= args.row_index < len(rows):
            p.error(f"--row_index {args.row_index} is outside 0..{len(rows) - 1} ({table.key} has {len(rows)} rows)")
        rows = [rows[args.row_index]]
    if args.rows:
        unknown = set(args.rows) - {r.key for r in rows}
        if unknown:
            p.error(f"unknown rows {sorted(unknown)}; {table.key} has {', '.join(r.key for r in table.rows)}")
        rows = [r for r in rows if r.key in args.rows]
    if not args.data_path:
        p.error("--data_path (or DATA_PATH) is required: the ImageNet folder or the CIFAR-10 folder")
    if args.nproc < 1:
        p.error("--nproc must be at least 1")
    if args.launcher == "local":
        args.nproc = 1
    needs_mae = [r.key for r in rows if r.flags is not None and tables.MAE_CHECKPOINT in r.flags]
    if needs_mae and not args.mae_checkpoint:
        p.error(f"rows {', '.join(needs_mae)} predict the features of a fixed MAE encoder; give it with "
                f"--mae_checkpoint (or MAE_CHECKPOINT)")
    for row in rows:
        run_row(args, table, row)


if __name__ == "__main__":
    main()
