"""The BootMAE encoder as a 4-scale backbone for dense prediction (semantic_segmentation/, detection/).

``ViTPyramid`` *is* the repository's encoder (``modeling_vit.VisionTransformer`` with its ``Block``s, drop
path and fixed 2-D sin-cos position embedding recomputed for every input grid): inputs are padded at the
bottom/right to a multiple of the patch size, the patch tokens after blocks 4, 6, 8 and 12 (of 12; the same
fractions of deeper encoders: 8, 12, 16, 24 for ViT-L) are laid out as maps at stride P and turned into a
pyramid as in the release (BEiT's adapter):

    fpn1  x4    ConvTranspose(2, 2) -> BatchNorm (SyncBN on several processes) -> GELU -> ConvTranspose(2, 2)
    fpn2  x2    ConvTranspose(2, 2)
    fpn3  x1    identity
    fpn4  x0.5  MaxPool(2, 2)

so a ViT-B/16 gives four 768-channel maps at strides 4, 8, 16 and 32. Parameter names are the encoder's
(``patch_embed.*``, ``cls_token``, ``blocks.*``) plus ``fpn1``..``fpn4``, the release's names, so the encoder
loads with ``release_format.load_encoder`` and the release's fine-tuned UperNet backbone maps one to one.

The release fine-tuned on ADE20K with BEiT's backbone, which adds three things that BootMAE's pretraining does
not have: a learned position embedding (initialised from the pretraining table), a relative position bias per
block (zeros at the start) and a learnable layer scale (``gamma_1``/``gamma_2``, ones at the start). They are
off by default (this repository's encoder as pretrained); ``release_layout=True`` switches all three on (the
last two are the ``layer_scale_init`` and relative position bias options of ``vit_layers.Block``, under the
release's key names), which is what its UperNet checkpoint needs (see ``convert_release_segmentor``).

Also here: converters from pretraining checkpoints (ours or the release's, online or momentum encoder) to
backbone weights, and from the release's UperNet checkpoint to an mmsegmentation 1.x checkpoint:

    python backbone_vit.py convert --checkpoint out/checkpoint-799.pth --output bootmae_base_backbone.pth
    python backbone_vit.py convert --checkpoint out/checkpoint-799.pth --model_key model_ema --output ema.pth
    python backbone_vit.py convert-release-upernet --checkpoint BootMAE_Base_800_UperNet.pth --output upernet.pth

The OpenMMLab side (layer-decay optimizer constructor, weights-only loading, the train/test entry) is
``openmmlab_glue``; its entry points are also reachable here. Nothing here imports OpenMMLab at module level:
the backbone and the converters are plain PyTorch.
"""
import argparse
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
import modeling_bootmae
import release_format
import utils
from modeling_vit import VisionTransformer
from openmmlab_glue import load_openmmlab_checkpoint
# the OpenMMLab entry points as README, the configs' shims and older scripts name them: backbone_vit.<name>
from openmmlab_glue import openmmlab_main, openmmlab_safe_loading, register_mmengine  # noqa: F401
from vit_layers import LayerNorm

# the paper's (and BEiT's) feature blocks for a 12-block encoder, 1-based
BASE_OUT_BLOCKS = (4, 6, 8, 12)


def default_out_indices(depth):
    """0-based indices of the blocks whose outputs feed the pyramid: blocks 4, 6, 8, 12 of 12, scaled to the
    depth (ViT-L, 24 blocks: 8, 12, 16, 24 -> indices 7, 11, 15, 23, as BEiT's ViT-L config)."""
    out = [max(1, round(b * depth / 12)) - 1 for b in BASE_OUT_BLOCKS]
    if len(set(out)) != len(out):
        raise ValueError(f"an encoder of depth {depth} is too shallow for four distinct feature blocks; "
                         f"pass out_indices")
    return out

