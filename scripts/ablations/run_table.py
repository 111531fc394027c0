"""Runs the rows of ablation tables: pretraining, evaluation, and each row's final metrics as JSON.

    python scripts/ablations/run_table.py paper_t2 --data_path /data/imagenet          # every row in turn
    python scripts/ablations/run_table.py paper_t2 --row_index 1 ...                   # one row (slurm arrays)
    python scripts/ablations/run_table.py all --data_path /data/imagenet --dry_run     # the plan and its cost
    python scripts/ablations/run_table.py paper_t3 --smoke --rows feature_block        # tiny CPU run, same commands

A run is known by its effective pretraining arguments: each row's full ``run_pretraining.py`` command is parsed
with run_pretraining's own parser and checks, and keyed on the resulting Namespace without the output, log and
metrics paths and the device (where a run trains, not what it trains); a flag whose default stands for the
model's own value (``--decoder_dim``, ``--context_blocks``, ...) is keyed on the value the model is built with,
so ``--decoder_dim 512`` and the default are one run. Rows with the same key, in one table or several, share one
run directory, ``<out>/runs/<key>/``:

1. ``pretrain/``: ``run_pretraining.py <table base> <row flags>`` under torchrun with ``--nproc`` processes
   (``--launcher local``: one plain process); the total batch of the setting is kept (ImageNet: 4096 through
   ``--update_freq``; CIFAR-10: 512 split over the processes). Trained once; it resumes by itself when
   interrupted. A row without pretraining gets a freshly initialised checkpoint (``init/``) instead. A flag
   value ``tables.checkpoint_of(table, row)`` is that row's final checkpoint (Tables 3 and 9: Table 1's
   MAE-800), whose pretraining runs first when it is missing (``--mae_checkpoint`` gives one instead).
2. ``finetune/``: the fine-tuning recipe of the setting (scripts/finetune/bootmae_base_finetune.sh for the paper's
   tables, scripts/finetune/bootmae_tiny_cifar10.sh for the report's) on the online encoder (``model``).
3. ``linear/`` (report tables): scripts/linear/bootmae_tiny_cifar10_linprobe.sh.

Each stage ends with a marker (``pretrain/metrics.json``, ``<stage>/result.json``); a finished stage is reused,
and a stage that another process (another slurm task) is running is waited for (a POSIX lock in the run
directory; ``--no_wait`` leaves the row for a later invocation instead, as the .sbatch files do). Each row
then writes ``<out>/<table>/<row>/metrics.json``: ``finetune_top1`` and ``linear_top1`` (best top-1 of the
evaluation's log), ``pretrain`` (the pretraining run's final metrics: losses, median s/step, ...), the run's
flags and key; ``<row>/run`` links to the run directory. A row with ``metrics.json`` is skipped (``--force``
runs its commands again: each resumes, so a finished stage only reports).
``gather.py`` turns the JSON files into the table next to the published numbers.

``--dry_run`` prints each distinct pretraining once: its commands, the rows that use it, what it needs and what
needs it, and a GPU-hour estimate (see ``TIMING``), then the totals. ``--smoke`` runs the same commands with
size overrides appended (a tiny model, the demo photos, one epoch of two steps; ``SMOKE``), on the CPU through
torchrun with one process, under ``<out>/smoke/``.
"""
import argparse
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shlex
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import checkpoints  # noqa: E402
import flops  # noqa: E402
import pretraining_args  # noqa: E402
import pretraining_state  # noqa: E402
import tables  # noqa: E402
import utils  # noqa: E402
from engine_for_pretraining import target_patch_count  # noqa: E402

EVAL_SCRIPTS = {
    "imagenet": {"finetune": "scripts/finetune/bootmae_base_finetune.sh"},
    "cifar10": {"finetune": "scripts/finetune/bootmae_tiny_cifar10.sh",
                "linear": "scripts/linear/bootmae_tiny_cifar10_linprobe.sh"},
}
TOTAL_BATCH = {"imagenet": 4096, "cifar10": 512}
IMAGES = {"imagenet": 1_281_167, "cifar10": 50_000}   # training images per epoch (ImageNet-1k train, CIFAR-10)

