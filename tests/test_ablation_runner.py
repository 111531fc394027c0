"""The ablation table runner (scripts/ablations/run_table.py) and its scripts: a run is known by its effective
pretraining arguments, so rows that train the same run share it (in one table or across tables); rows that need
another row's checkpoint get it from that row's run, trained first; --dry_run prints each distinct pretraining
once with its cost; --smoke runs the tables' own commands at toy size through torchrun on the CPU, and every
scripts/ablations/*.sh gets there.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts", "ablations"))

import run_table  # noqa: E402
import tables  # noqa: E402

ABLATIONS = os.path.join(ROOT, "scripts", "ablations")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}


def dry_run(capsys, monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["run_table.py", *argv, "--dry_run"])
    run_table.main()
    return capsys.readouterr().out


def blocks(text):
    """{key: {"rows": [...], "needs": [...], "head": str, "lines": [...]}} of a dry run's run blocks."""
    out = {}
    for block in text.split("## run ")[1:]:
        lines = block.strip().splitlines()
        key = lines[0].split()[1]
        rows = next(line for line in lines if line.startswith("rows: "))[6:]
        needs = [line for line in lines if line.startswith("needs: ")]
        out[key] = dict(head=lines[0], lines=lines, needs=re.findall(r"(\w+) \(", needs[0][7:]) if needs else [],
                        rows=[r.split()[0] for r in rows.split(", ")])
    return out


def test_dry_run_of_all_tables_trains_each_distinct_run_once(capsys, monkeypatch, tmp_path):
    text = dry_run(capsys, monkeypatch, "all", "--data_path", "/data/imagenet", "--cifar_data_path", "/data/cifar",
                   "--out", str(tmp_path))
    # before: one pretraining per row that pretrains (55); after: 12 fewer
    assert "rows: 56, of which 55 pretrain; distinct pretrainings: 43 (0 of them only as a dependency); " \
           "evaluations: 44" in text
    runs = blocks(text)
    assert len(runs) == 44
    by_row = {row: key for key, b in runs.items() for row in b["rows"]}
    assert len(by_row) == 56

    def shared(*rows):
        return len({by_row[r] for r in rows}) == 1 and len(runs[by_row[rows[0]]]["rows"]) == len(rows)
    assert shared("paper_t1/mae_300", "paper_t3/pixel_random", "paper_t5/mae", "paper_t9/pixel_300")
    # the default written out (--decoder_dim 512, --context_blocks 0 11) is the default
    assert shared("paper_t2/ctx_both", "paper_t4/depth_2", "paper_t4/width_512", "paper_t5/frac_100",
                  "paper_t8/pix_low_fea_high")
    assert shared("paper_t1/mae_800", "paper_t9/pixel_800") and shared("paper_t1/mae_1600", "paper_t9/pixel_1600")
    assert shared("paper_t1/boot_noctx_300", "paper_t2/ctx_none")
    assert shared("paper_t3/feature_block", "paper_t9/feature_300")
    assert shared("report_ema_mae/tau_0.005_wse_5", "report_mae_new/ema_mae")
    # every fixed-feature row takes Table 1's MAE-800 checkpoint, which is printed (and so trained) first
    mae800 = by_row["paper_t1/mae_800"]
    order = list(runs)
    dependents = [by_row[f"paper_t3/feature_{m}"] for m in ("random", "block", "release")] + \
        [by_row["paper_t9/feature_800"]]
    checkpoint = os.path.join(str(tmp_path), "runs", mae800, "pretrain", "checkpoint-last.pth")
    for key, b in runs.items():
        assert b["needs"] == ([mae800] if key in dependents else []), key
        if key in dependents:
            assert order.index(mae800) < order.index(key)
            assert f"--target_checkpoint {checkpoint}" in "\n".join(b["lines"])
    assert f"needed by: {dependents[0]}" in "\n".join(runs[mae800]["lines"])
    # the estimate: BootMAE-B, 300 epochs of ImageNet at the measured 72.4 ms per 256 images
    hours = 300 * 1_281_167 * 0.0724 / 256 / 3600
    assert runs[by_row["paper_t2/ctx_both"]]["head"].endswith(
        f"~{hours:.1f} GPU-hours (93.6 GFLOP/image x 300 epochs x 1,281,167 images)")
    assert "imagenet pretraining: ~997 GPU-hours on H100s (~1,384 with one pretraining per row)" in text


def test_one_table_plans_its_dependency_and_keys_do_not_depend_on_the_output(capsys, monkeypatch, tmp_path):
    a = blocks(dry_run(capsys, monkeypatch, "paper_t3", "--data_path", "/d", "--out", str(tmp_path / "a")))
    text = dry_run(capsys, monkeypatch, "paper_t3", "--data_path", "/d", "--out", str(tmp_path / "b"))
    assert blocks(text).keys() == a.keys()
    assert "rows: 6, of which 6 pretrain; distinct pretrainings: 7 (1 of them only as a dependency)" in text
    assert "rows: paper_t1/mae_800 (not selected)" in text
    # another data set is another run
    other = blocks(dry_run(capsys, monkeypatch, "paper_t3", "--data_path", "/other", "--out", str(tmp_path / "a")))
    assert not set(other) & set(a)


