"""The pretraining input pipelines: benchmarks/bench_loader.py, the images/s and data-wait statistics of the
training loop, and ``--data_pipeline fast`` against ``pil`` (same crop boxes, flips and masks from the same RNG
state; pixels within a stated tolerance; unreadable files skipped with the same warning; pil unchanged)."""
import importlib.util
import json
import os
import shutil
import time
import warnings

import pytest
import torch
from PIL import Image
from torchvision import transforms

import datasets
import pipelines
import run_pretraining
from shared_helpers import read_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Agreement of the fast pipeline's pixels with the pil pipeline's for one crop box, in levels of 255: both decode
# with libjpeg-turbo (identical pixels); the bicubic antialiased resizes (PIL's and torch's uint8 port of it)
# differ by rounding. Measured on the generated JPEGs: mean 0.015 levels, worst image mean 0.19, maximum 6.
MAX_LEVELS = 8
MEAN_LEVELS = 0.5

TINY = ["--model", "bootmae_tiny", "--input_size", "32", "--decoder_dim", "64", "--decoder_depth", "1",
        "--mask_num", "3", "--num_mask_patches", "2", "--min_mask_patches_per_block", "1",
        "--max_mask_patches_per_block", "2", "--warmup_epochs", "1", "--min_lr", "1e-6", "--device", "cpu"]