class ViTPyramid(VisionTransformer):
    """The BootMAE encoder with a 4-scale output (see the module docstring).

    Args (beyond ``VisionTransformer``'s): ``out_indices`` (0-based feature blocks; default blocks 4/6/8/12 of
    12 scaled to the depth), ``pretrained`` (a checkpoint loaded by ``init_weights``, which OpenMMLab's models
    call before training: ours or the release's, pretraining or converted), ``model_key`` (the entry of a
    pretraining checkpoint to read: ``model`` for the online encoder, ``model_ema`` for the momentum encoder),
    ``norm`` ('SyncBN' as the release, which is plain BatchNorm in a single process, or 'BN'), ``with_cp``
    (activation checkpointing of the blocks), ``release_layout`` (the release's fine-tuning extras, above).
    """

    def __init__(self, img_size=512, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1,
                 out_indices=None, pretrained=None, model_key="model|module", norm="SyncBN", with_cp=False,
                 release_layout=False, layer_scale_init=1.0):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                         drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate,
                         norm_layer=LayerNorm, layer_scale_init=layer_scale_init if release_layout else None,
                         use_rel_pos_bias=release_layout)
        self._init_encoder()
        # the pyramid reads block outputs before any norm (as BEiT and the release): the final norm would be
        # a parameter without gradient, which distributed training rejects
        self.norm = nn.Identity()
        self.out_indices = list(default_out_indices(depth) if out_indices is None else out_indices)
        if len(self.out_indices) != 4 or not all(0 <= i < depth for i in self.out_indices):
            raise ValueError(f"out_indices must be four block indices in [0, {depth}), got {self.out_indices}")
        self.num_layers = depth
        self.pretrained = pretrained
        self.model_key = model_key
        self.release_layout = release_layout
        self.set_grad_checkpointing(with_cp)

        if norm == "SyncBN":
            bn = nn.SyncBatchNorm(embed_dim)
        elif norm == "BN":
            bn = nn.BatchNorm2d(embed_dim)
        else:
            raise ValueError(f"norm must be 'SyncBN' or 'BN', got {norm!r}")
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2), bn, nn.GELU(),
                                  nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2))
        self.fpn2 = nn.Sequential(nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2))
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(kernel_size=2, stride=2)

        if release_layout:
            # a learned table, started from the fixed one of the training grid (the release loaded the
            # pretraining table into a learned parameter)
            table = self.pos_embed.clone()
            del self.pos_embed
            self.pos_embed = nn.Parameter(table)

    # -------------------------------------------------------------------------------------------- forward

    @property
    def out_strides(self):
        p = self.patch_size
        return (p / 4, p / 2, p, 2 * p)

    def get_pos_embed(self, grid, pos_embed=None, dim=None):
        if not self.release_layout:
            return super().get_pos_embed(grid, pos_embed, dim)
        # learned table: bicubic resize of its patch part to other grids (the cls row is kept)
        table = self.pos_embed
        base = tuple(self.patch_embed.grid_size)
        if tuple(grid) == base:
            return table
        patch = table[:, 1:].reshape(1, *base, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch.float(), size=tuple(grid), mode="bicubic", align_corners=False)
        patch = patch.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(table.dtype)
        return torch.cat([table[:, :1], patch], dim=1)

    def forward(self, images):
        """images [B, C, H, W] (any H, W) -> 4 maps [B, D, ceil(H/P)*4, ...], [.. *2], [.. *1], [.. /2]."""
        B, _, H, W = images.shape
        p = self.patch_size
        pad_h, pad_w = (-H) % p, (-W) % p
        if pad_h or pad_w:
            # zeros after normalisation: the mean colour, as OpenMMLab pads its batches
            images = F.pad(images, (0, pad_w, 0, pad_h))
        grid = self.grid_size(images)
        x, pos = self.embed(images)
        x = self.with_cls(x, pos)
        feats = []
        last = max(self.out_indices)
        for i, blk in enumerate(self.blocks):
            if i > last:
                break
            x = self.run_block(blk, x, grid)
            if i in self.out_indices:
                feats.append(x[:, 1:].transpose(1, 2).reshape(B, -1, *grid).contiguous())
        ops = (self.fpn1, self.fpn2, self.fpn3, self.fpn4)
        return tuple(op(f) for op, f in zip(ops, feats))

    # -------------------------------------------------------------------------------------------- weights

    def no_weight_decay(self):
        return {"cls_token", "pos_embed"}

    def init_weights(self):
        """Called by OpenMMLab's models before training: loads ``pretrained`` if given (the encoder
        initialisation of ``__init__`` stays otherwise)."""
        if self.pretrained:
            self.load_pretrained(self.pretrained, self.model_key)

    def load_pretrained(self, path, model_key=None, verbose=True):
        """Loads backbone weights from a checkpoint (see ``backbone_state_dict``) and reports what was
        loaded. Returns (loaded, not_in_checkpoint, unused) key lists."""
        model_key = model_key or self.model_key
        checkpoint = load_openmmlab_checkpoint(path)
        try:
            state = backbone_state_dict(checkpoint, model_key)
            loaded, missing, unused = release_format.load_encoder(self, state)
        except ValueError as e:
            raise utils.UsageError(f"{path}: {e}") from e
        if not any(k.startswith("blocks.") for k in loaded):
            raise utils.UsageError(f"{path}: no encoder block of the checkpoint fits this backbone")
        if verbose:
            utils.print0(report_loading(path, model_key, loaded, missing, unused))
        return loaded, missing, unused


