"""What a run shows: the reconstruction grid (prediction next to the target in the space of ``--pixel_norm``,
in reconstruction.png and TensorBoard every ``--save_ckpt_freq`` epochs), ``scripts/plot_log.py`` drawing
log.txt curves, and ``--save_ckpt_freq 0`` (no numbered checkpoints) and its negative values."""
import argparse
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import checkpoints  # noqa: E402
import run_class_finetuning  # noqa: E402
import run_pretraining  # noqa: E402
import utils  # noqa: E402
import visualize  # noqa: E402
from engine_for_pretraining import normalized_pixel_target  # noqa: E402

# the release's input normalisation
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _batch():
    g = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [0, 1, 5, 6, 10, 15]] = True
    mask[1, [2, 3, 4, 8, 12, 13]] = True
    return images, mask


@pytest.mark.parametrize("norm", ["channel", "patch", "none"])
def test_reconstruction_panels_show_the_prediction_as_made(norm):
    images, mask = _batch()
    target = normalized_pixel_target(images, 8, norm=norm)
    perfect = visualize.reconstruction_panels(images, mask, target, 8, norm, MEAN, STD)
    zero = visualize.reconstruction_panels(images, mask, torch.zeros_like(target), 8, norm, MEAN, STD)
    assert perfect.shape == (2, 5, 3, 32, 32)
    assert len(visualize.RECONSTRUCTION_COLUMNS) == 5
    # columns: input, masked input, target, prediction, pasted
    assert torch.equal(perfect[:, 3], perfect[:, 2])                        # prediction panel == target panel
    assert (perfect[:, 4] - perfect[:, 0]).abs().max() < 1e-5               # pasted == input
    assert torch.equal(zero[:, 2], perfect[:, 2])                           # the target does not depend on it
    masked = mask.view(2, 4, 4).repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None].expand(2, 3, 32, 32)
    # a regressor that learnt nothing shows a flat panel, not the target
    assert (zero[:, 3] - zero[:, 2])[masked].abs().mean() > 0.1
    # zero is mid-grey both as a normalised value (0.5 + 0 / 6) and as a pixel (0 x std 0.5 + mean 0.5)
    assert torch.allclose(zero[:, 3][masked], torch.full_like(zero[:, 3][masked], 0.5))
    # visible patches: black in target and prediction (no loss there), the image in the masked input
    for col in (2, 3):
        assert zero[:, col][~masked].abs().max() == 0
    assert torch.equal(zero[:, 1][~masked], zero[:, 0][~masked]) and zero[:, 1][masked].abs().max() == 0
    if norm != "none":
        # a per-patch normalised target is drawn as 0.5 + v / 6; per patch and channel (or patch) mean 0
        v = (perfect[:, 2][masked] - 0.5) * 6
        assert v.abs().max() > 1 and v.mean().abs() < 0.2


def test_reconstruction_grid_is_labelled():
    images, mask = _batch()
    panels = visualize.reconstruction_panels(images, mask, torch.zeros(2, 16, 192), 8, "channel", MEAN, STD)
    grid = visualize.reconstruction_grid(panels, "channel")
    # 2 rows x 5 panels of 32 px enlarged to 96, padding 2, under a 28 px header
    assert grid.shape == (28 + 2 * 98 + 2, 5 * 98 + 2, 3) and grid.dtype.name == "uint8"
    header = grid[:28]
    assert (header < 128).any() and (header == 255).mean() > 0.5    # dark text on white
    # the first panel is the enlarged input image
    first = torch.tensor(grid[30:30 + 96, 2:2 + 96]).permute(2, 0, 1).float() / 255
    expected = panels[0, 0].repeat_interleave(3, 1).repeat_interleave(3, 2)
    assert (first - expected).abs().max() <= 1 / 255 + 1e-6


# ----------------------------------------------------------------------------------- demo runs, in process

