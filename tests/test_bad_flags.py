"""Nonsense flags of the three training entry points: each stops with exit status 2 and exactly one
``error:`` line naming the flag, its value and what is allowed, without a traceback, and nothing is created
(the --output_dir given, files in the working directory or the temporary folder). Most cases run the
command line in this process (``cli()`` with ``sys.argv``); a few run it as a real process."""
import argparse
import os
import subprocess
import sys
import tempfile

import pytest
import torch

import main_linprobe
import run_class_finetuning
import run_pretraining

ENTRY_POINTS = {"pretrain": run_pretraining, "finetune": run_class_finetuning, "linprobe": main_linprobe}

# small valid command lines: every case below changes one thing; {out} is an --output_dir that does not exist,
# {ckpt} a file standing in for a pretrained checkpoint (the checks refuse the flags before reading it)
BASE = {
    "pretrain": ["--model", "bootmae_tiny", "--input_size", "32", "--patch_size", "4", "--mask_num", "48",
                 "--num_mask_patches", "40", "--min_mask_patches_per_block", "4", "--max_mask_patches_per_block",
                 "16", "--data_set", "demo", "--demo_size", "8", "--batch_size", "4", "--epochs", "2",
                 "--warmup_epochs", "1", "--num_workers", "0", "--device", "cpu", "--output_dir", "{out}"],
    "finetune": ["--model", "bootmae_tiny_patch16_224", "--input_size", "32", "--patch_size", "4",
                 "--finetune", "{ckpt}", "--data_set", "demo", "--demo_size", "8", "--batch_size", "4",
                 "--epochs", "2", "--num_workers", "0", "--device", "cpu", "--output_dir", "{out}"],
    "linprobe": ["--model", "bootmae_tiny_patch16_224", "--input_size", "32", "--patch_size", "4",
                 "--finetune", "{ckpt}", "--data_set", "demo", "--demo_size", "8", "--batch_size", "4",
                 "--epochs", "2", "--num_workers", "0", "--device", "cpu", "--output_dir", "{out}"],
}

