"""The reconstruction grid a pretraining run draws (``reconstruction.png`` and TensorBoard's ``reconstruction``):
input, masked input, target, prediction and the prediction pasted into the visible patches."""
import os

import numpy as np
import torch

from datasets import mean_std
from engine_for_pretraining import normalized_pixel_target, patchify, pixels_of_prediction, unpatchify


# the columns of the reconstruction grid; target and prediction are shown in the space of --pixel_norm
RECONSTRUCTION_COLUMNS = ("input", "masked input", "target", "prediction", "pasted")
RECONSTRUCTION_MIN_SIDE = 96   # smaller panels are enlarged (nearest neighbour) so that the labels fit
RECONSTRUCTION_HEADER = 28     # pixels above the grid for the two-line column labels


def reconstruction_panels(images, mask, pixel_pred, patch_size, norm, mean, std):
    """The reconstruction grid's panels, [B, 5, 3, H, W] in [0, 1], in the order of ``RECONSTRUCTION_COLUMNS``:

    input         the image (the dataset normalisation undone)
    masked input  its visible patches; masked ones black
    target        the pixel target of ``norm`` (``normalized_pixel_target``) on the masked patches
    prediction    the regressor's output as it is, on the masked patches, drawn exactly as the target
    pasted        the visible patches with the prediction in the masked ones, in pixels: the prediction
                  de-normalised with the true patches' own mean and std (``pixels_of_prediction``)

    Target and prediction share one fixed mapping: per-patch normalised values (``channel``, ``patch``) as
    0.5 + v / 6 (-3..3 std to black..white), ``none`` as pixels; visible patches are black (no loss there).
    A regressor that predicts zeros shows a flat panel there, whatever the target."""
    B, _, H, W = images.shape
    grid = (H // patch_size, W // patch_size)
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images.device)
    std = torch.as_tensor(std, dtype=torch.float32, device=images.device)

    def show(patches, as_pixels):
        x = patches.float().reshape(B, grid[0] * grid[1], -1, 3)   # (p, q, channel) order: channel last
        x = x * std + mean if as_pixels else 0.5 + x / 6
        return unpatchify(x.clamp(0, 1).flatten(2), patch_size, grid)

    patches = patchify(images.float(), patch_size)
    m = mask.reshape(B, -1, 1).float()
    masked = unpatchify(m.expand_as(patches), patch_size, grid)
    pixels = norm == "none"
    pasted = patches * (1 - m) + pixels_of_prediction(pixel_pred, images, patch_size, norm=norm) * m
    panels = [show(patches, True), show(patches, True) * (1 - masked),
              show(normalized_pixel_target(images, patch_size, norm=norm), pixels) * masked,
              show(pixel_pred, pixels) * masked, show(pasted, True)]
    return torch.stack(panels, 1)


def reconstruction_grid(panels, norm):
    """The panels [B, 5, 3, H, W] as one labelled uint8 image [H', W', 3]: one row per image, a header that
    names each column (and the normalisation that target and prediction are shown in)."""
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid
    B, C, _, H, W = panels.shape
    scale = -(-RECONSTRUCTION_MIN_SIDE // min(H, W))
    x = panels.flatten(0, 1).repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    grid = make_grid(x, nrow=C, padding=2, pad_value=1.0)
    header = torch.ones(3, RECONSTRUCTION_HEADER, grid.shape[-1], dtype=grid.dtype, device=grid.device)
    rgb = (torch.cat([header, grid], 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    space = "pixels" if norm == "none" else f"{norm} norm"
    second = {"target": space, "prediction": space, "pasted": "true mean/std" if norm != "none" else ""}
    img = Image.fromarray(rgb)
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    for col, name in enumerate(RECONSTRUCTION_COLUMNS):
        left = 2 + col * (W * scale + 2)
        draw.text((left + 2, 2), name, fill=(0, 0, 0), font=font)
        draw.text((left + 2, 14), second.get(name, ""), fill=(0, 0, 0), font=font)
    return np.asarray(img)


@torch.no_grad()
def save_reconstruction(args, model, dataset, device, path, log_writer=None, epoch=0, num_images=4):
    """The first ``num_images`` items of ``dataset`` through ``model`` (eval mode, float32): the labelled grid
    of ``reconstruction_panels`` written to ``path`` (PNG, atomically) and to TensorBoard (``reconstruction``,
    step ``epoch``). Returns the panels, or None for a model without a pixel regressor (nothing to show)."""
    was_training = model.training
    model.eval()
    items = [dataset[i] for i in range(min(num_images, len(dataset)))]
    images = torch.stack([torch.as_tensor(x) for x, _ in items]).to(device).float()
    mask = torch.stack([torch.as_tensor(m).flatten() for _, m in items]).to(device)
    pixel_pred, _ = model(images, mask, feature=False)
    model.train(was_training)
    if pixel_pred is None:
        return None
    panels = reconstruction_panels(images, mask, pixel_pred, model.patch_size, args.pixel_norm, *mean_std(args))
    grid = reconstruction_grid(panels, args.pixel_norm)
    from PIL import Image
    Image.fromarray(grid).save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)
    if log_writer is not None:
        log_writer.add_image("reconstruction", grid, epoch, dataformats="HWC")
    return panels
