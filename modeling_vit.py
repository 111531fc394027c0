"""The ViT encoder shared by pretraining, fine-tuning, linear probing, kNN and the downstream backbones
(``VisionTransformer``), its classifier for fine-tuning (``VisionTransformerForClassification``, BEiT's), and
the encoder's parameter names: ``ENCODER_PREFIXES`` and the layer ids of layer-wise lr decay.
"""
import re
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import PatchEmbed, trunc_normal_

from vit_layers import Block, LayerNorm, init_weights, sincos_pos_embed_2d

ENCODER_PREFIXES = ("patch_embed.", "cls_token", "blocks.", "norm.")

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


def encoder_layer_id(name, num_layers):
    """Layer index for layer-wise lr decay (BEiT's rule): 0 for the patch embedding, cls token and position
    embedding, b + 1 for encoder block b, num_layers + 1 for everything after the blocks."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0
    match = _BLOCK_RE.match(name)
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1


class VisionTransformer(nn.Module):
    """The ViT encoder shared by pretraining, fine-tuning, linear probing and the downstream backbones.

    Fixed sin-cos position embedding (recomputed for any grid), cls token, q/v-bias attention, final norm.
    Any input whose sides are multiples of the patch size is accepted. ``layer_scale_init`` and
    ``use_rel_pos_bias`` (off in BootMAE) give every block layer scale and a relative position bias over the
    ``img_size`` grid (see ``vit_layers.Block``).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                 norm_layer=LayerNorm, layer_scale_init=None, use_rel_pos_bias=False):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        grid = self.patch_embed.grid_size
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, *grid), persistent=False)
        # on the CPU whatever the default device (a model built on the meta device reads the rates too)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i], norm_layer,
                  layer_scale_init, grid if use_rel_pos_bias else None)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable=True):
        """Recompute encoder block activations in the backward pass (saves memory for ViT-L/H batches)."""
        self.grad_checkpointing = enable

    def run_block(self, blk, x, grid=None):
        """One encoder block on tokens x [B, 1+N, D] of the patch grid ``grid`` (for the relative position
        bias), its activations recomputed in the backward pass under gradient checkpointing."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(blk, x, grid, use_reentrant=False)
        return blk(x, grid)

    def _init_encoder(self):
        init_weights(self)
        # the patch embedding is initialised as the (3*P*P -> D) linear map it is
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=1e-6)

    def grid_size(self, images):
        H, W = images.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"input size {H}x{W} is not divisible by the patch size {self.patch_size}")
        return H // self.patch_size, W // self.patch_size

    def get_pos_embed(self, grid, pos_embed=None, dim=None):
        """The [1, 1 + h*w, dim] table for a grid: the stored one if the grid matches, else recomputed."""
        pos_embed = self.pos_embed if pos_embed is None else pos_embed
        if pos_embed.shape[1] == 1 + grid[0] * grid[1] and grid == tuple(self.patch_embed.grid_size):
            return pos_embed
        return sincos_pos_embed_2d(dim or pos_embed.shape[-1], *grid).to(pos_embed)

    def embed(self, images, ids=None):
        """images: [B, 3, H, W] -> patch tokens with position embedding [B, N, D], and the table [1, 1+N, D].
        With ``ids`` [B, n] only those patches are embedded: [B, n, D], in the order of ``ids``.

        The embedding is the stride-P convolution ``patch_embed.proj`` (kept as such for checkpoints),
        computed as the linear map over each patch's (C, P, P) pixels that it is: one matrix product with
        no convolution layout conversions, and patches dropped before it (the student's masked ones) cost
        nothing. Dropped patches get no gradient either way, so the mathematics is unchanged.
        """
        h, w = self.grid_size(images)
        pos = self.get_pos_embed((h, w))
        B, C, P = images.shape[0], images.shape[1], self.patch_size
        pixels = images.reshape(B, C, h, P, w, P).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * P * P)
        patch_pos = pos[:, 1:].expand(B, -1, -1)
        if ids is not None:
            pixels = torch.gather(pixels, 1, ids[..., None].expand(-1, -1, pixels.shape[-1]))
            patch_pos = torch.gather(patch_pos, 1, ids[..., None].expand(-1, -1, patch_pos.shape[-1]))
        proj = self.patch_embed.proj
        return F.linear(pixels, proj.weight.reshape(proj.out_channels, -1), proj.bias) + patch_pos, pos

    def with_cls(self, x, pos):
        return torch.cat([(self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1), x], dim=1)

    def forward_features(self, images, return_blocks=()):
        """Full image -> final tokens [B, 1+N, D] after the last norm; with ``return_blocks``, also a dict
        {block index: output of that block, before any norm}."""
        grid = self.grid_size(images)
        x, pos = self.embed(images)
        x = self.with_cls(x, pos)
        feats = {}
        for i, blk in enumerate(self.blocks):
            x = self.run_block(blk, x, grid)
            if i in return_blocks:
                feats[i] = x
        x = self.norm(x)
        return (x, feats) if return_blocks else x

    @torch.no_grad()
    def target_features(self, images, ids=None):
        """Feature targets (call on the target network): the patch tokens of the last block, before the
        final norm, [B, N, D] for full images [B, 3, H, W]. With ``ids`` [B, n] only those patches (plus the
        cls token) are fed to the network and their n tokens are returned, in the order of ``ids``."""
        x, pos = self.embed(images, ids)
        x = self.with_cls(x, pos)
        for blk in self.blocks:
            x = blk(x)
        return x[:, 1:]

    def encoder_config(self):
        """Constructor arguments of a ``VisionTransformer`` with this encoder's architecture."""
        return dict(img_size=tuple(self.patch_embed.img_size), patch_size=self.patch_size,
                    in_chans=self.patch_embed.proj.in_channels, embed_dim=self.embed_dim, depth=len(self.blocks),
                    num_heads=self.num_heads, mlp_ratio=self.blocks[0].mlp.fc1.out_features / self.embed_dim,
                    qkv_bias=self.blocks[0].attn.q_bias is not None,
                    norm_layer=partial(nn.LayerNorm, eps=self.norm.eps))

    def encoder_state_dict(self):
        """The encoder's tensors (patch embedding, cls token, blocks, final norm) of this model."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(ENCODER_PREFIXES)}


class VisionTransformerForClassification(VisionTransformer):
    """The pretrained encoder with a classification head (BEiT's fine-tuning model).

    ``global_pool='avg'``: mean of the patch tokens (cls excluded) then a new LayerNorm ``fc_norm``; the
    encoder's final ``norm`` is not used (BEiT and MAE drop it). ``global_pool='token'``: the cls token after
    ``norm``. Head: Linear, trunc-normal std 0.02 scaled by ``init_scale`` (0.001 in the release).
    """

    def __init__(self, num_classes=1000, global_pool="avg", init_scale=0.001, **kwargs):
        super().__init__(**kwargs)
        if global_pool not in ("avg", "token"):
            raise ValueError(f"global_pool must be 'avg' or 'token', got {global_pool!r}")
        self.global_pool = global_pool
        self.num_classes = num_classes
        self._init_encoder()
        if global_pool == "avg":
            self.norm = nn.Identity()
            self.fc_norm = LayerNorm(self.embed_dim)
        else:
            self.fc_norm = nn.Identity()
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
            with torch.no_grad():
                self.head.weight.mul_(init_scale)

    def forward_features(self, images, return_blocks=()):
        """images [B, 3, H, W] -> tokens [B, 1+N, D] (after ``norm``, which is the identity for 'avg')"""
        return super().forward_features(images, return_blocks)

    def pool(self, tokens):
        """tokens [B, 1+N, D] -> pooled features [B, D] (before the head)"""
        if self.global_pool == "avg":
            return self.fc_norm(tokens[:, 1:].mean(dim=1))
        return tokens[:, 0]

    def forward(self, images):
        return self.head(self.pool(self.forward_features(images)))

    def no_weight_decay(self):
        return {"cls_token"}

