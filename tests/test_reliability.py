"""Nothing lost: runs killed inside a checkpoint write, a full disk during a save, auto-resume past an unreadable
checkpoint, the warning for a resume with another schedule, and checkpoints that ``torch.load(path)`` opens
with PyTorch's defaults (``args`` a plain dict) while Namespace ``args`` (the release's, our older files) still
load.

The pretraining runs use bootmae_tiny at 32 px on 8 demo photos, one step per epoch, on the CPU.
"""
import argparse
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import checkpoints  # noqa: E402
import engine_for_linprobe  # noqa: E402
import main_linprobe  # noqa: E402
import run_class_finetuning  # noqa: E402
import run_pretraining  # noqa: E402
import utils  # noqa: E402
from shared_helpers import clean_env, read_log  # noqa: E402

TINY = ["--model", "bootmae_tiny", "--input_size", "32", "--decoder_dim", "64", "--decoder_depth", "1",
        "--mask_num", "3", "--num_mask_patches", "2", "--min_mask_patches_per_block", "1",
        "--max_mask_patches_per_block", "2", "--warmup_epochs", "1", "--min_lr", "1e-6", "--num_workers", "0",
        "--print_freq", "100", "--data_set", "demo", "--demo_size", "8", "--batch_size", "8", "--save_ckpt_freq", "1"]

# Runs an entry point with torch.save replaced: the Nth save (counted in this process) writes a few bytes into
# the open temporary file, then stalls until the test kills the process.
WRAPPER = """
import os, runpy, sys, time
import torch

nth, marker, script = int(sys.argv[1]), sys.argv[2], sys.argv[3]
sys.argv = [script] + sys.argv[4:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
_save, calls = torch.save, [0]

def save(obj, f, *args, **kwargs):
    calls[0] += 1
    if calls[0] == nth:
        f.write(b"half a checkpoint")
        f.flush()
        with open(marker, "w") as m:
            m.write(f.name)
        time.sleep(600)
    return _save(obj, f, *args, **kwargs)

torch.save = save
runpy.run_path(script, run_name="__main__")
"""


