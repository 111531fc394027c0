"""The pretraining augmentation and the input pipelines that apply it (``--data_pipeline``).

pil   the workers decode with PIL, crop and resize with PIL (bicubic), flip, convert to float and normalise;
      the batch reaches the training process as float32 (DataAugmentationForBootMAE).
fast  the workers decode with torchvision.io (libjpeg-turbo; PIL for what it cannot read), crop, resize
      (bicubic, antialiased, torch's uint8 kernel) and flip in uint8 and return uint8 images; the training
      process copies the uint8 batch (a quarter of the bytes) to the device and normalises it there
      (DeviceBatches), as timm's prefetcher does.
gpu   the workers read each JPEG's bytes and header only and draw its crop box, flip and mask
      (JpegAugmentationForBootMAE); the training process decodes the batch on the GPU (nvJPEG, through
      torchvision.io.decode_jpeg) and crops, resizes (bicubic, antialiased), flips and normalises it there
      (decode_and_transform).
In every pipeline crop box, flip and mask come from the same calls on the same worker RNGs, so for one seed
all of them crop, flip and mask alike (and a resumed run stays exact).

``DataAugmentationForBootMAE`` is the pil pipeline's transform; ``datasets.build_pretraining_loader`` builds
the DataLoader of each pipeline over ``datasets.build_pretraining_dataset``'s images. All of them read their
settings from run_pretraining.py's parsed arguments or from a ``PretrainDataConfig``, which holds the same
fields with the parser's defaults, except the grid-dependent ones (patch size and mask counts; see its fields).
"""
import dataclasses
import io
from typing import Optional

import numpy as np
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms
from torchvision.transforms import InterpolationMode

import masking_generator
from utils import UsageError, default_device


BOOTMAE_MEAN = (0.5, 0.5, 0.5)


BOOTMAE_STD = (0.5, 0.5, 0.5)


IMAGENET_MEAN = tuple(IMAGENET_DEFAULT_MEAN)


IMAGENET_STD = tuple(IMAGENET_DEFAULT_STD)


# The release's masks at 224 px with 16 px patches: 147 of the 196 patches masked, up to 120 of them in blocks
RELEASE_NUM_PATCHES, RELEASE_MASK_NUM, RELEASE_BLOCK_BUDGET = 196, 147, 120


def release_mask_counts(num_patches):
    """(masked patches, block budget) of the release's masks scaled to a grid of ``num_patches`` patches."""
    return (int(round(num_patches * RELEASE_MASK_NUM / RELEASE_NUM_PATCHES)),
            int(round(num_patches * RELEASE_BLOCK_BUDGET / RELEASE_NUM_PATCHES)))


@dataclasses.dataclass
class PretrainDataConfig:
    """What the pretraining data functions read (``datasets.build_pretraining_dataset`` and
    ``build_pretraining_loader``, the augmentations and ``check_gpu_pipeline`` here): run_pretraining.py's flags
    of the same names, with its defaults. run_pretraining.py passes its parsed arguments, which carry all of
    them; a caller without them (a benchmark, a test, a notebook) builds one and sets what it changes."""
    data_set: str = "image_folder"
    data_path: Optional[str] = None
    demo_size: int = 2048                        # items per epoch of --data_set demo
    data_pipeline: str = "pil"
    device: str = dataclasses.field(default_factory=default_device)   # where --data_pipeline gpu decodes
    batch_size: int = 256
    num_workers: int = 10
    pin_mem: bool = True
    input_size: int = 224
    patch_size: int = 16                         # run_pretraining.py: the model's, 16 for its default model
    min_crop_scale: float = 0.2
    imagenet_default_mean_and_std: bool = False
    mask_type: str = "release"
    mask_num: Optional[int] = None               # None: release_mask_counts (147 at 224 px, the flag's default)
    num_mask_patches: Optional[int] = None       # None: release_mask_counts (120 at 224 px, the flag's default)
    min_mask_patches_per_block: int = 16
    max_mask_patches_per_block: int = 60


def mean_std(args):
    """The release normalises with 0.5 / 0.5; ``--imagenet_default_mean_and_std`` switches to ImageNet's."""
    if args.imagenet_default_mean_and_std:
        return IMAGENET_MEAN, IMAGENET_STD
    return BOOTMAE_MEAN, BOOTMAE_STD


