"""BootMAE: the pretraining model, its decoders and the registered model names.

Built from the ViT blocks of ``vit_layers`` and the encoder of ``modeling_vit`` (BEiT's pretraining model
imports its fine-tuning blocks the same way). For images [B, 3, H, W] and a mask [B, N] (True = masked):
  encoder           ViT on the cls token + visible patches, fixed 2-D sin-cos position embedding
  pixel decoder     regressor: Linear D->512, mask tokens, 2 blocks with cross-attention to the output of
                    an early encoder block (context injection), per-patch pixel head
  feature decoder   predictor: the same at width D, cross-attention to a late encoder block, Linear head
  momentum encoder  an EMA copy of the whole model; ``target_features`` gives its last-block tokens

timm names: ``bootmae_<size>`` (this model) and ``bootmae_<size>_patch<P>_224`` (the fine-tuning classifier),
for the sizes of ``MODEL_SIZES``.

State-dict names are our own; ``from_release`` / ``to_release_state_dict`` convert from and to the key
names of the authors' release, whose checkpoints this code reads and writes (``release_format``).
"""
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import register_model

# besides what this file uses, the encoder's parts and the checkpoint helpers stay reachable as
# modeling_bootmae.<name> (README documents the release converters here)
from modeling_vit import (ENCODER_PREFIXES, VisionTransformer, VisionTransformerForClassification,  # noqa: F401
                          encoder_layer_id)
from release_format import (encoder_state_dict, from_release_state_dict, is_release_state_dict,  # noqa: F401
                            load_encoder, split_qkv_bias, to_release_state_dict)
from vit_layers import (Block, DecoderBlock, LayerNorm, attention, fused_attention,  # noqa: F401
                        padded_attention, sincos_pos_embed_2d)