def _kill_inside_save(tmp_path, nth, argv):
    """Starts the run, waits until its ``nth`` save has half-written its temporary file, kills it (SIGKILL)."""
    wrapper = tmp_path / "save_hook.py"
    wrapper.write_text(WRAPPER)
    marker = tmp_path / f"marker-{nth}-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, str(wrapper), str(nth), str(marker), "run_pretraining.py", *argv],
                            cwd=ROOT, env=clean_env(OMP_NUM_THREADS=1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not marker.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (exit {proc.returncode}) before save {nth}:\n{out[-2000:]}\n{err[-2000:]}")
        assert time.time() < deadline, "no save within 240 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return marker.read_text()   # the temporary file it was writing


def _log_epochs(out):
    return [record["epoch"] for record in read_log(out)]


def _run_cli(module, argv, monkeypatch, capsys):
    """The entry point's command line in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", [module.__file__, *argv])
    code = 0
    try:
        module.cli()
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _temporaries(out):
    return [name for name in os.listdir(out) if ".tmp" in name]


# ---------------------------------------------------------------------------------------------- kills

def test_kills_inside_checkpoint_writes_lose_no_epoch(tmp_path, monkeypatch, capsys):
    """Per epoch the run writes its log.txt record, checkpoint-<epoch>.pth (save 2e+1) and checkpoint-last.pth
    (save 2e+2). Killed inside the numbered write of epoch 1, inside the last-write of epoch 1 (its record and
    numbered file already there) and inside the last-write of epoch 2, then run to the end: every epoch has
    exactly one record and its numbered checkpoint, and no temporary file is left."""
    out = str(tmp_path / "out")
    argv = TINY + ["--epochs", "3", "--output_dir", out]
    # each rerun resumes from checkpoint-last.pth (epoch 0, then 0 again, then 1): its saves count from 1
    for nth, half_written in ((3, "checkpoint-1.pth"), (2, "checkpoint-last.pth"), (4, "checkpoint-last.pth")):
        tmp = _kill_inside_save(tmp_path, nth, argv)
        assert os.path.basename(tmp).startswith(half_written + ".tmp.") and os.path.exists(tmp)
        assert _temporaries(out) == [os.path.basename(tmp)]   # the next run removed the one before
    assert checkpoints.load_checkpoint(os.path.join(out, "checkpoint-last.pth"))["epoch"] == 1
    code, stdout, err = _run_cli(run_pretraining, argv, monkeypatch, capsys)
    assert code == 0, err
    assert "continuing at epoch 2" in stdout
    assert stdout.count("a checkpoint an interrupted run did not finish") == 1
    assert "1 record(s) from epoch 2 on dropped, left by an interrupted run" in stdout
    assert _log_epochs(out) == [0, 1, 2]
    for epoch in range(3):
        assert checkpoints.load_checkpoint(os.path.join(out, f"checkpoint-{epoch}.pth"))["epoch"] == epoch
    assert checkpoints.load_checkpoint(os.path.join(out, "checkpoint-last.pth"))["epoch"] == 2
    assert _temporaries(out) == []


# ---------------------------------------------------------------------------------------------- full disk

def test_full_disk_is_one_line_and_keeps_the_earlier_checkpoints(tmp_path, monkeypatch, capsys):
    """A save that fails with ENOSPC (here the numbered checkpoint of epoch 1, the third save): one error line
    naming the file and the free space, exit status 1, the temporary file gone, epoch 0's checkpoints intact;
    the same command later finishes the run with one record per epoch."""
    out = str(tmp_path / "out")
    argv = TINY + ["--epochs", "2", "--output_dir", out]
    real_save, calls, half_written = torch.save, [], []

    def full_disk(obj, f, *args, **kwargs):
        calls.append(f.name)
        if len(calls) == 3:
            f.write(b"half a checkpoint")
            half_written.append(f.name)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    code, _, err = _run_cli(run_pretraining, argv, monkeypatch, capsys)
    monkeypatch.setattr(torch, "save", real_save)
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: cannot write {out}/checkpoint-1.pth (No space left on device); ")
    assert " MiB free on " in lines[0] and "it needs about" in lines[0]
    assert os.path.basename(half_written[0]).startswith("checkpoint-1.pth.tmp.") and _temporaries(out) == []
    assert checkpoints.load_checkpoint(os.path.join(out, "checkpoint-0.pth"))["epoch"] == 0
    assert checkpoints.load_checkpoint(os.path.join(out, "checkpoint-last.pth"))["epoch"] == 0
    assert not os.path.exists(os.path.join(out, "checkpoint-1.pth"))
    code, _, err = _run_cli(run_pretraining, argv, monkeypatch, capsys)
    assert code == 0, err
    assert _log_epochs(out) == [0, 1]
    assert checkpoints.load_checkpoint(os.path.join(out, "checkpoint-1.pth"))["epoch"] == 1


def test_unwritable_log_is_one_line(tmp_path, monkeypatch):
    real_open = open

    def no_permission(path, *args, **kwargs):
        if str(path).endswith("log.txt"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_permission)
    with pytest.raises(checkpoints.CheckpointWriteError,
                       match=r"cannot write .*log.txt \(Permission denied\); [0-9.]+ MiB free on "):
        checkpoints.append_log(str(tmp_path), {"epoch": 0})


# ---------------------------------------------------------------------------------------------- resume

def test_resume_falls_back_past_an_unreadable_last_and_warns_of_another_schedule(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "out")
    code, _, err = _run_cli(run_pretraining, TINY + ["--epochs", "2", "--output_dir", out], monkeypatch, capsys)
    assert code == 0, err
    last = os.path.join(out, "checkpoint-last.pth")
    with open(last, "r+b") as f:
        f.truncate(1000)
    # a longer run with another base lr and total batch (accumulation 2 over two batches of 4)
    argv = TINY + ["--epochs", "3", "--lr", "3e-4", "--batch_size", "4", "--update_freq", "2", "--output_dir", out]
    code, stdout, err = _run_cli(run_pretraining, argv, monkeypatch, capsys)
    assert code == 0, err
    skip = next(line for line in stdout.splitlines() if line.startswith("warning: auto-resume skips"))
    assert skip.startswith(f"warning: auto-resume skips {last}: cannot read checkpoint {last} (")
    assert skip.endswith(f"; resuming from {out}/checkpoint-1.pth")
    assert f"resume: {out}/checkpoint-1.pth (our format), continuing at epoch 2" in stdout
    warning = next(line for line in stdout.splitlines() if line.startswith("warning: resuming"))
    assert f"{out}/checkpoint-1.pth with another schedule: --epochs 2 -> 3, --lr 0.00015 -> 0.0003;" in warning
    assert "total batch" not in warning   # 8 x 1 and 4 x 2
    assert _log_epochs(out) == [0, 1, 2]
    assert checkpoints.load_checkpoint(last)["epoch"] == 2

    # the same schedule again (3 epochs, nothing left to train): no warning
    code, stdout, _ = _run_cli(run_pretraining, argv, monkeypatch, capsys)
    assert code == 0 and "continuing at epoch 3" in stdout and "warning: resuming" not in stdout
    # a total batch of 4: the warning says so
    argv = TINY + ["--epochs", "3", "--lr", "3e-4", "--batch_size", "4", "--output_dir", out]
    code, stdout, _ = _run_cli(run_pretraining, argv, monkeypatch, capsys)
    assert code == 0 and "another schedule: total batch 8 -> 4;" in stdout


def test_auto_resume_with_no_readable_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("checkpoint-last.pth", "checkpoint-4.pth"):
        (out / name).write_bytes(b"not a checkpoint")
    code, _, err = _run_cli(run_pretraining, TINY + ["--epochs", "2", "--output_dir", str(out)], monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: auto-resume found no readable checkpoint in {out}: cannot read checkpoint "
                          f"{out}/checkpoint-last.pth (")
    assert f"cannot read checkpoint {out}/checkpoint-4.pth (" in err


def test_resume_candidates_newest_first(tmp_path):
    for name in ("checkpoint-2.pth", "checkpoint-10.pth", "checkpoint-last.pth", "checkpoint-best.pth",
                 "checkpoint-3.pth.tmp.123"):
        (tmp_path / name).write_bytes(b"")
    assert [os.path.basename(p) for p in checkpoints.resume_candidates(str(tmp_path))] == \
        ["checkpoint-last.pth", "checkpoint-10.pth", "checkpoint-2.pth"]


def test_a_record_replaces_those_of_its_epoch_and_later(tmp_path, capsys):
    lines = [json.dumps({"epoch": e, "train_loss": 1.0}) for e in (0, 1, 2, 3)] + ['{"epoch": 4, "tra']
    (tmp_path / "log.txt").write_text("\n".join(lines))
    checkpoints.append_log(str(tmp_path), {"epoch": 2, "train_loss": 0.5})
    assert (tmp_path / "log.txt").read_text().splitlines() == lines[:2] + ['{"epoch": 2, "train_loss": 0.5}']
    assert "3 record(s) from epoch 2 on dropped" in capsys.readouterr().out
    checkpoints.append_log(str(tmp_path), {"epoch": 3, "train_loss": 0.25})   # nothing to drop
    assert _log_epochs(tmp_path) == [0, 1, 2, 3]
    assert "dropped" not in capsys.readouterr().out


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    keep = ["checkpoint-last.pth", "log.txt", "reconstruction.png", "metrics.json.tmp", "notes.pth.tmp.x"]
    stale = ["checkpoint-last.pth.tmp.4242", "checkpoint-7.pth.tmp.17"]
    for name in keep + stale:
        (tmp_path / name).write_bytes(b"x" * 10)
    checkpoints.remove_stale_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(keep)


# ---------------------------------------------------------------------------------------------- args

def test_new_checkpoints_open_with_plain_torch_load(tmp_path, monkeypatch, capsys):
    """Pretraining, fine-tuning and linear-probe checkpoints: ``torch.load(path)`` with its defaults."""
    out = str(tmp_path / "pre")
    code, _, err = _run_cli(run_pretraining, TINY + ["--epochs", "1", "--output_dir", out], monkeypatch, capsys)
    assert code == 0, err
    for name in ("checkpoint-0.pth", "checkpoint-last.pth"):
        ckpt = torch.load(os.path.join(out, name))
        assert ckpt["epoch"] == 0 and ckpt["args"]["model"] == "bootmae_tiny" and ckpt["args"]["epochs"] == 1
        assert ckpt["args"]["lr"] == 1.5e-4 and ckpt["args"]["world_size"] == 1
        assert all(isinstance(v, (type(None), bool, int, float, str, list, tuple)) for v in ckpt["args"].values())

    # fine-tuning: the numbered checkpoint, the best one, then the last one, each with plain args
    args = run_class_finetuning.get_args_parser().parse_args(["--output_dir", str(tmp_path / "ft"), "--epochs", "2"])
    args.opt_betas = (0.9, 0.999)
    os.makedirs(args.output_dir)
    model = torch.nn.Linear(3, 2)
    written = []
    real_save = checkpoints.save_on_master
    monkeypatch.setattr(checkpoints, "save_on_master", lambda obj, path: (written.append(os.path.basename(path)),
                                                                     real_save(obj, path)))
    run_class_finetuning.save_checkpoints(args, 1, model, torch.optim.AdamW(model.parameters()),
                                          utils.LossScaler("cpu", False), None, {"acc1": 50.0, "epoch": 1}, True)
    assert written == ["checkpoint-1.pth", "checkpoint-best.pth", "checkpoint-last.pth"]
    ckpt = torch.load(os.path.join(args.output_dir, "checkpoint-last.pth"))
    assert ckpt["args"]["epochs"] == 2 and ckpt["args"]["opt_betas"] == (0.9, 0.999) and ckpt["max_accuracy"] == 50

    # linear probe
    args = main_linprobe.get_args_parser().parse_args(["--output_dir", str(tmp_path / "lin"), "--finetune", "x.pth",
                                                        "--lr", "0.1"])
    os.makedirs(args.output_dir)
    model = torch.nn.Module()
    model.head = engine_for_linprobe.probe_head(4, 3)
    main_linprobe.save(args, "checkpoint-last.pth", model, engine_for_linprobe.build_optimizer(model.head, args), 0, 1.0,
                       {"acc1": 1.0})
    ckpt = torch.load(os.path.join(args.output_dir, "checkpoint-last.pth"))
    assert ckpt["args"]["finetune"] == "x.pth" and set(ckpt["model"]) >= {"head.1.weight", "head.1.bias"}


def test_namespace_args_still_load(tmp_path):
    """The release's checkpoints (and ours before args became a dict) hold an argparse.Namespace: plain
    ``torch.load`` refuses them, our loaders read them, and ``checkpoint_args`` gives both kinds alike."""
    old, new = str(tmp_path / "old.pth"), str(tmp_path / "new.pth")
    namespace = argparse.Namespace(model="bootmae_tiny", input_size=32, epochs=801, size="tiny", depth=12,
                                   global_pool=True, patch_size=None)
    torch.save({"model": {"w": torch.ones(1)}, "epoch": 3, "args": namespace}, old)
    torch.save({"model": {"w": torch.ones(1)}, "epoch": 3, "args": checkpoints.args_dict(namespace)}, new)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(old)
    assert torch.load(new)["args"] == vars(namespace)
    for path in (old, new):
        resumed, ckpt = checkpoints.load_resume_checkpoint(path, "", True)
        assert resumed == path and ckpt["epoch"] == 3
        assert checkpoints.checkpoint_args(ckpt) == namespace
        # the linear probe's checks read either kind
        probe = argparse.Namespace(size="tiny", depth=12, global_pool=True, patch_size=None, finetune="",
                                   model_key="model|module")
        main_linprobe.inherit_from_checkpoint(probe, checkpoints.checkpoint_args(ckpt), path)
        main_linprobe.check_matches_checkpoint(probe, checkpoints.checkpoint_args(ckpt), path)
        probe.depth = 6
        with pytest.raises(utils.UsageError, match="--depth 6 differs from the 12"):
            main_linprobe.check_matches_checkpoint(probe, checkpoints.checkpoint_args(ckpt), path)
    assert checkpoints.checkpoint_args({"model": {}}) == argparse.Namespace()


def test_args_dict_keeps_plain_values():
    import numpy as np
    args = argparse.Namespace(a=1, b=np.float64(0.5), c=(0.9, np.float32(0.95)), d=[1, 2], e=None,
                              f=np.int64(3), g=np.bool_(True), h=torch.device("cpu"), i="x")
    d = checkpoints.args_dict(args)
    assert d == {"a": 1, "b": 0.5, "c": (0.9, 0.949999988079071), "d": [1, 2], "e": None, "f": 3, "g": True,
                 "h": "cpu", "i": "x"}
    assert [type(d[k]) for k in "bfg"] == [float, int, bool]


def test_checkpoint_write_failure_removes_the_temporary(tmp_path, monkeypatch):
    """torch.save onto a path reports a full disk as an 'enforce fail' RuntimeError; the writer reports it
    with the file and the free space as well."""
    def failing(obj, f, *a, **k):
        f.write(b"x")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", failing)
    path = str(tmp_path / "checkpoint-3.pth")
    with pytest.raises(checkpoints.CheckpointWriteError,
                       match=r"checkpoint-3.pth \(\[enforce fail .*\); [0-9.]+ MiB free on .*it needs about 0.0 MiB"):
        checkpoints.save_on_master({"w": torch.zeros(4)}, path)
    assert os.listdir(tmp_path) == []


def test_suite_refuses_to_start_without_room_for_its_temporary_files(tmp_path, monkeypatch):
    """tests/conftest.py: under NEEDED_GB free where the temporary files go, one line and exit status 2."""
    import types

    import conftest
    seen = []

    def usage(free_gb):
        def disk_usage(path):
            seen.append(path)
            return types.SimpleNamespace(free=int(free_gb * 2 ** 30))
        return disk_usage

    monkeypatch.setattr(conftest.shutil, "disk_usage", usage(0.5))
    with pytest.raises(pytest.exit.Exception) as info:
        conftest.check_room(tmp_path)
    assert info.value.returncode == 2 and seen == [tmp_path]
    assert info.value.msg == (f"only 0.5 GB free for the tests' temporary files in {tmp_path}; they need about 3 GB: "
                              f"free some space, or set TMPDIR (or --basetemp) to a larger disk")
    monkeypatch.setattr(conftest.shutil, "disk_usage", usage(conftest.NEEDED_GB + 0.1))
    assert conftest.check_room(tmp_path) is None