def _same_run(flags):
    return ["<checkpoint>" if i and flags[i - 1] == "--target_checkpoint" else f for i, f in enumerate(flags)]


def test_smoke_commands_are_the_tables_commands_with_size_overrides(monkeypatch):
    """Every row of every table in --smoke: its command is the real one plus SMOKE's flags, and it passes
    run_pretraining's checks."""
    opts = run_table.argparse.Namespace(out="/o", nproc=1, launcher="torchrun", python="py", extra=[], smoke=True,
                                        mae_checkpoint=None, data_paths={"imagenet": "demo", "cifar10": "demo"})
    real = run_table.argparse.Namespace(**{**vars(opts), "smoke": False})
    smoke_planner, real_planner = run_table.Planner(opts), run_table.Planner(real)
    for table in tables.TABLES.values():
        for row in table.rows:
            run, plain = smoke_planner.plan(table, row), real_planner.plan(table, row)
            if row.flags is None:
                assert run.flags is None and plain.flags is None
                continue
            overrides = list(run_table.SMOKE[table.setting]["pretrain"])
            warmup = row.expect.get("pixel_warmup", 0) > 0
            if warmup:
                overrides += run_table.SMOKE_WARMUP
            flags = smoke_planner.pretrain_flags(table, row, [])
            # the MAE-800 checkpoint is the smoke run's
            assert _same_run(flags) == _same_run(real_planner.pretrain_flags(table, row, []) + overrides), row.key
            args = run.args   # parsed and checked by run_pretraining (a shared run: the same but the epochs)
            assert (args.epochs, args.pixel_warmup_epochs) == ((2, 1) if warmup else (1, 0))
            assert args.device == "cpu" and args.data_set == "demo" and args.batch_size == 2
    evals = smoke_planner.eval_commands(smoke_planner.of_row[("report_mae", "mae")])
    assert evals["linear"][0] == ["bash", "scripts/linear/bootmae_tiny_cifar10_linprobe.sh",
                                  *run_table.SMOKE["cifar10"]["linear"]]


def _stub(tmp_path):
    """A stand-in for Python that prints the arguments it is given as JSON."""
    stub = tmp_path / "python"
    stub.write_text("#!/usr/bin/env bash\nprintf '%s\\n' \"$@\" | " + sys.executable
                    + " -c 'import json, sys; print(json.dumps(sys.stdin.read().splitlines()))'\n")
    stub.chmod(0o755)
    return str(stub)


@pytest.mark.parametrize("key", list(tables.TABLES))
def test_scripts_pass_the_table_and_settings(key, tmp_path):
    stub = _stub(tmp_path)
    table = tables.TABLES[key]
    gpus = "8" if table.setting == "imagenet" else "1"
    needs_mae = any(tables.dependencies(r) for r in table.rows)

    def argv(script, **env):
        proc = subprocess.run(["bash", os.path.join(ABLATIONS, script), "--rows", "x"], capture_output=True,
                              text=True, env={**os.environ, "PYTHON": stub, "GPUS": "", "SMOKE": "",
                                              "MAE_CHECKPOINT": "", **env}, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)
    assert argv(f"{key}.sh", DATA_PATH="/d") == ["scripts/ablations/run_table.py", key, "--data_path", "/d",
                                                 "--nproc", gpus, "--out", "output/ablations", "--rows", "x"]
    smoke = argv(f"{key}.sh", SMOKE="1", MAE_CHECKPOINT="/m.pth", GPUS="2", OUT="/o")
    assert smoke == ["scripts/ablations/run_table.py", key, "--smoke"] + (
        ["--mae_checkpoint", "/m.pth"] if needs_mae else []) + ["--nproc", "2", "--out", "/o", "--rows", "x"]
    with open(os.path.join(ABLATIONS, f"{key}.sbatch")) as f:
        assert f"#SBATCH --array=0-{len(table.rows) - 1}\n" in f.read()
    assert argv(f"{key}.sbatch", SLURM_ARRAY_TASK_ID="3", DATA_PATH="/d") == [
        "scripts/ablations/run_table.py", key, "--row_index", "3", "--no_wait", "--data_path", "/d", "--nproc", gpus,
        "--out", "output/ablations", "--rows", "x"]
    scripts = {f for f in os.listdir(ABLATIONS) if f.endswith((".sh", ".sbatch"))}
    assert scripts == {f"{k}.{e}" for k in tables.TABLES for e in ("sh", "sbatch")} | {"cifar10_cpu.sh"}