TINY = ["--model", "bootmae_tiny", "--input_size", "32", "--decoder_dim", "64", "--decoder_depth", "1",
        "--mask_num", "3", "--num_mask_patches", "2", "--min_mask_patches_per_block", "1",
        "--max_mask_patches_per_block", "2", "--warmup_epochs", "1", "--min_lr", "1e-6", "--num_workers", "0",
        "--print_freq", "100", "--data_set", "demo", "--demo_size", "8", "--batch_size", "4", "--epochs", "2",
        "--device", "cpu"]


def _parse(argv):
    return argparse.ArgumentParser(parents=[run_pretraining.get_args_parser()]).parse_args(argv)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two-epoch demo runs with --save_ckpt_freq 1 and 0."""
    out = {}
    for freq in (1, 0):
        folder = str(tmp_path_factory.mktemp(f"freq{freq}"))
        run_pretraining.main(_parse(TINY + ["--save_ckpt_freq", str(freq), "--output_dir", folder]))
        out[freq] = folder
    return out


def _tensorboard_images(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(folder, size_guidance={"images": 0})
    acc.Reload()
    return acc.Images("reconstruction") if "reconstruction" in acc.Tags()["images"] else []


def test_reconstruction_every_save_ckpt_freq_epochs(runs):
    from PIL import Image
    folder = runs[1]
    assert sorted(n for n in os.listdir(folder) if n.startswith("checkpoint")) == [
        "checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-last.pth"]
    images = _tensorboard_images(folder)
    assert [e.step for e in images] == [0, 1]
    assert (images[0].width, images[0].height) == (492, 422)     # 5 x 98 + 2, 28 + 4 x 98 + 2
    with Image.open(os.path.join(folder, "reconstruction.png")) as png:
        assert png.format == "PNG" and png.size == (492, 422)
        last = png.convert("RGB").tobytes()
    # the PNG is the last epoch's TensorBoard image
    import io
    with Image.open(io.BytesIO(images[-1].encoded_image_string)) as tb:
        assert tb.convert("RGB").tobytes() == last


def test_save_ckpt_freq_zero_keeps_no_numbered_checkpoints(runs):
    folder = runs[0]
    names = sorted(os.listdir(folder))
    assert [n for n in names if n.startswith("checkpoint")] == ["checkpoint-last.pth"]
    assert checkpoints.load_checkpoint(os.path.join(folder, "checkpoint-last.pth"))["epoch"] == 1
    assert "reconstruction.png" in names
    assert [e.step for e in _tensorboard_images(folder)] == [1]   # at the end only


@pytest.mark.parametrize("module", [run_pretraining, run_class_finetuning])
def test_negative_save_ckpt_freq_is_a_usage_error(module):
    args = argparse.ArgumentParser(parents=[module.get_args_parser()]).parse_args(["--save_ckpt_freq", "-1"])
    with pytest.raises(utils.UsageError, match=r"--save_ckpt_freq -1 is negative; give N > 0 .* or 0 for"):
        module.check_args(args)


# ----------------------------------------------------------------------------------------- plot command

def _plot(*argv):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "plot_log.py"), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_plot_log_draws_runs_into_a_png(runs, tmp_path):
    out = tmp_path / "plots" / "curves.png"
    proc = _plot(runs[1], os.path.join(runs[0], "log.txt"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (f"wrote {out}: 2 run(s), panels: loss, learning rate, EMA momentum, "
                                   f"loss weights")
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    assert not os.path.exists(str(out) + ".tmp.png")


def test_plot_log_bad_input_is_one_line_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "log.txt").write_text("")
    out = tmp_path / "curves.png"
    for path, message in ((tmp_path / "missing", "does not exist; give the output folder of a training run"),
                          (empty, "has no per-epoch records")):
        proc = _plot(str(path), "--out", str(out))
        assert proc.returncode == 2
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and message in proc.stderr
        assert not out.exists()
