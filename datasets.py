"""Pretraining datasets and the BootMAE pretraining augmentation.

Every dataset built here yields ``(img, mask)`` pairs: ``img`` is the augmented,
normalised image [3, H, W] and ``mask`` the flattened bool patch mask [N]
(True = masked).  Masks are drawn inside ``__getitem__`` so that DataLoader
workers produce them in parallel with decoding.  Class labels are not part of the
items (pretraining is self-supervised) but stay reachable as ``dataset.targets``
for kNN / linear-probe tooling.

The augmentation (``DataAugmentationForBootMAE``) and the input pipelines that apply it (``--data_pipeline``)
are in pipelines.py; ``build_pretraining_loader`` builds the DataLoader of each.

The functions read their settings from an entry point's parsed arguments or from a ``PretrainDataConfig``
(pretraining) or ``EvalDataConfig`` (labelled data), which hold the same fields with the parsers' defaults.

Data sets (``args.data_set``):

* ``image_folder`` (default): ImageNet layout, ``<data_path>/train/<class>/<img>``
  or ``<data_path>/<class>/<img>``.
* ``cifar10`` / ``cifar100``: torchvision's extracted python batches under
  ``data_path``; never downloaded from here.
* ``demo``: a few real photographs bundled in scikit-image's wheel, for smoke
  runs without any download.

Unreadable images.  A corrupt or truncated file in a 1.28M-image folder must not
end a multi-day run, so the ImageFolder loader reports the file (one warning per
file, per process), counts it and substitutes the next index's image.  Only a long
run of consecutive failures (the folder is not images at all) stops the run.
PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is deliberately left at its default
(False) and never set here: with it on, PIL would pad a truncated JPEG with grey
and the model would silently train on a damaged picture; with it off, the file
raises, is reported by name and is skipped.
"""
import dataclasses
import importlib.util
import os
import struct
import warnings
from typing import Optional

import numpy as np
import torch
from PIL import Image
import timm
from timm.data import auto_augment, create_transform
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision import transforms

from pipelines import (DATA_PIPELINES, DataAugmentationForBootMAE, DeviceBatches, JpegAugmentationForBootMAE,
                       PretrainDataConfig, UInt8AugmentationForBootMAE, check_gpu_pipeline, collate_jpeg,
                       jpeg_bytes_loader, mean_std, one_line, pil_rgb_loader, tensor_rgb_loader)
from utils import UsageError

DATA_SETS = ("image_folder", "cifar10", "cifar100", "npz", "demo")

# After this many unreadable files in a row the folder is not a usable image
# dataset (wrong path, files still being copied, ...), and skipping on would
# only hide that.
MAX_CONSECUTIVE_BAD_IMAGES = 50

# What PIL raises for broken files: OSError covers truncated data and
# UnidentifiedImageError; some plugins raise SyntaxError / struct.error /
# EOFError / ValueError on malformed headers or chunks.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)

# Real photographs shipped inside scikit-image's wheel (skimage/data).  Left out:
# synthetic or drawn images (chessboard, color wheel, logo, horse silhouette,
# phantom, text and page scans) that would teach nothing about natural images.
DEMO_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
               "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "microaneurysms.png",
               "moon.png", "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg")
# Photos are cropped at least 20% of their area, so a short side of 512 px keeps
# enough detail for 224 crops while making every crop cheap.
DEMO_MAX_SHORT_SIDE = 512


class CorruptImageWarning(UserWarning):
    """An image file could not be decoded and was replaced by the next one."""