class DataAugmentationForBootMAE:
    """Random-resized-crop + flip + normalise, plus a freshly drawn patch mask; ``args``: run_pretraining.py's
    arguments or a ``PretrainDataConfig``."""

    def __init__(self, args):
        input_size, patch_size = args.input_size, args.patch_size
        if input_size % patch_size != 0:
            raise UsageError(
                f"--input_size {input_size} is not a multiple of --patch_size {patch_size}; "
                f"choose sizes such that input_size / patch_size is an integer"
            )
        min_scale = args.min_crop_scale
        if not 0 < min_scale <= 1:
            raise UsageError(f"--min_crop_scale {min_scale} is not a fraction of the image area; "
                             f"give a value in (0, 1]")
        mean, std = mean_std(args)
        self.transform = transforms.Compose([
            transforms.RandomResizedCrop(input_size, scale=(min_scale, 1.0), interpolation=InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean=mean, std=std),
        ])

        grid = input_size // patch_size
        num_patches = grid * grid
        # unset counts (None) are the release's, scaled to the grid
        release_mask_num, release_budget = release_mask_counts(num_patches)
        mask_num = release_mask_num if args.mask_num is None else args.mask_num
        num_block_patches = release_budget if args.num_mask_patches is None else args.num_mask_patches
        self.num_patches = num_patches
        try:
            self.masked_position_generator = masking_generator.build_masking_generator(
                args.mask_type,
                (grid, grid),
                int(mask_num),
                num_block_patches,
                args.min_mask_patches_per_block,
                args.max_mask_patches_per_block,
            )
        except ValueError as exc:
            # the generator's messages name the offending flag; they are user errors
            raise UsageError(one_line(exc)) from exc

    def __call__(self, image):
        img = self.transform(image)
        return img, self.draw_mask()

    def draw_mask(self):
        """A fresh flattened bool patch mask [N] (True = masked) from the generator's own stream."""
        return torch.from_numpy(np.asarray(self.masked_position_generator(), dtype=bool).reshape(-1))

    def __repr__(self):
        return (
            f"{type(self).__name__}(\n"
            f"  transform = {self.transform!r},\n"
            f"  masked_position_generator = {self.masked_position_generator!r}\n"
            f")"
        )


def pil_rgb_loader(path):
    # convert() forces the full decode here, so truncation surfaces inside the
    # caller's try block rather than later inside the transform.
    with Image.open(path) as img:
        return img.convert("RGB")


def one_line(exc):
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


DATA_PIPELINES = ("pil", "fast", "gpu")


def tensor_rgb_loader(path):
    """uint8 RGB image [3, H, W] (channels last in memory) decoded by torchvision.io (libjpeg-turbo for JPEG).
    What torchvision cannot decode goes to PIL (``pil_rgb_loader``): formats torchvision lacks are read there,
    and a broken file raises PIL's error, which ``PretrainingImageFolder`` reports and skips."""
    from torchvision.io import ImageReadMode, decode_image, read_file
    try:
        return decode_image(read_file(path), mode=ImageReadMode.RGB)
    except RuntimeError:
        return uint8_image(pil_rgb_loader(path))


def uint8_image(image):
    """A PIL image (or a uint8 tensor [3, H, W], returned as it is) as uint8 RGB [3, H, W], channels last in
    memory."""
    if torch.is_tensor(image):
        return image
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)


def resized_crop(image, box, size, flip):
    """``image`` [3, H, W] cropped to ``box`` (top, left, height, width), resized to ``size`` (h, w) bicubic
    with antialiasing, and flipped left-right if ``flip``: [3, h, w], uint8 in uint8 out (torch's uint8 kernel,
    a port of PIL's resampling, used when the crop is channels last), float in float out."""
    top, left, height, width = (int(v) for v in box)
    x = image[:, top:top + height, left:left + width].unsqueeze(0)
    if x.dtype == torch.uint8:
        x = x.contiguous(memory_format=torch.channels_last)
    x = torch.nn.functional.interpolate(x, size=tuple(size), mode="bicubic", antialias=True, align_corners=False)
    x = x[0]
    return x.flip(-1) if flip else x


def normalise_uint8(images, mean, std):
    """uint8 images [B, 3, H, W] (or float in 0..255) -> float32, normalised by ``mean``/``std`` (given for
    [0, 1] pixels), on the images' device: (x - 255 mean) / (255 std), as timm's prefetcher does."""
    scale = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1) * 255
    shift = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1) * 255
    return (images.float() - shift) / scale


class UInt8AugmentationForBootMAE(DataAugmentationForBootMAE):
    """``DataAugmentationForBootMAE`` in uint8 (``--data_pipeline fast``): the same random-resized-crop box
    (``RandomResizedCrop.get_params`` with the same scale and ratio), the same flip draw and the same mask, from
    the same RNG calls in the same order; the image is cropped, resized and flipped by ``resized_crop`` and
    returned as uint8 [3, h, w], to be normalised on the device (``normalise_uint8``)."""

    def __init__(self, args):
        super().__init__(args)
        crop, flip = self.transform.transforms[:2]
        self.size, self.scale, self.ratio, self.flip_p = tuple(crop.size), crop.scale, crop.ratio, flip.p

    def draw(self, image):
        """(crop box, flip) of one image (PIL or tensor), drawn as the pil pipeline's transforms draw them."""
        box = transforms.RandomResizedCrop.get_params(image, self.scale, self.ratio)
        return box, bool(torch.rand(1) < self.flip_p)

    def __call__(self, image):
        image = uint8_image(image)
        box, flip = self.draw(image)
        return resized_crop(image, box, self.size, flip), self.draw_mask()