# (entry point, flags added to BASE, the error line after "error: "); {file} is an existing plain file
CASES = [
    ("pretrain", ["--lr", "-0.0001"], "--lr -0.0001 must be > 0 (base lr)"),
    ("pretrain", ["--lr", "nan"], "--lr nan must be a finite number > 0 (base lr)"),
    ("pretrain", ["--min_lr", "-0.00001"], "--min_lr -1e-05 must be >= 0 (final lr of the cosine)"),
    ("pretrain", ["--warmup_lr", "inf"], "--warmup_lr inf must be a finite number >= 0"),
    ("pretrain", ["--drop_path", "1.0"], "--drop_path 1.0 is outside [0, 1) (stochastic depth rate)"),
    ("pretrain", ["--num_workers", "-1"], "--num_workers -1 must be >= 0"),
    ("pretrain", ["--device", "gpu0"], "--device gpu0 is not a device name; use cpu or cuda (cuda:N for one GPU)"),
    ("pretrain", ["--model_ema_decay", "1.5"], "--model_ema_decay 1.5 is outside [0, 1) (EMA momentum; the "
                                               "release's 0.999)"),
    ("pretrain", ["--clip_grad", "-1"], "--clip_grad -1.0 must be > 0 (a gradient norm; leave it out for no "
                                        "clipping)"),
    ("pretrain", ["--weight_decay", "-0.05"], "--weight_decay -0.05 must be >= 0"),
    ("pretrain", ["--weight_decay_end", "-0.1"], "--weight_decay_end -0.1 must be >= 0"),
    ("pretrain", ["--patch_size", "0"], "--patch_size 0 must be >= 1"),
    ("pretrain", ["--epochs", "0"], "--epochs 0 must be >= 1"),
    ("pretrain", ["--update_freq", "0"], "--update_freq 0 must be >= 1"),
    ("pretrain", ["--max_mask_patches_per_block", "3"],
     "--min_mask_patches_per_block 4 exceeds --max_mask_patches_per_block 3; lower the minimum or raise the "
     "maximum (the release: 16 and 60)"),
    ("pretrain", ["--feature_ramp", "nan"], "--feature_ramp nan must be a finite number in [0, 1] (a fraction of "
                                            "training)"),
    ("pretrain", ["--min_crop_scale", "0"], "--min_crop_scale 0.0 is outside (0, 1] (an area fraction)"),
    ("pretrain", ["--output_dir", "{file}"], "--output_dir {file} is a file; give the path of a folder (it is "
                                             "created if missing)"),
    ("pretrain", ["--output_dir", "{file}/run"], "--output_dir {file}/run cannot be created: {file} is a file; "
                                                 "give a path under a folder"),
    ("pretrain", ["--log_dir", "{file}"], "--log_dir {file} is a file; give the path of a folder (it is created "
                                          "if missing)"),
    ("pretrain", ["--metrics_json", "{tmp}"], "--metrics_json {tmp} is a folder; give the path of a file (it is "
                                              "created if missing)"),
    ("pretrain", ["--print_freq", "0"], "--print_freq 0 must be >= 1"),
    ("finetune", ["--smoothing", "1.0"], "--smoothing 1.0 is outside [0, 1) (label smoothing)"),
    ("finetune", ["--aa", "bogus"], "--aa bogus is not an auto-augment policy timm accepts (Unknown AA policy "
                                    "bogus); use e.g. rand-m9-mstd0.5-inc1 (the release's), v0, original, augmix-m5 "
                                    "or none"),
    ("finetune", ["--train_interpolation", "cubic"], "--train_interpolation cubic is not an interpolation timm "
                                                     "knows; use bicubic (the release's), bilinear, nearest or random"),
    ("finetune", ["--remode", "noise"], "--remode noise is not a random-erasing mode; use pixel (the release's), "
                                        "rand or const"),
    ("finetune", ["--drop", "1.5"], "--drop 1.5 is outside [0, 1) (dropout rate)"),
    ("finetune", ["--attn_drop_rate", "-0.1"], "--attn_drop_rate -0.1 is outside [0, 1) (attention dropout rate)"),
    ("finetune", ["--model_ema", "--model_ema_decay", "1.0"], "--model_ema_decay 1.0 is outside [0, 1) (EMA "
                                                              "decay; the release's 0.9998)"),
    ("finetune", ["--opt_betas", "0.9", "1.0"], "--opt_betas 0.9 1.0 must each be in [0, 1)"),
    ("finetune", ["--reprob", "1.5"], "--reprob 1.5 is outside [0, 1] (a probability)"),
    ("finetune", ["--cutmix_minmax", "0.8", "0.2"], "--cutmix_minmax 0.8 0.2 must be two ratios, the smaller "
                                                    "first (e.g. 0.2 0.8)"),
    ("finetune", ["--layer_decay", "0"], "--layer_decay 0.0 is outside (0, 1]"),
    ("finetune", ["--color_jitter", "-0.4"], "--color_jitter -0.4 must be >= 0"),
    ("finetune", ["--device", "cuda:99"], None),  # the message depends on the machine: see _device_message
    ("linprobe", ["--blr", "-0.1"], "--blr -0.1 must be > 0 (base lr: lr = blr x total batch / 256)"),
    ("linprobe", ["--lr", "nan"], "--lr nan must be a finite number > 0"),
    ("linprobe", ["--momentum", "1.0"], "--momentum 1.0 is outside [0, 1) (LARS momentum; MAE's 0.9)"),
    ("linprobe", ["--accum_iter", "0"], "--accum_iter 0 must be >= 1"),
    ("linprobe", ["--nb_classes", "0"], "--nb_classes 0 must be >= 1"),
    ("linprobe", ["--crop_pct", "1.5"], "--crop_pct 1.5 is outside (0, 1] (a fraction of the image side)"),
    ("linprobe", ["--output_dir", "{file}/run"], "--output_dir {file}/run cannot be created: {file} is a file; "
                                                 "give a path under a folder"),
    ("linprobe", ["--demo_size", "0"], "--demo_size 0 must be >= 1"),
    ("linprobe", ["--start_epoch", "-1"], "--start_epoch -1 must be >= 0"),
]


def _device_message(name):
    if not torch.cuda.is_available():
        return f"--device {name}: CUDA is not available here (no GPU, or a PyTorch without CUDA); use --device cpu"
    count = torch.cuda.device_count()
    return f"--device {name}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}"