# GPU-hour estimates scale a measured training step by FLOPs: hours = epochs x images x (the run's FLOPs per
# image / the measured configuration's, flops.py's analytic count) x seconds per image of the
# measured configuration. Per setting: its run_pretraining.py flags, seconds per image, and the source (README).
TIMING = {
    "imagenet": (("--model", "bootmae_base"), 0.0724 / 256,
                 "BootMAE-B/16 at 224 px: 72.4 ms per step of 256 images on one H100, bf16, compiled "
                 "(README, Performance)"),
    "cifar10": (("--model", "bootmae_tiny", "--input_size", "32", "--patch_size", "4", "--mask_num", "48",
                 "--num_mask_patches", "39", "--decoder_dim", "128"), 0.085 / 256,
                "BootMAE-Tiny at 32 px in 4 px patches, decoder width 128: 0.085 s per step of 256 images on one "
                "H100, eager (README, Learning check)"),
}

# --smoke: flags appended to each stage's real command (the last value of a repeated flag wins). The paper's
# setting shrinks ViT-B at 224 px to BootMAE-Tiny at 32 px in 8 px patches (masks scaled to 16 patches); the
# report's setting keeps its model and input. Every run: the demo photos, one epoch of two steps, the CPU.
SMOKE_RUN = ("--data_set", "demo", "--demo_size", "4", "--batch_size", "2", "--epochs", "1", "--warmup_epochs", "0",
             "--num_workers", "0", "--device", "cpu")
SMOKE = {
    "imagenet": {"pretrain": ("--model", "bootmae_tiny", "--input_size", "32", "--patch_size", "8", "--mask_num", "12",
                              "--num_mask_patches", "10", "--min_mask_patches_per_block", "2",
                              "--max_mask_patches_per_block", "6", "--update_freq", "1") + SMOKE_RUN,
                 "finetune": ("--model", "bootmae_tiny_patch16_224", "--input_size", "32", "--patch_size", "8",
                              "--update_freq", "1", "--nb_classes", "0") + SMOKE_RUN},
    "cifar10": {"pretrain": ("--update_freq", "1") + SMOKE_RUN, "finetune": ("--nb_classes", "0") + SMOKE_RUN,
                "linear": SMOKE_RUN},
}
# a pixel-only warm-up needs an epoch after it: one warm-up epoch of two
SMOKE_WARMUP = ("--pixel_warmup_epochs", "1", "--epochs", "2")

# Namespace entries that do not change what a run trains
KEY_IGNORED = ("output_dir", "log_dir", "metrics_json", "device")


def parse_pretraining(flags, stand_in=None):
    """run_pretraining's Namespace of ``flags`` after its checks. ``stand_in``: an existing file that replaces
    ``--target_checkpoint`` for the checks (the checkpoint of a pretraining that has not run yet)."""
    parser = argparse.ArgumentParser("run_table", parents=[pretraining_args.get_args_parser()])
    args = parser.parse_args(list(flags))
    path = args.target_checkpoint
    if stand_in:
        args.target_checkpoint = stand_in
    pretraining_args.check_args(args)
    args.target_checkpoint = path
    return args


