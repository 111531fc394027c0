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
release's key names), which is what its UperNet checkpoint needs (see
``convert_checkpoint.convert_release_segmentor``).

The converters from pretraining checkpoints (ours or the release's, online or momentum encoder) to backbone
weights, and from the release's UperNet checkpoint to an mmsegmentation 1.x checkpoint, are
``convert_checkpoint``'s; this file runs its command line:

    python backbone_vit.py convert --checkpoint out/checkpoint-799.pth --output bootmae_base_backbone.pth
    python backbone_vit.py convert --checkpoint out/checkpoint-799.pth --model_key model_ema --output ema.pth
    python backbone_vit.py convert-release-upernet --checkpoint BootMAE_Base_800_UperNet.pth --output upernet.pth

The OpenMMLab side (layer-decay optimizer constructor, weights-only loading, the train/test entry) is
``openmmlab_glue``; its entry points are also reachable here. Nothing here imports OpenMMLab at module level:
the backbone is plain PyTorch.
"""
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import release_format
import utils
from modeling_vit import VisionTransformer
from openmmlab_glue import load_openmmlab_checkpoint
# openmmlab_glue's entry points under the names that scripts written for earlier versions use: backbone_vit.<name>
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
        """Loads backbone weights from a checkpoint (see ``release_format.backbone_state_dict``) and reports
        what was loaded. Returns (loaded, not_in_checkpoint, unused) key lists."""
        model_key = model_key or self.model_key
        checkpoint = load_openmmlab_checkpoint(path)
        loaded, missing, unused = release_format.load_checkpoint_encoder(self, checkpoint, path, model_key,
                                                                          release_format.backbone_state_dict)
        if not any(k.startswith("blocks.") for k in loaded):
            raise utils.UsageError(f"{path}: no encoder block of the checkpoint fits this backbone")
        if verbose:
            utils.print0(release_format.report_loading(path, model_key, loaded, missing, unused))
        return loaded, missing, unused


if __name__ == "__main__":
    from convert_checkpoint import main
    sys.exit(main())