class PretrainingImageFolder(tv_datasets.ImageFolder):
    """ImageFolder whose items are ``transform(img)`` and that skips unreadable files.

    ``num_skipped`` counts the distinct unreadable files found by *this* process.
    DataLoader workers hold copies of the dataset, so their discoveries do not
    reach the main process's counter; the per-file warnings they print are what
    the user sees.  Non-persistent workers start from the main process's state
    each epoch, so a bad file is reported again once per epoch.
    """

    def __init__(self, root, transform=None, keep_labels=False):
        self.keep_labels = keep_labels
        # allow_empty: pretraining ignores labels, so an empty class folder is harmless;
        # the caller checks that there is at least one image overall.
        super().__init__(root, transform=transform, loader=pil_rgb_loader, allow_empty=True)
        self.num_skipped = 0
        self._bad_indices = set()

    def _record_bad(self, index, path, exc):
        self._bad_indices.add(index)
        self.num_skipped += 1
        warnings.warn(
            f"skipping unreadable image {path} ({type(exc).__name__}: {one_line(exc)}); "
            f"using the next image in its place",
            CorruptImageWarning,
            stacklevel=2,
        )

    def __getitem__(self, index):
        n = len(self.samples)
        attempts = min(MAX_CONSECUTIVE_BAD_IMAGES, n)
        last_error = ""
        for step in range(attempts):
            i = (int(index) + step) % n
            path = self.samples[i][0]
            if i in self._bad_indices:
                continue
            try:
                img = self.loader(path)
            except _DECODE_ERRORS as exc:
                self._record_bad(i, path, exc)
                last_error = f"{path}: {one_line(exc)}"
                continue
            img = self.transform(img) if self.transform is not None else img
            return (img, self.samples[i][1]) if self.keep_labels else img
        first = self.samples[int(index) % n][0]
        raise UsageError(
            f"{attempts} consecutive images starting at {first} could not be decoded "
            f"(last: {last_error or 'already reported'}); the folder {self.root} does not look like "
            f"a readable image dataset, check --data_path and the files"
        )


class LabelDroppedDataset(Dataset):
    """Yields only the transformed image of a labelled dataset; labels stay in ``targets``."""

    def __init__(self, base):
        self.base = base
        self.transform = base.transform
        self.targets = list(base.targets)
        self.classes = list(getattr(base, "classes", []))

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        return self.base[index][0]


def _skimage_data_dir():
    # find_spec locates the package without importing it (skimage's import is slow
    # and its data helpers may try to download files).
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            "--data_set demo needs the photos bundled with scikit-image, which is not installed; "
            "run: pip install scikit-image"
        )
    for location in spec.submodule_search_locations:
        candidate = os.path.join(location, "data")
        if os.path.isdir(candidate):
            return candidate
    raise UsageError(
        "--data_set demo found scikit-image but not its data folder (skimage/data); "
        "reinstall it with: pip install --force-reinstall scikit-image"
    )


def load_demo_photos(max_short_side=DEMO_MAX_SHORT_SIDE):
    """Return ``(names, images)``: the bundled photographs as RGB PIL images."""
    data_dir = _skimage_data_dir()
    names, images = [], []
    for filename in DEMO_PHOTOS:
        path = os.path.join(data_dir, filename)
        if not os.path.isfile(path):
            # the bundled subset differs a little between scikit-image releases
            continue
        img = pil_rgb_loader(path)
        short = min(img.size)
        if short > max_short_side:
            scale = max_short_side / short
            new_size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            img = img.resize(new_size, Image.BICUBIC)
        names.append(os.path.splitext(filename)[0])
        images.append(img)
    if not images:
        raise UsageError(
            f"--data_set demo found none of its photos in {data_dir}; "
            f"install a scikit-image release that bundles them (pip install 'scikit-image>=0.22')"
        )
    return names, images


class DemoImages(Dataset):
    """``size`` items cycling over the bundled photos; each item is a new random crop."""

    def __init__(self, transform=None, size=2048):
        if size < 1:
            raise UsageError(f"--demo_size {size} must be at least 1; pass a positive number of items")
        self.transform = transform
        self.size = int(size)
        self.classes, self.photos = load_demo_photos()
        # the photo index doubles as a label so kNN evaluation can use the demo set
        self.targets = [i % len(self.photos) for i in range(self.size)]

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        img = self.photos[int(index) % len(self.photos)]
        return self.transform(img) if self.transform is not None else img


def _check_data_path(data_path):
    if not data_path:
        raise UsageError("--data_path is not set and so does not exist; point it at an ImageNet-style folder "
                         "(class subfolders of images) or use --data_set demo")
    if not os.path.exists(data_path):
        raise UsageError(
            f"--data_path {data_path} does not exist; point it at an ImageNet-style folder "
            f"(class subfolders of images) or use --data_set demo"
        )
    if not os.path.isdir(data_path):
        raise UsageError(
            f"--data_path {data_path} is a file, not a folder; point it at an ImageNet-style folder "
            f"(class subfolders of images) or use --data_set demo"
        )