def test_every_script_runs_in_smoke_mode(tmp_path):
    """Real runs through the scripts, at once: Table 3's fixed-feature row (which trains Table 1's MAE-800 first,
    then itself, then fine-tunes), the report's MAE row (pretraining, fine-tuning, linear probe) and the CPU
    CIFAR-10 comparison on a made-up npz set. Then a row of Table 9 identical to Table 3's reuses its run, a
    rerun skips the finished row, and gather.py prints the table."""
    out = tmp_path / "out"
    env = {**ENV, "SMOKE": "1", "OUT": str(out)}
    rng = np.random.default_rng(0)
    npz = tmp_path / "npz"
    npz.mkdir()
    for split, n in (("train", 640), ("test", 100)):
        np.savez(npz / f"{split}.npz", images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 labels=np.arange(n) % 10)
    commands = {
        "paper_t3": ["bash", "scripts/ablations/paper_t3.sh", "--rows", "feature_block"],
        "report_mae": ["bash", "scripts/ablations/report_mae.sh", "--rows", "mae"],
        "cifar10_cpu": ["bash", "scripts/ablations/cifar10_cpu.sh", "--data_path", str(npz), "--out",
                        str(tmp_path / "cpu"), "--seeds", "0", "--variants", "mae", "--epochs", "1",
                        "--eval_images", "100", "--threads", "1", "--train_images", "640"],
    }
    procs = {k: subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k, c in commands.items()}
    logs = {k: p.communicate(timeout=600)[0] for k, p in procs.items()}
    for k, p in procs.items():
        assert p.returncode == 0, f"{k}:\n{logs[k][-3000:]}"

    smoke = out / "smoke"
    t3 = json.loads((smoke / "paper_t3" / "feature_block" / "metrics.json").read_text())
    mae800 = t3["flags"][t3["flags"].index("--target_checkpoint") + 1]
    assert mae800.startswith(str(smoke / "runs")) and os.path.isfile(mae800)
    assert logs["paper_t3"].count("run_pretraining.py") == 2   # MAE-800, then the row
    assert isinstance(t3["finetune_top1"], float) and t3["pretrain"]["epoch"] == 0
    assert os.path.realpath(smoke / "paper_t3" / "feature_block" / "run") == str(smoke / "runs" / t3["run"])
    report = json.loads((smoke / "report_mae" / "mae" / "metrics.json").read_text())
    assert isinstance(report["finetune_top1"], float) and isinstance(report["linear_top1"], float)
    assert "--mae" in report["flags"] and report["pretrain"]["train_feature_loss"] == 0
    assert "| MAE |" in logs["cifar10_cpu"]

    runs = sorted(os.listdir(smoke / "runs"))
    t9 = subprocess.run(["bash", "scripts/ablations/paper_t9.sh", "--rows", "feature_300"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
    assert t9.returncode == 0, t9.stdout[-3000:] + t9.stderr[-3000:]
    assert "run_pretraining.py" not in t9.stdout and "bash scripts/finetune" not in t9.stdout
    assert f"# run {t3['run']}: pretraining done" in t9.stdout and sorted(os.listdir(smoke / "runs")) == runs
    t9_metrics = json.loads((smoke / "paper_t9" / "feature_300" / "metrics.json").read_text())
    assert (t9_metrics["run"], t9_metrics["finetune_top1"]) == (t3["run"], t3["finetune_top1"])

    again = subprocess.run(["bash", "scripts/ablations/paper_t3.sh", "--rows", "feature_block"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.strip() == \
        f"paper_t3/feature_block: done ({smoke / 'paper_t3' / 'feature_block' / 'metrics.json'})"
    gather = subprocess.run([sys.executable, "scripts/ablations/gather.py", "paper_t3", "--out", str(smoke)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert gather.returncode == 0, gather.stderr
    assert (f"| feature target (fixed MAE encoder), block-wise masking | MAE feature + `--target_encoder fixed "
            f"--target_checkpoint <paper_t1/mae_800 checkpoint> --mask_type block` | 83.6 | "
            f"{t3['finetune_top1']:.2f} |") in gather.stdout


def test_no_pretraining_checkpoint_opens_with_plain_torch_load(tmp_path):
    """A "no pretraining" row's freshly initialised checkpoint: written atomically, args as plain values, so a
    plain torch.load (weights_only by default) opens it, and the encoder loads back into the same model."""
    import torch
    import run_pretraining
    args = run_pretraining.get_args_parser().parse_args(
        ["--model", "bootmae_tiny", "--input_size", "32", "--patch_size", "4", "--seed", "3"])
    path = str(tmp_path / "init" / "checkpoint-init.pth")
    run_table.init_checkpoint(args, path)
    assert sorted(os.listdir(tmp_path / "init")) == ["checkpoint-init.pth"]   # no temporary file left
    ckpt = torch.load(path)
    assert ckpt["epoch"] == -1 and isinstance(ckpt["args"], dict) and ckpt["args"]["seed"] == 3
    model = run_pretraining.build_model(args)
    model.load_state_dict(ckpt["model"])
    torch.manual_seed(3)
    again = run_pretraining.build_model(args).state_dict()
    assert all(torch.equal(again[k], v) for k, v in ckpt["model"].items())
