"""End-to-end tests of ``run_pretraining.py`` on bad input, run as a subprocess on the CPU: the one-line errors
that leave an earlier run's files untouched, and a truncated image that is skipped with a warning.

The runs use tests/test_pretraining_e2e.py's tiny configuration (``COMMON``) and command-line helpers.
"""
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

import modeling_bootmae
from shared_helpers import read_log
from test_pretraining_e2e import COMMON, _ok, run_cli

SENTINEL_CKPT = b"checkpoint of an earlier run\n"
SENTINEL_LOG = b'{"epoch": 41, "train_loss": 0.5}\n'


def _bad_input_cases(root):
    empty = root / "empty"
    empty.mkdir()
    bad_images = root / "undecodable" / "train" / "a"
    bad_images.mkdir(parents=True)
    data = _jpeg_bytes(np.random.default_rng(0), 48, 40)
    for i in range(6):
        (bad_images / f"img{i}.jpg").write_bytes(data[: len(data) // 3])
    corrupt = root / "corrupt.pth"
    corrupt.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    small = root / "small.pth"
    torch.manual_seed(0)
    torch.save({"model": modeling_bootmae.bootmae_small(img_size=32).state_dict(), "epoch": 0}, small)
    demo = ["--data_set", "demo", "--demo_size", "8", "--batch_size", "4", "--epochs", "1"]
    return {
        # name: (flags, what the message must contain)
        "missing_data_path": (COMMON + ["--batch_size", "4"], ["--data_path", "does not exist", "--data_set demo"]),
        "empty_data_path": (COMMON + ["--data_path", str(empty)], [f"--data_path {empty}", "contains no images"]),
        "unknown_model": (COMMON + demo + ["--model", "bootmae_gigantic"],
                          ["unknown --model bootmae_gigantic", "bootmae_tiny"]),
        "mask_num_not_below_patches": (COMMON + demo + ["--mask_num", "4"],
                                       ["--mask_num 4 must be between 1 and 3", "4 patches"]),
        "block_budget_above_mask_num": (COMMON + demo + ["--mask_num", "2", "--num_mask_patches", "3"],
                                        ["--num_mask_patches 3", "exceeds --mask_num 2"]),
        "input_size_not_multiple_of_patch": (COMMON + demo + ["--input_size", "40"],
                                             ["--input_size 40", "patch size 16"]),
        "resume_missing_file": (COMMON + demo + ["--resume", str(root / "nothing.pth")],
                                [f"--resume {root / 'nothing.pth'} does not exist"]),
        "resume_other_model_size": (COMMON + demo + ["--resume", str(small)],
                                    [str(small), "does not fit --model bootmae_tiny", "(1, 1, 384) vs (1, 1, 192)"]),
        "resume_corrupt_file": (COMMON + demo + ["--resume", str(corrupt)],
                                [f"cannot read checkpoint {corrupt}", "corrupt"]),
        # raised inside a DataLoader worker, which torch re-raises with the worker's traceback
        "undecodable_folder_in_worker": (COMMON + ["--data_path", str(root / "undecodable"), "--batch_size", "4",
                                                   "--epochs", "1", "--num_workers", "1", "--no_auto_resume"],
                                         ["6 consecutive images", "could not be decoded", "--data_path"]),
    }


def _jpeg_bytes(rng, w, h):
    import io
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Every bad-input case run once (two at a time), each with an output folder that already holds a
    checkpoint-last.pth and a log.txt of an 'earlier run'."""
    root = tmp_path_factory.mktemp("bad_input")
    cases = _bad_input_cases(root)

    def run(item):
        name, (flags, _) = item
        out = root / f"out_{name}"
        out.mkdir()
        (out / "checkpoint-last.pth").write_bytes(SENTINEL_CKPT)
        (out / "log.txt").write_bytes(SENTINEL_LOG)
        before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.iterdir()}
        proc = run_cli(flags + ["--output_dir", str(out)])
        return name, (proc, out, before)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(pool.map(run, cases.items()))
    return {name: (*results[name], cases[name][1]) for name in cases}


@pytest.mark.parametrize("case", ["missing_data_path", "empty_data_path", "unknown_model",
                                  "mask_num_not_below_patches", "block_budget_above_mask_num",
                                  "input_size_not_multiple_of_patch", "resume_missing_file",
                                  "resume_other_model_size", "resume_corrupt_file",
                                  "undecodable_folder_in_worker"])
def test_bad_input_is_one_line_error(bad_runs, case):
    """Bad input ends with exit status 2 and one line 'error: ...' on stderr that names the problem, no
    traceback, and leaves the output folder's checkpoint and log untouched."""
    proc, out, before, expected = bad_runs[case]
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
    if case != "undecodable_folder_in_worker":   # that one also prints a warning per undecodable file
        assert len(lines) == 1, proc.stderr
    for fragment in expected:
        assert fragment in errors[0], (fragment, errors[0])
    # the earlier run's files are untouched, and no checkpoint or log was added
    assert (out / "checkpoint-last.pth").read_bytes() == SENTINEL_CKPT
    assert (out / "log.txt").read_bytes() == SENTINEL_LOG
    for name in ("checkpoint-last.pth", "log.txt"):
        p = out / name
        assert (p.stat().st_mtime_ns, p.stat().st_size) == before[name]
    added = sorted(set(os.listdir(out)) - set(before))
    if case == "undecodable_folder_in_worker":   # fails in training: the TensorBoard file already exists
        assert all(n.startswith("events.out.tfevents.") for n in added), added
    else:
        assert added == []


def test_truncated_image_is_skipped_with_a_warning(tmp_path):
    """A folder with good images and one truncated JPEG trains to the end. Corrupt images are skipped with a
    warning naming the file (once per file and process; the dataset also counts them in num_skipped) and
    replaced by the next image, so that one bad file among 1.28M does not stop a multi-day run. The file is
    read in a DataLoader worker here, as in real runs."""
    folder = tmp_path / "data" / "train" / "class_a"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(7):
        (folder / f"good{i}.jpg").write_bytes(_jpeg_bytes(rng, 48, 40))
    data = _jpeg_bytes(rng, 64, 64)
    bad = folder / "truncated.jpg"
    bad.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    proc = run_cli(COMMON + ["--data_path", str(tmp_path / "data"), "--batch_size", "4", "--epochs", "1",
                             "--num_workers", "1", "--output_dir", str(out)])
    _ok(proc)
    assert "data: 8 images, 2 batches of 4" in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if "skipping unreadable image" in line]
    assert len(warnings) == 1, proc.stderr
    assert str(bad) in warnings[0] and "truncated" in warnings[0]
    assert not any(f"good{i}.jpg" in proc.stderr for i in range(7))
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0] and math.isfinite(log[0]["train_loss"])
    assert (out / "checkpoint-0.pth").exists()