def report_loading(path, model_key, loaded, missing, unused):
    """Lines saying what was transferred: counts, then the names grouped by their first two parts."""
    def short(keys):
        groups = []
        for k in keys:
            parts = k.split(".")
            g = ".".join(parts[:2]) if parts[0] in ("blocks", "fpn1", "fpn2") else parts[0]
            if g not in groups:
                groups.append(g)
        return ", ".join(groups) if groups else "none"
    lines = [f"backbone: loaded {len(loaded)} tensors from {path} (entry '{model_key}')",
             f"  newly initialised (not in the checkpoint): {short(missing)}"]
    if unused:
        lines.append(f"  in the checkpoint but not used: {short(unused)}")
    return "\n".join(lines)


def backbone_state_dict(checkpoint, model_key="model|module"):
    """Backbone tensors, in ``ViTPyramid``'s names, from a loaded checkpoint of any of these kinds:

    * a pretraining or fine-tuning checkpoint, ours or the release's (``model``/``model_ema``/``module``, or a
      bare state dict): its encoder via ``release_format.encoder_state_dict`` (decoders, heads and the
      release's fixed position table dropped; the fixed table is recomputed here);
    * a file written by ``python backbone_vit.py convert`` (the same, under ``model``);
    * an OpenMMLab checkpoint (``state_dict`` with ``backbone.`` keys, e.g. a trained UperNet or Mask R-CNN):
      its backbone, pyramid and the release's extras included (``relative_position_index`` is recomputed).
    """
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        state = checkpoint["state_dict"]
        out = {k[len("backbone."):]: v for k, v in state.items()
               if k.startswith("backbone.") and torch.is_tensor(v) and not k.endswith("relative_position_index")}
        if any(k.startswith("blocks.") for k in out):
            return out
    return release_format.encoder_state_dict(checkpoint, model_key)


# ---------------------------------------------------------------------------------------------- conversion