def _no_images_error(data_path, root):
    where = f"--data_path {data_path}" if root == data_path else f"--data_path {data_path} (its train/ folder)"
    return UsageError(
        f"{where} contains no images in class subfolders (expected {root}/<class>/<image>.JPEG, "
        f"as in ImageNet's train/); point --data_path at such a folder or use --data_set demo"
    )


def _build_image_folder(data_path, transform):
    _check_data_path(data_path)
    train_dir = os.path.join(data_path, "train")
    root = train_dir if os.path.isdir(train_dir) else data_path
    try:
        dataset = PretrainingImageFolder(root, transform=transform)
    except FileNotFoundError as exc:
        # torchvision raises this when there is no class folder at all
        raise _no_images_error(data_path, root) from exc
    if len(dataset) == 0:
        raise _no_images_error(data_path, root)
    return dataset


_CIFAR = {
    "cifar10": (tv_datasets.CIFAR10, "cifar-10-batches-py"),
    "cifar100": (tv_datasets.CIFAR100, "cifar-100-python"),
}


def _build_cifar(name, data_path, transform):
    cls, folder = _CIFAR[name]
    expected = os.path.join(data_path or ".", folder)
    fix = (
        f"downloads are never automatic: run torchvision.datasets.{cls.__name__}(root, download=True) "
        f"once on a machine with internet access and copy {folder}/ into --data_path"
    )
    if not data_path or not os.path.isdir(expected):
        raise UsageError(f"--data_set {name} expects the folder {expected} (--data_path {data_path}); {fix}")
    try:
        base = cls(root=data_path, train=True, download=False, transform=transform)
    except RuntimeError as exc:
        # torchvision md5-checks every batch file and raises RuntimeError on a mismatch
        raise UsageError(
            f"--data_set {name}: files in {expected} are missing or fail torchvision's md5 integrity check "
            f"({one_line(exc)}); {fix}"
        ) from exc
    return LabelDroppedDataset(base)


def build_pretraining_dataset(args):
    """Dataset of ``(img, mask)`` items for ``args.data_set`` (see the module docstring); ``args``:
    run_pretraining.py's arguments or a ``PretrainDataConfig``."""
    data_set = args.data_set
    if data_set not in DATA_SETS:
        raise UsageError(f"--data_set {data_set} is not supported; choose one of {', '.join(DATA_SETS)}")
    if args.data_pipeline == "gpu":
        check_gpu_pipeline(args)
    transform = DataAugmentationForBootMAE(args)
    data_path = args.data_path
    if data_set == "image_folder":
        return _build_image_folder(data_path, transform)
    if data_set in _CIFAR:
        return _build_cifar(data_set, data_path, transform)
    if data_set == "npz":
        path = os.path.join(data_path or ".", "train.npz")
        if not os.path.isfile(path):
            raise UsageError(f"--data_set npz expects {path}; give --data_path the folder holding train.npz")
        return LabelDroppedDataset(NpzImages(path, transform))
    return DemoImages(transform, size=args.demo_size)


def with_transform(dataset, transform, loader=None):
    """A shallow copy of a pretraining dataset (``build_pretraining_dataset``) whose items go through
    ``transform`` (and, for an image folder, whose files are read by ``loader``); files, labels and the
    unreadable-file handling are shared with ``dataset``."""
    import copy
    view = copy.copy(dataset)
    if isinstance(view, LabelDroppedDataset):
        view.base = with_transform(view.base, transform, loader)
    if isinstance(view, PretrainingImageFolder):
        view._bad_indices = set()
        if loader is not None:
            view.loader = loader
    view.transform = transform
    return view