def _bench_loader():
    spec = importlib.util.spec_from_file_location("bench_loader", os.path.join(ROOT, "benchmarks", "bench_loader.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("bench_loader"))


@pytest.fixture(scope="module")
def folder(jpeg_root):
    return _bench_loader().image_folder(jpeg_root, 6)


def _args(folder, *flags):
    args = run_pretraining.get_args_parser().parse_args(["--data_path", folder, "--num_workers", "0", *flags])
    run_pretraining.check_args(args)
    return args


def _levels(pil_item, fast_item, args):
    """|pil - fast| in levels of 255 [3, H, W] (the pil item is normalised, the fast one uint8)."""
    mean, std = pipelines.mean_std(args)
    fast = pipelines.normalise_uint8(fast_item[None], mean, std)[0]
    return ((pil_item - fast) * torch.tensor(std).view(3, 1, 1) * 255).abs()


# ----------------------------------------------------------------------------------------------- bench_loader

def test_bench_loader_prints_one_json_line_per_configuration(jpeg_root, folder, capsys):
    bench = _bench_loader()
    names = sorted(os.listdir(os.path.join(folder, "train")))
    files = [os.path.join(folder, "train", n, f) for n in names for f in os.listdir(os.path.join(folder, "train", n))]
    assert len(files) == 6
    for path in files:
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and img.size in bench.IMAGE_SIZES
    stamp = os.path.getmtime(files[0])
    results = bench.main(["--root", jpeg_root, "--num_images", "6", "--pipeline", "pil", "fast", "--workers", "0", "1",
                          "--batch_size", "2", "--warmup", "1", "--batches", "2", "--repeats", "1"])
    assert os.path.getmtime(files[0]) == stamp   # the folder was reused, not regenerated
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines == results
    assert [(r["pipeline"], r["workers"]) for r in lines] == [("pil", 0), ("fast", 0), ("pil", 1), ("fast", 1)]
    for r in lines:
        assert r["images_per_s"] > 0 and r["images_per_s_per_worker"] == r["images_per_s"] / max(r["workers"], 1)
        assert r["folder"] == folder and r["batch_size"] == 2 and len(r["load_average"]) == 3


# ------------------------------------------------------------------------------------ the training statistics

class SlowDataset(torch.utils.data.Dataset):
    """A dataset whose items take ``seconds`` longer to load."""

    def __init__(self, base, seconds):
        self.base, self.seconds, self.transform = base, seconds, base.transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        time.sleep(self.seconds)
        return self.base[index]


def test_log_reports_images_per_s_and_data_wait(tmp_path, monkeypatch, capsys):
    flags = TINY + ["--data_set", "demo", "--demo_size", "16", "--batch_size", "8", "--epochs", "1",
                    "--print_freq", "1", "--num_workers", "0"]
    out = str(tmp_path / "run")
    run_pretraining.main(run_pretraining.get_args_parser().parse_args(flags + ["--output_dir", out]))
    console = capsys.readouterr().out
    (record,) = read_log(out)
    assert record["train_images_per_s"] > 0 and 0 <= record["train_data_wait"] <= 1
    assert "train_loss" in record and "train_s_per_step" not in record
    intervals = [line for line in console.splitlines() if line.startswith("Epoch: [0] [")]
    assert len(intervals) == 2 and all(" img/s  data wait " in line for line in intervals)
    assert f"Epoch: [0] {record['train_images_per_s']:.1f} images/s, " \
           f"{100 * record['train_data_wait']:.0f} % of the time waiting for data" in console
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(out)
    acc.Reload()
    assert [e.step for e in acc.Scalars("perf/images_per_s")] == [0, 1]
    assert all(0 <= e.value <= 1 for e in acc.Scalars("perf/data_wait"))
    assert acc.Scalars("perf/epoch_data_wait")[0].value == pytest.approx(record["train_data_wait"])

    # a loader that needs 0.05 s per image (0.4 s per batch) holds the step back, and the run says so
    build = run_pretraining.build_pretraining_dataset
    monkeypatch.setattr(run_pretraining, "build_pretraining_dataset", lambda args: SlowDataset(build(args), 0.05))
    slow_out = str(tmp_path / "slow")
    run_pretraining.main(run_pretraining.get_args_parser().parse_args(flags + ["--output_dir", slow_out]))
    (slow,) = read_log(slow_out)
    assert slow["train_data_wait"] > 0.6 and slow["train_data_wait"] > record["train_data_wait"]
    assert slow["train_images_per_s"] < 8 / 0.4   # at most one batch per 0.4 s
    assert "waiting for data (input-bound: raise --num_workers or use --data_pipeline fast)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- pil vs fast

def _pattern_image(width=400, height=300):
    """A deterministic image with structure in every channel (no file, no RNG)."""
    import numpy as np
    yy, xx = np.mgrid[0:height, 0:width]
    arr = np.stack([(xx * 7 + yy * 3) % 256, (xx * xx // 50 + yy) % 256, (yy * yy // 40 + 2 * xx) % 256], -1)
    return Image.fromarray(arr.astype(np.uint8))


def test_pil_pipeline_output_unchanged():
    """DataAugmentationForBootMAE's items for a fixed seed, as the code before --data_pipeline produced them."""
    args = pipelines.PretrainDataConfig(input_size=64, patch_size=16, mask_num=12, num_mask_patches=8,
                                        min_mask_patches_per_block=2, max_mask_patches_per_block=6)
    aug = pipelines.DataAugmentationForBootMAE(args)
    torch.manual_seed(7)
    expected = [(-67.192, [-0.62353, 0.43529, 0.49804], [0, 1, 2, 3, 4, 5, 6, 7, 11, 12, 14, 15]),
                (-16.2508, [-0.63922, 0.66275, 0.85098], [1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 14]),
                (-54.9723, [-0.06667, 0.0902, -0.76471], [0, 1, 2, 3, 4, 5, 6, 7, 8, 11, 13, 15])]
    for total, pixel, masked in expected:
        x, m = aug(_pattern_image())
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and m.shape == (16,) and m.dtype == torch.bool
        assert x.double().sum().item() == pytest.approx(total, abs=1e-3)
        assert x[:, 5, 9].tolist() == pytest.approx(pixel, abs=1e-4)
        assert torch.nonzero(m).flatten().tolist() == masked


@pytest.mark.parametrize("min_crop_scale", [0.2, 0.6])
def test_crop_boxes_and_flips_are_random_resized_crops(min_crop_scale):
    """The fast pipeline's crop box and flip are RandomResizedCrop.get_params (scale (--min_crop_scale, 1),
    ratio 3/4..4/3) and RandomHorizontalFlip's draw (p 0.5) from the same torch RNG state."""
    args = pipelines.PretrainDataConfig(input_size=224, min_crop_scale=min_crop_scale)
    aug = pipelines.UInt8AugmentationForBootMAE(args)
    image = pipelines.uint8_image(_pattern_image(500, 375))
    flips, areas = [], []
    for seed in range(200):
        torch.manual_seed(seed)
        box, flip = aug.draw(image)
        torch.manual_seed(seed)
        assert box == transforms.RandomResizedCrop.get_params(image, (min_crop_scale, 1.0), (3 / 4, 4 / 3))
        assert flip == bool(torch.rand(1) < 0.5)
        flips.append(flip)
        areas.append(box[2] * box[3] / (500 * 375))
    assert 70 < sum(flips) < 130
    assert min_crop_scale - 0.01 <= min(areas) and max(areas) <= 1
    assert max(areas) - min(areas) > 0.5 * (1 - min_crop_scale)


def test_flips_are_drawn_per_image_as_in_pil(tmp_path):
    """Whole-image crops (--min_crop_scale 1, square image) of one file: each item is the image or its mirror,
    decided per item, and the fast pipeline mirrors exactly the items that the pil pipeline mirrors."""
    os.makedirs(tmp_path / "train" / "a")
    _pattern_image(256, 256).save(tmp_path / "train" / "a" / "x.jpg", quality=95)
    args = _args(str(tmp_path), "--min_crop_scale", "1", "--input_size", "64", "--mask_num", "12",
                 "--num_mask_patches", "8", "--min_mask_patches_per_block", "2", "--max_mask_patches_per_block", "6")
    pil = datasets.build_pretraining_dataset(args)
    fast = datasets.with_transform(pil, pipelines.UInt8AugmentationForBootMAE(args), pipelines.tensor_rgb_loader)
    torch.manual_seed(0)
    pil_items = [pil[0][0] for _ in range(48)]
    torch.manual_seed(0)
    fast_items = [fast[0][0] for _ in range(48)]
    plain = fast_items[0]
    mirrored = [not torch.equal(x, plain) for x in fast_items]
    assert all(torch.equal(x, plain) or torch.equal(x, plain.flip(-1)) for x in fast_items)
    assert 12 <= sum(mirrored) <= 36
    for p, f in zip(pil_items, fast_items):
        assert _levels(p, f, args).max() <= MAX_LEVELS


def test_fast_and_gpu_loaders_match_pil_loader(folder):
    """The DataLoaders as run_pretraining.py builds them (2 workers, same seed; gpu's decode-and-transform run on
    CPU tensors): the same masks, the same crops and flips (pixels within MAX_LEVELS / MEAN_LEVELS of 255);
    uint8 images (fast) or JPEG bytes with boxes and flips (gpu) from the workers, float32 images out."""
    args = _args(folder, "--batch_size", "3", "--num_workers", "2")
    device = torch.device("cpu")
    batches = {}
    for pipeline in ("pil", "fast", "gpu"):
        dataset = datasets.build_pretraining_dataset(args)   # with pil (gpu would refuse a CUDA-less run)
        args.data_pipeline = pipeline
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
        loader = datasets.build_pretraining_loader(args, dataset, sampler, device)
        torch.manual_seed(3)
        batches[pipeline] = list(loader)
        args.data_pipeline = "pil"
        if pipeline == "fast":
            images, _ = next(iter(loader.loader))
            assert images.dtype == torch.uint8 and images.shape == (3, 3, 224, 224)
            assert loader.loader.prefetch_factor == 4 and not loader.loader.persistent_workers
        if pipeline == "gpu":
            datas, boxes, flips, _ = next(iter(loader.loader))
            assert len(datas) == 3 and all(bytes(d[:2].tolist()) == b"\xff\xd8" for d in datas)
            assert boxes.shape == (3, 4) and flips.dtype == torch.bool
    std = torch.tensor(pipelines.mean_std(args)[1])
    for pipeline in ("fast", "gpu"):
        assert len(batches["pil"]) == len(batches[pipeline]) == 2
        for (xp, mp), (x, m) in zip(batches["pil"], batches[pipeline]):
            assert torch.equal(mp, m)
            assert x.dtype == torch.float32 and x.shape == xp.shape
            levels = ((xp - x) * std.view(1, 3, 1, 1) * 255).abs()
            assert levels.max() <= MAX_LEVELS, pipeline
            assert levels.mean(dim=(1, 2, 3)).max() <= MEAN_LEVELS, pipeline


def test_unreadable_files_are_skipped_with_the_same_warning(folder, tmp_path):
    root = str(tmp_path / "data")
    shutil.copytree(folder, root)
    pil = datasets.build_pretraining_dataset(_args(root))
    truncated, garbage = pil.samples[1][0], pil.samples[3][0]
    with open(truncated, "rb") as f:
        data = f.read()
    with open(truncated, "wb") as f:
        f.write(data[:len(data) // 2])
    with open(garbage, "wb") as f:
        f.write(b"not an image" * 20)
    args = _args(root)
    pil = datasets.build_pretraining_dataset(args)
    fast = datasets.with_transform(pil, pipelines.UInt8AugmentationForBootMAE(args), pipelines.tensor_rgb_loader)
    gpu = datasets.with_transform(pil, pipelines.JpegAugmentationForBootMAE(args), pipelines.jpeg_bytes_loader)
    messages = {}
    for name, dataset in (("pil", pil), ("fast", fast), ("gpu", gpu)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.manual_seed(0)
            items = [dataset[i] for i in (1, 2, 3, 4)]
        messages[name] = [str(w.message) for w in caught if issubclass(w.category, datasets.CorruptImageWarning)]
        torch.manual_seed(0)
        replacements = [dataset[i] for i in (2, 2, 4, 4)]   # each bad file is replaced by the next image
        for x, y in zip(items, replacements):   # every part but the mask (whose stream runs on)
            assert all(a == b if isinstance(a, bool) else torch.equal(a, b) for a, b in zip(x[:-1], y[:-1]))
    assert len(messages["fast"]) == 2 and messages["fast"] == messages["pil"]
    assert truncated in messages["fast"][0] and "truncated" in messages["fast"][0]
    assert garbage in messages["fast"][1] and messages["fast"][1].startswith("skipping unreadable image ")
    # gpu finds a truncated JPEG without decoding it (no end-of-image marker); the rest of the line is the same
    assert messages["gpu"][1] == messages["pil"][1]
    assert messages["gpu"][0].startswith(f"skipping unreadable image {truncated} (OSError: image file is truncated")


def test_gpu_pipeline_needs_cuda_and_jpeg_files(folder, tmp_path):
    args = _args(folder, "--data_pipeline", "gpu", "--device", "cpu")
    with pytest.raises(datasets.UsageError, match=r"^--data_pipeline gpu decodes on a CUDA device and this run has "
                                                  r"none \(--device cpu\); use --data_pipeline pil$"):
        datasets.build_pretraining_dataset(args)
    args.data_set = "demo"
    with pytest.raises(datasets.UsageError, match="not --data_set demo; use --data_pipeline pil"):
        datasets.build_pretraining_dataset(args)
    # a PNG (and any file nvJPEG cannot take) reaches the device re-encoded as a JPEG of the same picture
    image = _pattern_image(64, 48)
    image.save(tmp_path / "x.png")
    data, size = pipelines.jpeg_bytes_loader(str(tmp_path / "x.png"))
    assert size == (64, 48) and bytes(data[:2].tolist()) == b"\xff\xd8"
    decoded = pipelines.decode_and_transform([data], torch.tensor([[0, 0, 48, 64]]), torch.tensor([False]), (48, 64),
                                            (0, 0, 0), (1 / 255, 1 / 255, 1 / 255), "cpu")[0]
    assert (decoded - pipelines.uint8_image(image).float()).abs().mean() < 1.5   # JPEG at quality 95


def test_unknown_pipeline_is_a_usage_error(folder):
    args = _args(folder)
    args.data_pipeline = "dali"
    with pytest.raises(datasets.UsageError, match="--data_pipeline dali is not supported; choose one of pil, fast, "
                                                  "gpu"):
        datasets.build_pretraining_loader(args, datasets.build_pretraining_dataset(args), None, torch.device("cpu"))