def jpeg_bytes_loader(path):
    """(the file's JPEG bytes as a uint8 tensor, (width, height)), checked without decoding the image: PIL
    reads the header (a file that is no image raises), and a JPEG without an End-Of-Image marker after its
    last Start-Of-Scan is truncated (raises OSError). Other formats and the JPEGs nvJPEG does not decode
    (CMYK, ...) are decoded by PIL here and handed on re-encoded as RGB JPEG (quality 95, no chroma
    subsampling)."""
    with Image.open(path) as img:   # the header only; opened by path so that errors name the file
        size, fmt, mode = img.size, img.format, img.mode
    with open(path, "rb") as f:
        data = f.read()
    if fmt == "JPEG" and mode in ("RGB", "L"):
        scan = data.rfind(b"\xff\xda")
        if scan < 0 or data.rfind(b"\xff\xd9") < scan:
            raise OSError("image file is truncated (no end-of-image marker after the last scan)")
    else:
        buffer = io.BytesIO()
        pil_rgb_loader(path).save(buffer, format="JPEG", quality=95, subsampling=0)
        data = buffer.getvalue()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), size


class JpegAugmentationForBootMAE(UInt8AugmentationForBootMAE):
    """The worker side of ``--data_pipeline gpu``: for an undecoded JPEG (``jpeg_bytes_loader``'s item) the
    crop box, flip and mask of the pil pipeline's calls; items ``(bytes, box [4], flip, mask)``, collated by
    ``collate_jpeg`` and decoded and transformed on the device by ``decode_and_transform``."""

    def __call__(self, item):
        data, (width, height) = item
        box, flip = self.draw(torch.empty(1, 1, 1).expand(3, height, width))   # get_params reads the shape only
        return data, torch.tensor(box), flip, self.draw_mask()


def collate_jpeg(items):
    """``JpegAugmentationForBootMAE`` items -> (list of byte tensors, boxes [B, 4], flips [B], masks [B, N])."""
    datas, boxes, flips, masks = zip(*items)
    return list(datas), torch.stack(boxes), torch.tensor(flips), torch.stack(masks)


def decode_and_transform(datas, boxes, flips, size, mean, std, device):
    """The device side of ``--data_pipeline gpu``: the JPEGs ``datas`` decoded on ``device`` (nvJPEG on CUDA,
    libjpeg-turbo on the CPU), each cropped to its box, resized to ``size`` (bicubic, antialiased, in float32,
    then clamped to 0..255 and rounded as the uint8 pipelines store pixels), flipped where ``flips`` says, and
    normalised: float32 [B, 3, h, w] on ``device``."""
    from torchvision.io import ImageReadMode, decode_jpeg
    images = decode_jpeg(list(datas), mode=ImageReadMode.RGB, device=device)
    out = torch.stack([resized_crop(x.float(), box, size, flip)
                       for x, box, flip in zip(images, boxes.tolist(), flips.tolist())])
    return normalise_uint8(out.clamp_(0, 255).round_(), mean, std)


def check_gpu_pipeline(args):
    """``--data_pipeline gpu`` needs JPEG files (an image folder) and a CUDA device; a one-line error otherwise."""
    if args.data_set != "image_folder":
        raise UsageError(f"--data_pipeline gpu decodes the JPEG files of --data_set image_folder, not --data_set "
                         f"{args.data_set}; use --data_pipeline pil (or fast)")
    device = str(args.device)
    if not (device.startswith("cuda") and torch.cuda.is_available()):
        raise UsageError(f"--data_pipeline gpu decodes on a CUDA device and this run has none (--device {device}); "
                         f"use --data_pipeline pil")


class DeviceBatches:
    """Batches of a ``fast`` or ``gpu`` DataLoader as the training loop takes them: float32 images on
    ``device``, made there (uint8 batches copied non-blocking from pinned memory and normalised by
    ``normalise_uint8``; JPEG batches by ``decode_and_transform``); masks stay on the host, where the loop
    reads the masked count without waiting for the device."""

    def __init__(self, loader, device, mean, std, size, jpeg=False):
        self.loader, self.device, self.mean, self.std, self.size, self.jpeg = loader, device, mean, std, size, jpeg

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if self.jpeg:
                datas, boxes, flips, mask = batch
                yield decode_and_transform(datas, boxes, flips, self.size, self.mean, self.std, self.device), mask
            else:
                images, mask = batch
                yield normalise_uint8(images.to(self.device, non_blocking=True), self.mean, self.std), mask