def build_pretraining_loader(args, dataset, sampler, device):
    """The pretraining DataLoader of ``args.data_pipeline`` over ``dataset`` (``build_pretraining_dataset``'s,
    whose pil items stay what other code reads): batches of ``args.batch_size`` (the last partial one dropped),
    ``args.num_workers`` workers, pinned memory on CUDA with ``args.pin_mem``. Workers are not persistent: every
    epoch starts fresh workers seeded from the training loop's per-epoch seed, which keeps a resumed run exact.
    (``gpu`` decodes on ``device``; ``build_pretraining_dataset`` has refused it without CUDA.)"""
    pipeline = args.data_pipeline
    if pipeline not in DATA_PIPELINES:
        raise UsageError(f"--data_pipeline {pipeline} is not supported; choose one of {', '.join(DATA_PIPELINES)}")
    workers = args.num_workers
    kwargs = dict(sampler=sampler, batch_size=args.batch_size, num_workers=workers, drop_last=True,
                  pin_memory=bool(args.pin_mem) and device.type == "cuda", persistent_workers=False)
    if pipeline == "pil":
        return torch.utils.data.DataLoader(dataset, **kwargs)
    if pipeline == "gpu":
        augmentation = JpegAugmentationForBootMAE(args)
        view = with_transform(dataset, augmentation, loader=jpeg_bytes_loader)
        kwargs["collate_fn"] = collate_jpeg
    else:
        augmentation = UInt8AugmentationForBootMAE(args)
        view = with_transform(dataset, augmentation, loader=tensor_rgb_loader)
    loader = torch.utils.data.DataLoader(view, prefetch_factor=4 if workers else None, **kwargs)
    return DeviceBatches(loader, device, *mean_std(args), augmentation.size, jpeg=pipeline == "gpu")


# ---------------------------------------------------------------------------------------------------------
# labelled data sets for fine-tuning, linear probing and kNN evaluation

EVAL_DATA_SETS = ("image_folder", "cifar10", "cifar100", "npz", "demo")


@dataclasses.dataclass
class EvalDataConfig:
    """What ``build_dataset`` and ``build_eval_transform`` read: the flags of the same names of
    run_class_finetuning.py, main_linprobe.py and eval_knn.py (whose parsed arguments carry them all), with
    their defaults (eval_knn.py's --demo_size is 256). A caller without those arguments builds one."""
    data_set: str = "image_folder"
    data_path: Optional[str] = None
    demo_size: int = 2048                      # items per split of --data_set demo
    input_size: int = 224
    crop_pct: Optional[float] = None           # None: 224/256 below 384 px, else 1
    imagenet_default_mean_and_std: bool = False


class NpzImages(Dataset):
    """Images and labels from an ``.npz`` file with ``images`` uint8 [n, H, W, 3] and ``labels`` [n]
    (e.g. a CIFAR subset kept as arrays); items are ``(transform(PIL image), label)``."""

    def __init__(self, path, transform=None):
        with np.load(path, allow_pickle=False) as data:
            if "images" not in data or "labels" not in data:
                raise UsageError(f"{path} needs arrays 'images' [n, H, W, 3] uint8 and 'labels' [n]; it has "
                                 f"{', '.join(data.files)}")
            self.images = data["images"]
            self.targets = [int(t) for t in data["labels"]]
        self.transform = transform
        self.classes = [str(c) for c in sorted(set(self.targets))]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        img = Image.fromarray(self.images[index])
        return (self.transform(img) if self.transform is not None else img), self.targets[index]


class LabelledDemoImages(DemoImages):
    """The demo photos as a classification set: the label of a crop is its photo."""

    def __getitem__(self, index):
        return super().__getitem__(index), self.targets[index]