class PixelHead(nn.Module):
    """Per-patch linear map width -> P*P*3, output in MAE's (p, q, channel) order.

    Kept with the release's ConvTranspose2d(width, 3, kernel=P, stride=P) parameters (weight
    [width, 3, P, P], one bias per channel) so its checkpoints, parameter count and initialisation carry
    over; applied as the per-patch linear map it is, which needs no token-grid reshape.
    """

    def __init__(self, width, patch_size, out_chans=3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.ConvTranspose2d(width, out_chans, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        """x: [B, N, width] -> [B, N, P*P*3]"""
        w = self.proj.weight  # [width, C, P, P]
        weight = w.permute(2, 3, 1, 0).reshape(-1, w.shape[0])
        bias = self.proj.bias.repeat(self.patch_size * self.patch_size)
        return F.linear(x, weight, bias)


class Decoder(nn.Module):
    """A BootMAE decoder (pixel regressor or feature predictor).

    Linear embedding of the encoder output, one learnable mask token for every masked patch (plus the
    fixed position embedding; visible tokens carry the encoder's), tokens restored to patch order with the
    cls token first, ``depth`` decoder blocks with cross-attention to ``context``, final norm, and ``head``
    applied to the patch tokens.
    """

    def __init__(self, in_dim, width, depth, num_heads, head, context_dim=None, mlp_ratio=4.0,
                 qkv_bias=True, norm_layer=LayerNorm):
        super().__init__()
        self.embed = nn.Linear(in_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList([
            DecoderBlock(width, num_heads, context_dim, mlp_ratio, qkv_bias, norm_layer=norm_layer)
            for _ in range(depth)])
        self.norm = norm_layer(width)
        self.head = head
        self.has_context = context_dim is not None

    def forward(self, latent, ids_restore, ids_masked, pos, context=None):
        """latent: [B, 1+Nv, D] encoder output (cls first); ids_restore: [B, N] position of each patch in
        [visible..., masked...]; ids_masked: [B, Nm] masked patch indices; pos: [1, 1+N, width];
        context: [B, 1+Nv, Dc] -> head output for all N patches [B, N, *]"""
        x = self.embed(latent)
        B, _, W = x.shape
        pos_masked = torch.gather(pos[:, 1:].expand(B, -1, -1), 1, ids_masked[..., None].expand(-1, -1, W))
        patches = torch.cat([x[:, 1:], self.mask_token.to(x.dtype) + pos_masked.to(x.dtype)], dim=1)
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, W))
        x = torch.cat([x[:, :1], patches], dim=1)
        for blk in self.blocks:
            x = blk(x, context)
        return self.head(self.norm(x)[:, 1:])


class BootMAE(VisionTransformer):
    """BootMAE pretraining model (encoder + pixel regressor + feature predictor).

    ``context_blocks`` = (block feeding the pixel regressor, block feeding the feature predictor); the
    release (and paper Table 8's best) is the first and the last block. The ablations of the paper and of the
    CIFAR-10 report come from the same class:

    - ``pixel_branch=False`` / ``feature_branch=False``: the regressor / predictor is not built at all (no
      parameters, nothing unused under DDP): feature targets only, or MAE's pixel target only;
    - ``pixel_context`` / ``feature_context``: context injection (cross-attention) per decoder (paper Table 2);
    - ``decoder_dim``, ``decoder_depth``, ``decoder_num_heads``: the regressor's width and both decoders'
      depth and heads (MAE's decoder: 512 wide, 8 blocks, 16 heads, no context; paper Table 4);
    - ``feature_decoder_dim``: the predictor's width (default the encoder's, as in the release).

    The defaults are the release's model, parameter for parameter and in the same initialisation order.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0, decoder_dim=512, decoder_depth=2,
                 decoder_num_heads=None, context_blocks=(0, -1), norm_layer=LayerNorm, pixel_branch=True,
                 feature_branch=True, pixel_context=True, feature_context=True, feature_decoder_dim=None):
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
                         drop_path_rate=drop_path_rate, norm_layer=norm_layer)
        if not (pixel_branch or feature_branch):
            raise ValueError("BootMAE needs at least one of the pixel regressor and the feature predictor")
        heads = decoder_num_heads or num_heads
        if any(not -depth <= b < depth for b in context_blocks):
            raise ValueError(f"context blocks {tuple(context_blocks)} are outside the encoder's {depth} blocks")
        self.context_blocks = tuple(b % depth for b in context_blocks)
        # encoder blocks whose output some decoder cross-attends to
        self.injected_blocks = tuple(sorted({b for b, on in zip(self.context_blocks, (
            pixel_branch and pixel_context, feature_branch and feature_context)) if on}))
        self.decoder_dim = decoder_dim
        self.feature_decoder_dim = feature_decoder_dim or embed_dim
        self.pixel_decoder = self.feature_decoder = None
        if pixel_branch:
            self.pixel_decoder = Decoder(embed_dim, decoder_dim, decoder_depth, heads,
                                         PixelHead(decoder_dim, patch_size, in_chans),
                                         context_dim=embed_dim if pixel_context else None,
                                         mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, norm_layer=norm_layer)
        if feature_branch:
            width = self.feature_decoder_dim
            self.feature_decoder = Decoder(embed_dim, width, decoder_depth, heads, nn.Linear(width, embed_dim),
                                           context_dim=embed_dim if feature_context else None,
                                           mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, norm_layer=norm_layer)
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(decoder_dim, *self.patch_embed.grid_size),
                             persistent=False)
        if self.feature_decoder_dim != embed_dim:
            self.register_buffer("feature_pos_embed", sincos_pos_embed_2d(
                self.feature_decoder_dim, *self.patch_embed.grid_size), persistent=False)
        self._init_encoder()  # covers the decoders' Linear and LayerNorm layers too
        if pixel_branch:
            trunc_normal_(self.pixel_decoder.mask_token, std=0.02)
        if feature_branch:
            trunc_normal_(self.feature_decoder.mask_token, std=0.02)

    def forward_encoder(self, images, ids_keep):
        """Encoder on the visible patches: images [B, 3, H, W], ids_keep [B, Nv] ->
        (normed tokens [B, 1+Nv, D], {block: its output [B, 1+Nv, D]} for the injected blocks)"""
        x, pos = self.embed(images, ids_keep)
        x = self.with_cls(x, pos)
        feats = {}
        for i, blk in enumerate(self.blocks):
            x = self.run_block(blk, x)
            if i in self.injected_blocks:
                feats[i] = x
        return self.norm(x), feats

    def forward(self, images, mask, num_masked=None, pixel=True, feature=True):
        """images: [B, 3, H, W]; mask: [B, N] bool, True = masked, the same count in every row.
        Returns (pixel_pred [B, N, P*P*3] in (p, q, channel) order, feature_pred [B, N, D]); a prediction is
        None when its decoder is not built or not asked for (``pixel``/``feature`` False: during the pixel-only
        warm-up of EMA-MAE the predictor is skipped). ``num_masked`` (the count per row) spares a
        device-to-host sync when the caller knows it."""
        grid = self.grid_size(images)
        if num_masked is None:
            num_masked = int(mask[0].sum())
        # stable sort: visible patches first, each group in patch order
        ids_shuffle = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        num_visible = mask.shape[1] - num_masked
        ids_keep, ids_masked = ids_shuffle[:, :num_visible], ids_shuffle[:, num_visible:]
        latent, feats = self.forward_encoder(images, ids_keep)
        pixel_pred = feature_pred = None
        if pixel and self.pixel_decoder is not None:
            context = feats[self.context_blocks[0]] if self.pixel_decoder.has_context else None
            dec_pos = self.get_pos_embed(grid, self.decoder_pos_embed, self.decoder_dim)
            pixel_pred = self.pixel_decoder(latent, ids_restore, ids_masked, dec_pos, context)
        if feature and self.feature_decoder is not None:
            context = feats[self.context_blocks[1]] if self.feature_decoder.has_context else None
            if self.feature_decoder_dim == self.embed_dim:
                fea_pos = self.get_pos_embed(grid)
            else:
                fea_pos = self.get_pos_embed(grid, self.feature_pos_embed, self.feature_decoder_dim)
            feature_pred = self.feature_decoder(latent, ids_restore, ids_masked, fea_pos, context)
        return pixel_pred, feature_pred

    def no_weight_decay(self):
        return {"cls_token"}



MODEL_SIZES = {
    "tiny": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "base": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "large": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}


def _factory(name, model_class, size, weights_hint):
    def create(pretrained=False, **kwargs):
        if pretrained:
            raise ValueError(f"no pretrained weights are downloaded; {weights_hint}")
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        return model_class(**{**MODEL_SIZES[size], **kwargs})
    create.__name__ = create.__qualname__ = name  # timm registers a model under its function's name
    create.__doc__ = f"{model_class.__name__} of the {size} size: {MODEL_SIZES[size]}"
    return create


def _register_models():
    """Registers with timm (and defines here) bootmae_<size> and bootmae_<size>_patch<P>_224 for every size."""
    kinds = (("bootmae_{size}", BootMAE, "load a checkpoint with --resume or from_release"),
             ("bootmae_{size}_patch{patch_size}_224", VisionTransformerForClassification,
              "pass a checkpoint with --finetune"))
    for name_format, model_class, hint in kinds:
        for size, cfg in MODEL_SIZES.items():
            name = name_format.format(size=size, **cfg)
            globals()[name] = register_model(_factory(name, model_class, size, hint))


_register_models()


def release_config(model):
    """The release's constructor arguments for one of our models (inverse of ``from_release``'s config)."""
    return dict(img_size=model.patch_embed.img_size[0], patch_size=model.patch_size, embed_dim=model.embed_dim,
                depth=len(model.blocks), num_heads=model.num_heads,
                mlp_ratio=model.blocks[0].mlp.fc1.out_features / model.embed_dim,
                qkv_bias=model.blocks[0].attn.q_bias is not None, decode_dim=model.decoder_dim,
                fea_list=list(model.context_blocks), decoder_depth=len(model.pixel_decoder.blocks),
                ln_eps=model.norm.eps)


def from_release(config, state_dict):
    """Build a ``BootMAE`` for a release-style config dict and load a state dict in the release's key
    names (strict: every tensor must be used and every parameter filled)."""
    model = BootMAE(
        img_size=config["img_size"], patch_size=config["patch_size"], embed_dim=config["embed_dim"],
        depth=config["depth"], num_heads=config["num_heads"], mlp_ratio=config.get("mlp_ratio", 4.0),
        qkv_bias=config.get("qkv_bias", True), decoder_dim=config.get("decode_dim", 512),
        decoder_depth=config.get("decoder_depth", 2), context_blocks=tuple(config.get("fea_list", (0, -1))),
        norm_layer=partial(nn.LayerNorm, eps=config.get("ln_eps", 1e-6)))
    model.load_state_dict(from_release_state_dict(state_dict))
    return model


def count_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