def infer_config(state):
    """(embed_dim, depth, num_heads, patch_size) of an encoder state dict (heads from modeling_bootmae's sizes,
    else 64-wide heads)."""
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise utils.UsageError("the checkpoint entry holds no encoder (no cls_token / patch_embed.proj.weight)")
    dim = state["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    patch = state["patch_embed.proj.weight"].shape[-1]
    if "blocks.0.attn.relative_position_bias_table" in state:
        heads = state["blocks.0.attn.relative_position_bias_table"].shape[1]
    else:
        # the weights do not fix the head count (it only splits qkv); the known sizes, else 64-wide heads
        heads = next((c["num_heads"] for c in modeling_bootmae.MODEL_SIZES.values()
                      if c["embed_dim"] == dim and c["depth"] == depth), max(1, dim // 64))
    return dim, depth, heads, patch


def convert(checkpoint_path, output, model_key="model|module"):
    """Pretraining/fine-tuning checkpoint -> ``{'model': backbone tensors, 'meta': {...}}``, checked by
    loading it into a ``ViTPyramid`` of the checkpoint's size. Returns the report lines."""
    checkpoint = load_openmmlab_checkpoint(checkpoint_path)
    try:
        state = backbone_state_dict(checkpoint, model_key)
    except ValueError as e:
        raise utils.UsageError(f"{checkpoint_path}: {e}") from e
    dim, depth, heads, patch = infer_config(state)
    release = any(k.endswith(("gamma_1", "relative_position_bias_table")) for k in state)
    model = ViTPyramid(embed_dim=dim, depth=depth, num_heads=heads, patch_size=patch, norm="BN",
                       release_layout=release)
    loaded, missing, unused = release_format.load_encoder(model, state)
    kept = {k: v.detach().clone().contiguous() for k, v in state.items() if k in set(loaded)}
    meta = {"source": os.path.abspath(checkpoint_path), "model_key": model_key, "embed_dim": dim, "depth": depth,
            "patch_size": patch, "release_layout": release}
    checkpoints.save_on_master({"model": kept, "meta": meta}, output)
    report = report_loading(checkpoint_path, model_key, loaded, missing, unused)
    return report + f"\nwrote {output}: ViT width {dim}, depth {depth}, patch {patch}" + \
        (f", {heads} heads, with the release's fine-tuning extras" if release else "")


def convert_release_segmentor(checkpoint_path, output):
    """The release's UperNet checkpoint (mmsegmentation 0.x, BEiT backbone) -> an mmsegmentation 1.x
    checkpoint for ``semantic_segmentation/configs/upernet_bootmae_base_release_layout_512_160k_ade20k.py``:
    the model's tensors only (no optimizer, no mmcv 1.x meta), ``relative_position_index`` dropped (it is
    recomputed). The heads' names (UPerHead, FCNHead) are the same in both mmsegmentation versions; the
    backbone's are checked by loading them strictly into a ``ViTPyramid(release_layout=True)``."""
    checkpoint = load_openmmlab_checkpoint(checkpoint_path)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise utils.UsageError(f"{checkpoint_path} has no 'state_dict' entry: not an mmsegmentation checkpoint")
    state = {k: v for k, v in state.items() if torch.is_tensor(v) and not k.endswith("relative_position_index")}
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    dim, depth, heads, patch = infer_config(backbone)
    grid = int(round(math.sqrt(backbone["pos_embed"].shape[1] - 1))) if "pos_embed" in backbone else 32
    model = ViTPyramid(img_size=grid * patch, embed_dim=dim, depth=depth, num_heads=heads, patch_size=patch,
                       norm="BN", release_layout="blocks.0.gamma_1" in backbone)
    result = model.load_state_dict(backbone, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise utils.UsageError(f"{checkpoint_path}: the backbone does not match ViTPyramid(release_layout=True): "
                               f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    meta = {"source": os.path.abspath(checkpoint_path),
            "dataset_meta": (checkpoint.get("meta") or {}).get("dataset_meta", {})}
    checkpoints.save_on_master({"state_dict": state, "meta": meta}, output)
    heads_ = sorted({k.split(".")[0] for k in state if not k.startswith("backbone.")})
    return (f"converted {len(state)} tensors from {checkpoint_path}: backbone ViT width {dim}, depth {depth}, "
            f"{'release layout' if model.release_layout else 'plain'}; heads: {', '.join(heads_)}\nwrote {output}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert checkpoints to ViTPyramid backbone weights")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="pretraining/fine-tuning checkpoint (ours or the release's) -> backbone")
    c.add_argument("--checkpoint", required=True)
    c.add_argument("--output", required=True)
    c.add_argument("--model_key", default="model|module",
                   help="entry to read: 'model' (online encoder), 'model_ema' (momentum encoder); '|' = try in turn")
    r = sub.add_parser("convert-release-upernet", help="the release's UperNet checkpoint -> mmsegmentation 1.x")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            print(convert(args.checkpoint, args.output, args.model_key))
        else:
            print(convert_release_segmentor(args.checkpoint, args.output))
    except utils.UsageError as e:
        print(f"error: {utils.one_line_error(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