def build_eval_transform(args):
    """Resize (short side input_size / crop_pct, bicubic) + centre crop + normalise, as BEiT evaluates."""
    size = args.input_size
    crop_pct = args.crop_pct or (224 / 256 if size < 384 else 1.0)
    mean, std = mean_std(args)
    return transforms.Compose([
        transforms.Resize(int(size / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def posterize_0_bits_black(img, bits_to_keep, **kwargs):
    """timm's posterize op, with Pillow's result before version 13 for 0 bits: every bit cleared (black).

    timm's RandAugment keeps ``4 - int(4 * magnitude / 10)`` bits in PosterizeIncreasing (and ``int(4 *
    magnitude / 10)`` in Posterize), so the release's ``rand-m9-mstd0.5-inc1``, whose magnitude is drawn from
    N(9, 0.5) and clipped to 10, asks for 0 bits in 2.3 % of its Posterize draws, about 1 image in 650. Pillow
    up to 12.3 masked every bit away (the release's augmentation: a black image); Pillow 13 raises
    ``ValueError: bits must be between or equal to 1 and 8``, which ended every fine-tuning epoch."""
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def _augment_ops(transform):
    """The timm ``AugmentOp``s inside a Compose built by ``create_transform`` (RandAugment and AugMix keep
    them in ``ops``, AutoAugment in ``policy``, a list of sub-policies)."""
    ops = []
    for t in getattr(transform, "transforms", [transform]):
        ops += list(getattr(t, "ops", []))
        ops += [op for sub_policy in getattr(t, "policy", []) for op in sub_policy]
    return [op for op in ops if isinstance(op, auto_augment.AugmentOp)]


def build_finetune_transform(args):
    """timm's training pipeline with the release's flags (``--aa`` auto-augment, ``--reprob`` random erasing,
    bicubic random-resized crop, flip), normalised by ``mean_std``. At 32 px and below the release (following
    DeiT) replaces the random-resized crop by a random crop with 4 px padding. Every Posterize op of the
    auto-augment policy posterizes to 0 bits as the release's Pillow did (``posterize_0_bits_black``); the ops,
    magnitudes and probabilities are timm's."""
    mean, std = mean_std(args)
    aa = None if args.aa in (None, "", "none", "None") else args.aa
    transform = create_transform(input_size=args.input_size, is_training=True, color_jitter=args.color_jitter,
                                 auto_augment=aa, interpolation=args.train_interpolation, re_prob=args.reprob,
                                 re_mode=args.remode, re_count=args.recount, mean=mean, std=std)
    if args.input_size <= 32:
        transform.transforms[0] = transforms.RandomCrop(args.input_size, padding=4)
    ops = _augment_ops(transform)
    if aa is not None and not ops:
        # every timm policy (rand, augmix, v0, original, 3a, ...) is made of AugmentOps; finding none means a
        # timm release built them differently and the Posterize ops would run unpatched
        raise RuntimeError(f"timm {timm.__version__} built --aa {aa} without the AugmentOps that "
                           f"datasets.build_finetune_transform looks for; update it for this timm")
    for op in ops:
        if op.name.startswith("Posterize"):
            op.aug_fn = posterize_0_bits_black
    return transform


def build_dataset(is_train, args, transform=None):
    """Labelled dataset of ``(img, label)`` items for ``args.data_set`` and ``args.data_path``:

    image_folder  ``data_path/train`` or ``data_path/val`` (ImageNet layout); unreadable images skipped
    cifar10/100   torchvision's on-disk format under ``data_path``
    npz           ``data_path/train.npz`` / ``data_path/test.npz`` (arrays ``images``, ``labels``)
    demo          the bundled photos, labelled by photo (train and val draw different random crops)

    ``args``: an entry point's arguments or an ``EvalDataConfig``; ``transform`` defaults to the evaluation
    transform. Returns (dataset, number of classes).
    """
    data_set = args.data_set
    if data_set not in EVAL_DATA_SETS:
        raise UsageError(f"--data_set {data_set} is not supported here; choose one of {', '.join(EVAL_DATA_SETS)}")
    transform = transform if transform is not None else build_eval_transform(args)
    data_path = args.data_path
    split = "train" if is_train else "val"
    if data_set == "image_folder":
        _check_data_path(data_path)
        root = os.path.join(data_path, split)
        if not os.path.isdir(root):
            raise UsageError(f"--data_path {data_path} has no {split}/ folder; a labelled ImageNet-style folder "
                             f"needs train/<class>/ and val/<class>/ subfolders")
        try:
            dataset = PretrainingImageFolder(root, transform=transform, keep_labels=True)
        except FileNotFoundError as exc:
            raise _no_images_error(data_path, root) from exc
        if len(dataset) == 0:
            raise _no_images_error(data_path, root)
        return dataset, len(dataset.classes)
    if data_set in _CIFAR:
        cls, folder = _CIFAR[data_set]
        base = _build_cifar(data_set, data_path, transform).base
        if not is_train:
            base = cls(root=data_path, train=False, download=False, transform=transform)
        return base, len(base.classes)
    if data_set == "npz":
        path = os.path.join(data_path or ".", "train.npz" if is_train else "test.npz")
        if not os.path.isfile(path):
            raise UsageError(f"--data_set npz expects {path}; give --data_path the folder holding train.npz "
                             f"and test.npz")
        dataset = NpzImages(path, transform)
        return dataset, max(dataset.targets) + 1
    dataset = LabelledDemoImages(transform, size=args.demo_size)
    return dataset, len(dataset.classes)
