"""Input-pipeline benchmark: images/s of the pretraining data loader alone, per --pipeline and --workers.

    python benchmarks/bench_loader.py --num_images 512 --pipeline pil fast --workers 1 2

The loader is the one run_pretraining.py trains from (``datasets.build_pretraining_dataset`` and
``datasets.build_pretraining_loader`` with run_pretraining.py's defaults: 224 px random-resized crops, flips,
the release's masks), reading an ImageFolder of ImageNet-like JPEGs (about 500x375, quality 90) generated
once under ``--root`` from the photographs bundled with scikit-image (random crops, flips and rescales of
them), so nothing is downloaded. A measurement iterates ``--warmup`` batches (workers starting, not timed),
then times ``--batches`` batches, each delivered as the training loop takes it (``fast``: normalised on
``--device``; ``gpu``: decoded and transformed on ``--device cuda``). Measurements of the configurations
alternate, ``--repeats`` times, so that background load hits them alike; the median is reported. Prints a table
line and one JSON line per configuration, with the load average of the machine at the end (on a shared machine,
read the figures with it).
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datasets  # noqa: E402
import pretraining_args  # noqa: E402

# the sizes of the generated images, (width, height): ImageNet's typical landscape and portrait shapes
IMAGE_SIZES = ((500, 375), (500, 375), (500, 375), (375, 500), (500, 333), (500, 400))
CLASSES = 10


def image_folder(root, num_images, quality=90, seed=0):
    """The folder ``root/jpeg_<num_images>_q<quality>`` holding ``train/<class>/<n>.JPEG``: ``num_images``
    JPEGs made from scikit-image's photos (each a random crop of 35-100 % of the largest region of its shape,
    flipped at random, resized bicubic). Made once; a folder whose ``complete`` file exists is reused."""
    from PIL import Image
    folder = os.path.join(root, f"jpeg_{num_images}_q{quality}")
    done = os.path.join(folder, "complete")
    if os.path.isfile(done):
        return folder
    _, photos = datasets.load_demo_photos()
    rng = np.random.default_rng(seed)
    for n in range(num_images):
        photo = photos[rng.integers(len(photos))]
        width, height = IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]
        fit = min(photo.width / width, photo.height / height)
        scale = fit * np.sqrt(rng.uniform(0.35, 1.0))
        w, h = width * scale, height * scale
        left, top = rng.uniform(0, photo.width - w), rng.uniform(0, photo.height - h)
        img = photo.resize((width, height), Image.BICUBIC, box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        path = os.path.join(folder, "train", f"class_{n % CLASSES:02d}", f"{n:07d}.JPEG")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        img.save(path, quality=quality)
    with open(done, "w") as f:
        f.write(f"{num_images}\n")
    return folder


def loader_args(folder, pipeline, workers, batch_size, device):
    """run_pretraining.py's arguments for the benchmarked loader (its defaults otherwise), checked as it does."""
    args = pretraining_args.get_args_parser().parse_args(
        ["--data_path", folder, "--data_pipeline", pipeline, "--num_workers", str(workers),
         "--batch_size", str(batch_size), "--device", str(device)])
    pretraining_args.check_args(args)
    return args


def measure(folder, pipeline, workers, args, device):
    """Seconds per timed batch of one loader of the configuration, warm-up excluded."""
    recipe = loader_args(folder, pipeline, workers, args.batch_size, device)
    dataset = datasets.build_pretraining_dataset(recipe)
    total = (args.warmup + args.batches) * args.batch_size
    sampler = torch.utils.data.RandomSampler(dataset, num_samples=total,
                                             generator=torch.Generator().manual_seed(0))
    loader = datasets.build_pretraining_loader(recipe, dataset, sampler, device)
    batches = iter(loader)
    for _ in range(args.warmup):
        next(batches)
    start = time.perf_counter()
    count = 0
    for images, mask in batches:
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    assert count == args.batches and images.dtype == torch.float32 and mask.dtype == torch.bool
    return seconds / count


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=os.path.join(os.path.expanduser("~"), ".cache", "bootmae", "bench_loader"),
                   help="folder for the generated images (made once per --num_images)")
    p.add_argument("--num_images", default=512, type=int, help="images in the generated folder")
    p.add_argument("--pipeline", nargs="+", default=["pil", "fast"], choices=list(datasets.DATA_PIPELINES))
    p.add_argument("--workers", nargs="+", default=[1, 2], type=int, help="DataLoader workers (0: in process)")
    p.add_argument("--batch_size", default=64, type=int)
    p.add_argument("--warmup", default=2, type=int, help="batches before the clock starts")
    p.add_argument("--batches", default=6, type=int, help="timed batches per measurement")
    p.add_argument("--repeats", default=3, type=int, help="measurements per configuration (median reported)")
    p.add_argument("--device", default="cpu",
                   help="where fast normalises and gpu decodes (cuda: as in training; gpu needs it)")
    p.add_argument("--json", default=None, help="append the JSON lines to this file")
    args = p.parse_args(argv)
    if args.num_images < 1 or args.batch_size < 1 or args.batches < 1 or args.warmup < 0 or args.repeats < 1:
        p.error("--num_images, --batch_size, --batches and --repeats must be at least 1, --warmup at least 0")
    if min(args.workers) < 0:
        p.error("--workers must be 0 or more")
    device = torch.device(args.device)
    if "gpu" in args.pipeline:
        try:
            datasets.check_gpu_pipeline(datasets.PretrainDataConfig(device=args.device))
        except datasets.UsageError as e:
            p.error(f"{e} (here: --pipeline pil fast, or --device cuda)")
    folder = image_folder(args.root, args.num_images)
    configs = [(pipeline, workers) for workers in args.workers for pipeline in args.pipeline]
    times = {c: [] for c in configs}
    for _ in range(args.repeats):
        for c in configs:
            times[c].append(measure(folder, *c, args, device))
    load = os.getloadavg()
    results = []
    for (pipeline, workers), ts in times.items():
        s = statistics.median(ts)
        images_per_s = args.batch_size / s
        r = dict(pipeline=pipeline, workers=workers, images_per_s=images_per_s,
                 images_per_s_per_worker=images_per_s / max(workers, 1),
                 images_per_s_min=args.batch_size / max(ts), images_per_s_max=args.batch_size / min(ts),
                 batch_size=args.batch_size, batches=args.batches, repeats=args.repeats, num_images=args.num_images,
                 folder=folder, device=str(device), cpu_count=os.cpu_count(), load_average=[round(v, 2) for v in load],
                 torch=torch.__version__)
        results.append(r)
        print(f"{pipeline:5s} workers {workers}: {images_per_s:.1f} images/s ({r['images_per_s_per_worker']:.1f} per "
              f"worker) [{r['images_per_s_min']:.1f}, {r['images_per_s_max']:.1f}]  load average "
              f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores", flush=True)
        print(json.dumps(r), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    return results


if __name__ == "__main__":
    main()