@functools.lru_cache(maxsize=None)
def _model_facts(flags):
    """(architecture in the flags' terms, training FLOPs per image) of the model that ``flags`` build."""
    args = parse_pretraining(flags, stand_in=__file__ if "--target_checkpoint" in flags else None)
    with torch.device("meta"):   # no memory, no initialisation
        model = pretraining_state.build_model(args)
    decoder = model.pixel_decoder or model.feature_decoder
    arch = dict(patch_size=model.patch_size, encoder_dim=model.embed_dim, encoder_depth=len(model.blocks),
                encoder_heads=model.num_heads, decoder_dim=model.decoder_dim, decoder_depth=len(decoder.blocks),
                decoder_num_heads=decoder.blocks[0].attn.num_heads, feature_decoder_dim=model.feature_decoder_dim,
                context_blocks=list(model.context_blocks))
    patches = (args.input_size // model.patch_size) ** 2
    fed = target_patch_count(args.target_fraction, patches) if args.target_fraction < 1 else None
    # MAE-new feeds a fast and a slow target network
    return arch, flops.train_step_flops(model, patches, args.mask_num, fed,
                                        teachers=2 if args.target_encoder == "mae_new" else 1)


def _digest(obj):
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Run:
    """One distinct pretraining (``flags``; None: a freshly initialised encoder) and its evaluations."""

    def __init__(self, key, setting, flags, args, deps, gflops):
        self.key, self.setting, self.flags, self.args, self.deps, self.gflops = key, setting, flags, args, deps, gflops
        self.rows = []

    @property
    def label(self):
        table, row = self.rows[0]
        return tables.TABLES[table].row(row).label

    def hours(self):
        """Estimated GPU-hours of the pretraining (see TIMING); 0 for a freshly initialised encoder."""
        if self.flags is None:
            return 0.0
        ref_flags, seconds, _ = TIMING[self.setting]
        ref = _model_facts(tuple(ref_flags) + ("--data_set", "demo"))[1]
        return self.args.epochs * IMAGES[self.setting] * self.gflops * 1e9 / ref * seconds / 3600


class Planner:
    """Maps rows to runs: parses each row's command, keys it, and wires the checkpoints rows take from others."""

    def __init__(self, opts):
        self.opts = opts
        self.runs = {}       # key -> Run, in the order first needed (dependencies first)
        self.of_row = {}     # (table, row) -> Run

    def run_dir(self, run):
        return os.path.join(self.opts.out, "runs", run.key)

    def checkpoint(self, run):
        return os.path.join(self.run_dir(run), "init" if run.flags is None else "pretrain",
                            "checkpoint-init.pth" if run.flags is None else "checkpoint-last.pth")

    def pretrain_flags(self, table, row, deps):
        """The row's full run_pretraining.py flags, except the output paths."""
        o = self.opts

        def checkpoint(table_key, row_key):
            if o.mae_checkpoint:
                return o.mae_checkpoint
            dep_table = tables.TABLES[table_key]
            dep = self.plan(dep_table, dep_table.row(row_key))
            deps.append(dep)
            return self.checkpoint(dep)

        flags = tables.command_flags(table, row, checkpoint)
        per_process = 256 if table.setting == "imagenet" else TOTAL_BATCH["cifar10"] // o.nproc
        update_freq = max(1, TOTAL_BATCH[table.setting] // (o.nproc * per_process))
        flags += ["--batch_size", str(per_process), "--update_freq", str(update_freq), "--data_path",
                  o.data_paths[table.setting], *o.extra]
        if o.smoke:
            flags += SMOKE[table.setting]["pretrain"]
            if pretraining_args.get_args_parser().parse_known_args(flags)[0].pixel_warmup_epochs:
                flags += SMOKE_WARMUP
        return flags

    def plan(self, table, row):
        if (table.key, row.key) in self.of_row:
            return self.of_row[(table.key, row.key)]
        deps = []
        if row.flags is None:   # the table's model, freshly initialised
            flags = list(table.base) + (list(SMOKE[table.setting]["pretrain"]) if self.opts.smoke else [])
            args = parse_pretraining(flags)
            key_args, gflops, pretrains = vars(args), 0.0, None
        else:
            flags = self.pretrain_flags(table, row, deps)
            try:
                args = parse_pretraining(flags, stand_in=__file__ if deps else None)
            except utils.UsageError as e:
                raise utils.UsageError(f"{table.key}/{row.key}: {utils.one_line_error(e)}") from None
            arch, gflops = _model_facts(tuple(flags))
            key_args = {**vars(args), **arch}
            if deps:   # the checkpoint by the run that makes it, wherever --out is
                key_args["target_checkpoint"] = f"run:{deps[0].key}"
            gflops, pretrains = gflops / 1e9, flags
        key_args = {k: v for k, v in key_args.items() if k not in KEY_IGNORED}
        key = ("init-" if row.flags is None else "") + _digest(key_args)
        run = self.runs.setdefault(key, Run(key, table.setting, pretrains, args, deps, gflops))
        run.rows.append((table.key, row.key))
        self.of_row[(table.key, row.key)] = run
        return run

    def pretrain_command(self, run):
        o, out = self.opts, os.path.join(self.run_dir(run), "pretrain")
        flags = run.flags + ["--output_dir", out, "--metrics_json", os.path.join(out, "metrics.json")]
        if o.launcher == "local":
            return [o.python, "run_pretraining.py", *flags]
        return [o.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(o.nproc),
                "run_pretraining.py", *flags]

    def eval_commands(self, run):
        """{stage: (command, environment)} of the setting's evaluations of the run's checkpoint."""
        o, out = self.opts, {}
        for kind, script in EVAL_SCRIPTS[run.setting].items():
            env = {"FINETUNE": self.checkpoint(run), "DATA_PATH": o.data_paths[run.setting],
                   "OUTPUT_DIR": os.path.join(self.run_dir(run), kind), "NPROC": str(o.nproc), "GPUS": str(o.nproc),
                   "PYTHON": o.python}
            out[kind] = (["bash", script, *(SMOKE[run.setting][kind] if o.smoke else ())], env)
        return out


def init_checkpoint(args, path):
    """A freshly initialised model of the Namespace ``args`` (the "no pretraining" rows), in our layout."""
    torch.manual_seed(args.seed)
    model = pretraining_state.build_model(args)
    # save_on_master writes atomically (temporary file, then rename) and creates the folder
    checkpoints.save_on_master({"model": model.state_dict(), "epoch": -1, "args": checkpoints.args_dict(args)}, path)


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


class Busy(Exception):
    """Another process runs the stage and --no_wait is set."""


@contextlib.contextmanager
def locked(directory, stage, wait=True):
    """Holds ``<directory>/<stage>.lock`` (a POSIX lock, released when the process ends). When another process
    holds it: waits for it, or raises Busy if not ``wait``."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{stage}.lock"), "a") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if not wait:
                raise Busy(f"{stage} of {directory} is running in another process") from None
            print(f"# {stage} of {directory}: another process runs it; waiting", flush=True)
            fcntl.lockf(f, fcntl.LOCK_EX)
        yield


class Runner:
    def __init__(self, planner):
        self.planner, self.opts = planner, planner.opts

    def call(self, cmd, env=None):
        env = env or {}
        shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        print((shown + " " if shown else "") + shlex.join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, check=True)

    def pretrain(self, run):
        """Makes the run's checkpoint (its dependencies' first) unless a finished one is there."""
        for dep in run.deps:
            self.pretrain(dep)
        directory, p = self.planner.run_dir(run), self.planner
        done = os.path.join(directory, "pretrain", "metrics.json") if run.flags else p.checkpoint(run)
        if os.path.isfile(done) and not self.opts.force:
            print(f"# run {run.key}: pretraining done ({done}), reused", flush=True)
            return
        with locked(directory, "pretrain", not self.opts.no_wait):
            if os.path.isfile(done) and not self.opts.force:
                return
            if run.flags is None:
                print(f"# run {run.key}: freshly initialised encoder -> {done}", flush=True)
                init_checkpoint(run.args, done)
            else:
                print(f"# run {run.key}: pretraining ({run.label})", flush=True)
                self.call(p.pretrain_command(run))

    def evaluate(self, run, kind, cmd, env):
        directory = self.planner.run_dir(run)
        result = os.path.join(directory, kind, "result.json")
        if not os.path.isfile(result) or self.opts.force:
            with locked(directory, kind, not self.opts.no_wait):
                if not os.path.isfile(result) or self.opts.force:
                    self.call(cmd, env)
                    utils.write_json_atomic(result, {"top1": best_top1(os.path.join(directory, kind, "log.txt"))})
        with open(result) as f:
            return json.load(f)["top1"]

    def row(self, table, row):
        row_dir = os.path.join(self.opts.out, table.key, row.key)
        metrics_path = os.path.join(row_dir, "metrics.json")
        if os.path.isfile(metrics_path) and not self.opts.force:
            print(f"{table.key}/{row.key}: done ({metrics_path})", flush=True)
            return
        run = self.planner.of_row[(table.key, row.key)]
        print(f"# {table.key}/{row.key}: {row.label} (run {run.key})", flush=True)
        os.makedirs(row_dir, exist_ok=True)
        link, target = os.path.join(row_dir, "run"), os.path.relpath(self.planner.run_dir(run), row_dir)
        if os.path.islink(link) and os.readlink(link) != target:   # the row's flags changed since
            os.remove(link)
        if not os.path.islink(link):
            os.symlink(target, link)
        self.pretrain(run)
        metrics = {"table": table.key, "row": row.key, "label": row.label, "flags": run.flags, "run": run.key,
                   "run_dir": self.planner.run_dir(run)}
        for kind, (cmd, env) in self.planner.eval_commands(run).items():
            metrics[f"{kind}_top1"] = self.evaluate(run, kind, cmd, env)
        if run.flags is not None:
            with open(os.path.join(self.planner.run_dir(run), "pretrain", "metrics.json")) as f:
                metrics["pretrain"] = json.load(f)
        utils.write_json_atomic(metrics_path, metrics)
        print(f"{table.key}/{row.key}: {json.dumps({k: v for k, v in metrics.items() if k.endswith('_top1')})}",
              flush=True)


def _hours(h):
    return f"{h:,.1f}" if h < 100 else f"{h:,.0f}"


def dry_run(planner, selected):
    """Prints every distinct pretraining the selected rows need once, then the totals."""
    o = planner.opts
    needed_by = {}
    for run in planner.runs.values():
        for dep in run.deps:
            needed_by.setdefault(dep.key, []).append(run.key)
    chosen = set(selected)
    runs = list(planner.runs.values())
    for i, run in enumerate(runs, 1):
        if run.flags is None:
            what = "no pretraining: a freshly initialised encoder"
        elif o.smoke:
            what = f"{run.args.epochs} epoch(s), smoke size"
        else:
            what = (f"~{_hours(run.hours())} GPU-hours ({run.gflops:.1f} GFLOP/image x {run.args.epochs} epochs x "
                    f"{IMAGES[run.setting]:,} images)")
        print(f"## run {i}/{len(runs)}: {run.key}  {what}")
        rows = [f"{t}/{r}" + ("" if (t, r) in chosen else " (not selected)") for t, r in run.rows]
        print(f"rows: {', '.join(rows)}")
        if run.deps:
            print("needs: " + ", ".join(f"{d.key} ({', '.join('/'.join(r) for r in d.rows)}): {planner.checkpoint(d)}"
                                        for d in run.deps))
        if run.key in needed_by:
            print("needed by: " + ", ".join(f"{k} ({', '.join('/'.join(r) for r in planner.runs[k].rows)})"
                                            for k in needed_by[run.key]))
        if run.flags is not None:
            print(shlex.join(planner.pretrain_command(run)))
        for cmd, env in planner.eval_commands(run).values():
            print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(cmd))
        print()
    pretraining = [r for r in runs if r.flags is not None]
    used = {planner.of_row[s].key: planner.of_row[s] for s in selected}
    rows_pretraining = sum(1 for s in selected if planner.of_row[s].flags is not None)
    print(f"rows: {len(selected)}, of which {rows_pretraining} pretrain; distinct pretrainings: {len(pretraining)} "
          f"({len(pretraining) - sum(1 for r in used.values() if r.flags is not None)} of them only as a dependency); "
          f"evaluations: {len(used)} (one per run the rows use)")
    if not o.smoke:
        for setting in sorted({r.setting for r in pretraining}):
            hours = sum(r.hours() for r in pretraining if r.setting == setting)
            each = sum(planner.of_row[s].hours() for s in selected if planner.of_row[s].setting == setting)
            print(f"{setting} pretraining: ~{_hours(hours)} GPU-hours on H100s (~{_hours(each)} with one "
                  f"pretraining per row); basis: {TIMING[setting][2]}, scaled by each run's FLOPs per image "
                  f"(flops.py) and epochs")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", choices=list(tables.TABLES) + ["all"])
    p.add_argument("--rows", nargs="+", default=None, help="row keys to run (default: all)")
    p.add_argument("--row_index", type=int, default=None, help="run only the row at this index (slurm array task)")
    p.add_argument("--data_path", default=os.environ.get("DATA_PATH"),
                   help="ImageNet folder (paper tables) or the CIFAR-10 folder (report tables)")
    p.add_argument("--cifar_data_path", default=os.environ.get("CIFAR_DATA_PATH"),
                   help="with all: the CIFAR-10 folder for the report's tables (--data_path: ImageNet)")
    p.add_argument("--mae_checkpoint", default=os.environ.get("MAE_CHECKPOINT") or None,
                   help="an 800-epoch MAE encoder (MAE's checkpoint, ours or the release's) for the feature-target "
                        "rows, instead of Table 1's MAE-800")
    p.add_argument("--out", default=os.path.join(ROOT, "output", "ablations"))
    p.add_argument("--launcher", default="torchrun", choices=["torchrun", "local"])
    p.add_argument("--nproc", type=int, default=int(os.environ.get("GPUS", "8")), help="processes (GPUs) per row")
    p.add_argument("--python", default=os.environ.get("PYTHON", sys.executable))
    p.add_argument("--dry_run", action="store_true", help="print each distinct pretraining, its cost and commands")
    p.add_argument("--force", action="store_true", help="run rows that have metrics.json again")
    p.add_argument("--no_wait", action="store_true",
                   help="leave a row for later when another process is running its run (slurm array tasks)")
    p.add_argument("--smoke", action="store_true",
                   help="the same commands with size overrides (tiny model, demo photos, one epoch, CPU, one process)")
    args, extra = p.parse_known_args()
    args.extra = extra   # further run_pretraining.py flags, appended to every row (e.g. --amp fp16)
    keys = list(tables.TABLES) if args.table == "all" else [args.table]
    if args.table == "all" and (args.rows or args.row_index is not None):
        p.error("--rows and --row_index choose rows of one table; name the table instead of all")
    rows = [(tables.TABLES[k], r) for k in keys for r in tables.TABLES[k].rows]
    if args.row_index is not None:
        if not 0 <= args.row_index < len(rows):
            p.error(f"--row_index {args.row_index} is outside 0..{len(rows) - 1} ({args.table} has {len(rows)} rows)")
        rows = [rows[args.row_index]]
    if args.rows:
        unknown = set(args.rows) - {r.key for _, r in rows}
        if unknown:
            p.error(f"unknown rows {sorted(unknown)}; {args.table} has {', '.join(r.key for _, r in rows)}")
        rows = [(t, r) for t, r in rows if r.key in args.rows]
    settings = {t.setting for t, _ in rows}
    paths = {"imagenet": args.data_path,
             "cifar10": args.cifar_data_path if args.table == "all" else args.data_path}
    if args.smoke:   # the demo photos
        args.nproc, paths = 1, {s: paths[s] or "demo" for s in paths}
        args.out = os.path.join(args.out, "smoke")
    for setting, flag, what in (("imagenet", "--data_path (or DATA_PATH)", "the ImageNet folder (train/, val/)"),
                                ("cifar10", "--cifar_data_path (or CIFAR_DATA_PATH)" if args.table == "all" else
                                 "--data_path (or DATA_PATH)", "the folder holding cifar-10-batches-py/")):
        if setting in settings and not paths[setting]:
            p.error(f"{flag} is required: {what}")
    args.data_paths = {s: v if args.smoke else os.path.abspath(v) for s, v in paths.items() if v}
    if args.nproc < 1:
        p.error("--nproc must be at least 1")
    if args.launcher == "local":
        args.nproc = 1
    if args.mae_checkpoint and not os.path.isfile(args.mae_checkpoint):
        p.error(f"--mae_checkpoint {args.mae_checkpoint} does not exist; give an MAE encoder checkpoint or leave it "
                f"out (Table 1's MAE-800 is used)")
    args.out = os.path.abspath(args.out)
    args.mae_checkpoint = args.mae_checkpoint and os.path.abspath(args.mae_checkpoint)
    planner = Planner(args)
    try:
        for table, row in rows:
            planner.plan(table, row)
    except utils.UsageError as e:
        print(f"error: {utils.one_line_error(e)}", file=sys.stderr)
        sys.exit(2)
    if args.dry_run:
        dry_run(planner, [(t.key, r.key) for t, r in rows])
        return
    runner = Runner(planner)
    for table, row in rows:
        try:
            runner.row(table, row)
        except Busy as e:
            print(f"{table.key}/{row.key}: left for later: {e} (--no_wait)", flush=True)


if __name__ == "__main__":
    main()