@pytest.fixture
def place(tmp_path, monkeypatch):
    """A working directory with a stand-in checkpoint and a plain file, and an empty temporary folder;
    ``listing()`` is every path under it."""
    (tmp_path / "encoder.pth").write_bytes(b"stand-in")
    (tmp_path / "notes.txt").write_text("a file, not a folder\n")
    (tmp_path / "tmp").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))

    def fill(items):
        values = dict(out=str(tmp_path / "out"), ckpt=str(tmp_path / "encoder.pth"), file=str(tmp_path / "notes.txt"),
                      tmp=str(tmp_path / "tmp"))
        return [item.format(**values) for item in items]

    def listing():
        return sorted(os.path.relpath(os.path.join(d, n), tmp_path) for d, dirs, files in os.walk(tmp_path)
                      for n in dirs + files)

    return fill, listing, tmp_path


def _expected(flags, message, fill):
    return "error: " + fill([message if message is not None else _device_message(flags[-1])])[0]


@pytest.mark.parametrize("entry, flags, message", CASES, ids=[f"{e}{''.join(f)}" for e, f, _ in CASES])
def test_bad_flag_is_one_line_and_creates_nothing(entry, flags, message, place, monkeypatch, capsys):
    fill, listing, root = place
    before = listing()
    monkeypatch.setattr(sys, "argv", [f"{entry}.py", *fill(BASE[entry] + flags)])
    with pytest.raises(SystemExit) as exc:
        ENTRY_POINTS[entry].cli()
    captured = capsys.readouterr()
    assert exc.value.code == 2
    assert captured.err.splitlines() == [_expected(flags, message, fill)]
    assert "Traceback" not in captured.out + captured.err
    assert not (root / "out").exists() and listing() == before


@pytest.mark.parametrize("entry", sorted(BASE))
def test_the_base_command_lines_pass_the_checks(entry, place):
    """The cases above fail on their one change: the command lines they start from are accepted."""
    fill, listing, root = place
    module = ENTRY_POINTS[entry]
    args = argparse.ArgumentParser(parents=[module.get_args_parser()]).parse_args(fill(BASE[entry]))
    module.check_args(args)
    assert not (root / "out").exists()


REAL_PROCESS_CASES = [("pretrain", ["--epochs", "0"]), ("finetune", ["--aa", "bogus"]),
                      ("linprobe", ["--output_dir", "{file}/run"])]


def test_bad_flags_in_real_processes(place):
    """Exit status and stderr of the scripts themselves (started together, so that their interpreter start-ups
    overlap): one line each, nothing else (no warning, no traceback), nothing created."""
    fill, listing, root = place
    before = listing()
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(root / "tmp"))
    procs = [subprocess.Popen([sys.executable, ENTRY_POINTS[entry].__file__, *fill(BASE[entry] + flags)], cwd=root,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for entry, flags in REAL_PROCESS_CASES]
    for (entry, flags), proc in zip(REAL_PROCESS_CASES, procs):
        _, err = proc.communicate(timeout=180)
        message = next(m for e, f, m in CASES if (e, f) == (entry, flags))
        assert proc.returncode == 2, err
        assert err.splitlines() == [_expected(flags, message, fill)]
    assert not (root / "out").exists() and listing() == before


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_a_run_that_fails_on_its_first_batch_leaves_nothing(place, monkeypatch, capsys):
    """A folder of unreadable images passes the checks and stops on the first batch of training: the output
    folder and the TensorBoard events file do not exist yet (they appear with the run's first record)."""
    fill, listing, root = place
    images = root / "data" / "train" / "a"
    images.mkdir(parents=True)
    for i in range(4):
        (images / f"{i}.jpg").write_bytes(b"not an image")
    before = listing()
    argv = fill(BASE["pretrain"]) + ["--data_path", str(root / "data")]
    argv[argv.index("demo")] = "image_folder"
    monkeypatch.setattr(sys, "argv", ["pretrain.py", *argv])
    with pytest.raises(SystemExit) as exc:
        run_pretraining.cli()
    err = capsys.readouterr().err.splitlines()
    assert exc.value.code == 2
    assert err[-1].startswith(f"error: 4 consecutive images starting at {images / '0.jpg'} could not be decoded")
    assert not (root / "out").exists() and listing() == before
