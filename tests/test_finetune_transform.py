"""The fine-tuning training transform (datasets.build_finetune_transform) under the installed Pillow and timm.

timm's RandAugment asks Pillow to posterize to 0 bits at magnitude 10, which the release's
``rand-m9-mstd0.5-inc1`` reaches in about 1 image in 650; Pillow 13 refuses 0 bits. These tests put
the default transform through thousands of images and one tiny fine-tuning epoch with the default ``--aa``.
"""
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision import transforms

import datasets
import run_class_finetuning as rcf
from shared_helpers import read_log
from test_finetune import _common, _in_process, files, one_thread  # noqa: F401 (fixtures)

RELEASE_AA = "rand-m9-mstd0.5-inc1"  # the release's --aa default, which its fine-tuning scripts keep


def _default_args(*argv):
    return rcf.get_args_parser().parse_args(list(argv))


def _posterize_ops(transform):
    return [op for op in datasets._augment_ops(transform) if op.name.startswith("Posterize")]


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_posterize_0_bits_is_black_and_other_bits_are_pillows(mode):
    rng = np.random.default_rng(0)
    shape = (9, 7, 3) if mode == "RGB" else (9, 7)
    img = Image.fromarray(rng.integers(1, 256, shape, dtype=np.uint8), mode)
    black = datasets.posterize_0_bits_black(img, 0)
    assert (black.mode, black.size) == (img.mode, img.size)
    assert not np.asarray(black).any()
    for bits in range(1, 9):
        assert np.array_equal(np.asarray(datasets.posterize_0_bits_black(img, bits)),
                              np.asarray(ImageOps.posterize(img, bits))), bits


def test_default_transform_is_the_releases_with_every_posterize_patched():
    args = _default_args()
    assert args.aa == RELEASE_AA
    transform = datasets.build_finetune_transform(args)
    ops = datasets._augment_ops(transform)
    # timm's RandAugment 'inc1' set: 15 ops, magnitude 9, std 0.5, probability 0.5, as timm builds them
    assert len(ops) == 15
    assert {(op.magnitude, op.magnitude_std, op.prob) for op in ops} == {(9, 0.5, 0.5)}
    assert [op.name for op in _posterize_ops(transform)] == ["PosterizeIncreasing"]
    assert all(op.aug_fn is datasets.posterize_0_bits_black for op in _posterize_ops(transform))
    assert all(op.aug_fn is not datasets.posterize_0_bits_black for op in ops if op not in _posterize_ops(transform))
    # every timm policy family gets the patched posterize
    for aa in ("rand-m9-mstd0.5", "v0", "augmix-m5-w3"):
        posterize = _posterize_ops(datasets.build_finetune_transform(_default_args("--aa", aa)))
        assert posterize and all(op.aug_fn is datasets.posterize_0_bits_black for op in posterize), aa
    assert not datasets._augment_ops(datasets.build_finetune_transform(_default_args("--aa", "none")))


def test_cifar_inputs_take_a_padded_random_crop():
    first = datasets.build_finetune_transform(_default_args("--input_size", "32")).transforms[0]
    assert (type(first).__name__, first.size, first.padding) == ("RandomCrop", (32, 32), 4)
    first = datasets.build_finetune_transform(_default_args("--input_size", "48")).transforms[0]
    assert type(first).__name__ == "RandomResizedCropAndInterpolation"


def test_error_timm_policy_without_augment_ops(monkeypatch):
    monkeypatch.setattr(datasets, "create_transform", lambda **kwargs: transforms.Compose([transforms.ToTensor()]))
    with pytest.raises(RuntimeError, match="without the AugmentOps"):
        datasets.build_finetune_transform(_default_args())


def test_5000_images_through_the_default_transform():
    transform = datasets.build_finetune_transform(_default_args())
    requested = []

    def spy(fn):
        def wrapped(img, bits, **kwargs):
            out = fn(img, bits, **kwargs)
            requested.append((bits, bits > 0 or not np.asarray(out).any()))
            return out
        return wrapped

    for op in _posterize_ops(transform):
        op.aug_fn = spy(op.aug_fn)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n = 5000
    for _ in range(n):
        h, w = rng.integers(32, 65, 2)
        out = transform(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
        assert out.shape == (3, 224, 224)
    zero = [ok for bits, ok in requested if bits == 0]
    # with these seeds 6 of the 5,000 images (329 Posterize draws) ask for 0 bits, each of which Pillow 13
    # refuses; each gave a black image
    assert zero and all(zero), (len(zero), len(requested))


def test_one_epoch_fine_tune_with_the_default_aa(files, capsys, monkeypatch):  # noqa: F811
    built, build = [], datasets.build_finetune_transform
    monkeypatch.setattr(datasets, "build_finetune_transform", lambda args: built.append(build(args)) or built[-1])
    out = files["root"] / "default_aa"
    _in_process(_common(files, out, "--epochs", "1"), capsys)
    # built once to validate the augmentation flags, once for the training data: both carry the patched op
    assert built
    for transform in built:
        assert [op.aug_fn for op in _posterize_ops(transform)] == [datasets.posterize_0_bits_black]
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0] and np.isfinite(log[0]["train_loss"])
    assert (out / "checkpoint-last.pth").is_file()
