"""BootMAE models: the shared ViT building blocks and the pretraining model.

The encoder blocks defined here (``Attention``, ``CrossAttention``, ``Block``, ``DecoderBlock``,
``VisionTransformer``) are the only definition in the repository; fine-tuning, linear probing and the
downstream backbones import them.

Pretraining model (``BootMAE``), for images [B, 3, H, W] and a mask [B, N] (True = masked):
  encoder           ViT on the cls token + visible patches, fixed 2-D sin-cos position embedding
  pixel decoder     regressor: Linear D->512, mask tokens, 2 blocks with cross-attention to the output of
                    an early encoder block (context injection), per-patch pixel head
  feature decoder   predictor: the same at width D, cross-attention to a late encoder block, Linear head
  momentum encoder  an EMA copy of the whole model; ``target_features`` gives its last-block tokens

State-dict names are our own; ``from_release`` / ``to_release_state_dict`` convert from and to the key
names of the authors' release, whose checkpoints this code reads and writes.
"""
import math
import re
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models import register_model

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def sincos_pos_embed_2d(dim, grid_h, grid_w, cls_token=True):
    """Fixed 2-D sin-cos position embedding, [1, (1 +) grid_h * grid_w, dim], float32.

    Hand-written because checkpoints and results depend on the exact layout (MoCo v3's, used by the
    release): per patch, concat[sin(r*w_k), cos(r*w_k), sin(c*w_k), cos(c*w_k)] with w_k = 1 / 10000^(k/(dim/4)),
    r the patch row and c its column in row-major patch order; the cls row is zeros. For square grids this
    is exactly the release's table; non-square grids follow the same row/column rule.
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float32),
                                torch.arange(grid_w, dtype=torch.float32), indexing="ij")
    out_r = rows.flatten()[:, None] * omega[None]
    out_c = cols.flatten()[:, None] * omega[None]
    emb = torch.cat([out_r.sin(), out_r.cos(), out_c.sin(), out_c.cos()], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim), emb], dim=0)
    return emb[None]


# False switches attention to the explicit softmax(q k^T / sqrt(d)) v of the release: the plain reference
# path that benchmarks and the fast-path equivalence tests compare against. See ``fused_attention``.
FUSED_ATTENTION = True


class fused_attention:
    """Context manager / setter for the attention kernel: ``with fused_attention(False): ...``."""

    def __init__(self, enabled):
        global FUSED_ATTENTION
        self.previous, FUSED_ATTENTION = FUSED_ATTENTION, bool(enabled)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global FUSED_ATTENTION
        FUSED_ATTENTION = self.previous


def attention(q, k, v, dropout_p=0.0):
    """q: [B, H, N, d], k/v: [B, H, M, d] -> [B, H, N, d]."""
    if FUSED_ATTENTION:
        if q.is_cuda and q.shape[-1] % 8:
            return padded_attention(q, k, v, dropout_p)
        if q.is_cuda or q.dtype == torch.float32:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        # bf16 on CPU: PyTorch's CPU flash kernel is 2-6x slower than two bf16 matrix products around a
        # float32 softmax at ViT sequence lengths (17-197 tokens, measured on avx512_bf16), so take those.
    # the explicit form (the plain path, and bf16 on CPU); the softmax runs in float32 or wider (float64 stays)
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    attn = attn.softmax(dim=-1, dtype=torch.promote_types(attn.dtype, torch.float32)).to(q.dtype)
    if dropout_p > 0:
        attn = F.dropout(attn, dropout_p)
    return attn @ v


def padded_attention(q, k, v, dropout_p=0.0, multiple=8):
    """SDPA with the head dim zero-padded to a multiple of ``multiple``.

    The fast GPU kernels (cuDNN, flash) want head dims in multiples of 8; the release's 512-wide pixel
    decoder with 12 heads has 42 (a kernel about 2x slower on an H100). Zero columns in q and k leave every
    dot product unchanged, the padded output columns (zero columns of v) are dropped, and the scale stays
    1/sqrt(true head dim): the same attention.
    """
    d = q.shape[-1]
    pad = (0, -d % multiple)
    out = F.scaled_dot_product_attention(F.pad(q, pad), F.pad(k, pad), F.pad(v, pad), dropout_p=dropout_p,
                                         scale=d ** -0.5)
    return out[..., :d]


def _qv_bias(q_bias, v_bias):
    # BEiT's layout: learnable q and v biases, the k bias fixed at zero.
    return torch.cat((q_bias, torch.zeros_like(v_bias), v_bias))


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``.

    One bias-free qkv Linear plus learnable q- and v-biases (BEiT). The inner width is
    num_heads * (dim // num_heads): it differs from dim when the heads do not divide it (the release's
    512-wide pixel decoder with 12 heads has an inner width of 504), and checkpoints depend on that.
    """

    def __init__(self, dim, num_heads=8, qkv_bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        inner = self.head_dim * num_heads
        self.qkv = nn.Linear(dim, inner * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(inner))
            self.v_bias = nn.Parameter(torch.zeros(inner))
        else:
            self.q_bias = self.v_bias = None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        """x: [B, N, dim] -> [B, N, dim]"""
        B, N, _ = x.shape
        bias = None if self.q_bias is None else _qv_bias(self.q_bias, self.v_bias)
        qkv = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        x = attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, -1)))


class CrossAttention(nn.Module):
    """Queries from the decoder tokens, keys and values from encoder context (BootMAE's context injection).

    q: Linear(dim -> inner) without bias + q-bias; kv: Linear(context_dim -> 2 * inner) without bias + v-bias
    (no k-bias); output projection inner -> dim. Inner width as in ``Attention``.
    """

    def __init__(self, dim, context_dim, num_heads=8, qkv_bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        inner = self.head_dim * num_heads
        self.q = nn.Linear(dim, inner, bias=False)
        self.kv = nn.Linear(context_dim, inner * 2, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(inner))
            self.v_bias = nn.Parameter(torch.zeros(inner))
        else:
            self.q_bias = self.v_bias = None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, context):
        """x: [B, N, dim], context: [B, M, context_dim] -> [B, N, dim]"""
        B, N, _ = x.shape
        M = context.shape[1]
        q = F.linear(x, self.q.weight, self.q_bias)
        kv_bias = None if self.v_bias is None else torch.cat((torch.zeros_like(self.v_bias), self.v_bias))
        kv = F.linear(context, self.kv.weight, kv_bias).reshape(B, M, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        q = q.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        x = attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, -1)))


class Block(nn.Module):
    """Pre-norm transformer block: x += Attn(LN(x)); x += MLP(LN(x)). No layer-scale (as in the release)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, norm_layer=LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class DecoderBlock(Block):
    """Block with cross-attention to encoder context between self-attention and the MLP:
    x += SelfAttn(LN1(x)); x += CrossAttn(LN3(x), LN4(context)); x += MLP(LN2(x)).
    With ``context_dim=None`` it is a plain ``Block`` (context injection off)."""

    def __init__(self, dim, num_heads, context_dim=None, mlp_ratio=4.0, qkv_bias=True, drop=0.0,
                 attn_drop=0.0, drop_path=0.0, norm_layer=LayerNorm):
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias, drop, attn_drop, drop_path, norm_layer)
        if context_dim is None:
            self.c_attn = None
        else:
            self.norm3 = norm_layer(dim)
            self.norm4 = norm_layer(context_dim)
            self.c_attn = CrossAttention(dim, context_dim, num_heads, qkv_bias=qkv_bias,
                                         attn_drop=attn_drop, proj_drop=drop)

    def forward(self, x, context=None):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        if self.c_attn is not None:
            x = x + self.drop_path(self.c_attn(self.norm3(x), self.norm4(context)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def init_weights(module):
    """The release's initialisation: xavier-uniform Linear weights (the fused qkv weight with the bound of
    one of its three parts), zero biases, LayerNorm 1/0."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            if name.endswith("attn.qkv"):
                bound = math.sqrt(6.0 / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class VisionTransformer(nn.Module):
    """The ViT encoder shared by pretraining, fine-tuning, linear probing and the downstream backbones.

    Fixed sin-cos position embedding (recomputed for any grid), cls token, q/v-bias attention, final norm.
    Any input whose sides are multiples of the patch size is accepted.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                 norm_layer=LayerNorm):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        grid = self.patch_embed.grid_size
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, *grid), persistent=False)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i], norm_layer)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable=True):
        """Recompute encoder block activations in the backward pass (saves memory for ViT-L/H batches)."""
        self.grad_checkpointing = enable

    def run_block(self, blk, x):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
        return blk(x)

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
        x, pos = self.embed(images)
        x = self.with_cls(x, pos)
        feats = {}
        for i, blk in enumerate(self.blocks):
            x = self.run_block(blk, x)
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


# ---------------------------------------------------------------------------------------------------------
# registered models

MODEL_SIZES = {
    "tiny": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "base": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "large": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}


def _create(size, pretrained=False, **kwargs):
    if pretrained:
        raise ValueError("no pretrained weights are downloaded; load a checkpoint with --resume or from_release")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return BootMAE(**{**MODEL_SIZES[size], **kwargs})


@register_model
def bootmae_tiny(pretrained=False, **kwargs):
    return _create("tiny", pretrained, **kwargs)


@register_model
def bootmae_small(pretrained=False, **kwargs):
    return _create("small", pretrained, **kwargs)


@register_model
def bootmae_base(pretrained=False, **kwargs):
    return _create("base", pretrained, **kwargs)


@register_model
def bootmae_large(pretrained=False, **kwargs):
    return _create("large", pretrained, **kwargs)


@register_model
def bootmae_huge(pretrained=False, **kwargs):
    return _create("huge", pretrained, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# the release's checkpoints

# (release prefix, our prefix); the release's block internals already use our names
_RELEASE_PREFIXES = [
    ("mask_token_1", "feature_decoder.mask_token"),
    ("down_1.", "feature_decoder.embed."),
    ("decode_blocks_1.", "feature_decoder.blocks."),
    ("decode_norm_1.", "feature_decoder.norm."),
    ("lm_head_1.", "feature_decoder.head."),
    ("mask_token", "pixel_decoder.mask_token"),
    ("down.", "pixel_decoder.embed."),
    ("decode_blocks.", "pixel_decoder.blocks."),
    ("decode_norm.", "pixel_decoder.norm."),
    ("lm_head.", "pixel_decoder.head."),
]
# fixed tables the release stores as frozen parameters; here they are recomputed buffers
_RELEASE_FIXED = ("pos_embed", "de_pos_embed")


def is_release_state_dict(state_dict):
    return any(k.startswith(("decode_blocks.", "down.", "lm_head.")) or k == "mask_token_1" for k in state_dict)


def from_release_state_dict(state_dict):
    """Release key names -> ours (the fixed position tables are dropped)."""
    out = {}
    for key, value in state_dict.items():
        if key in _RELEASE_FIXED:
            continue
        for old, new in _RELEASE_PREFIXES:
            if key == old or key.startswith(old) and old.endswith("."):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def to_release_state_dict(model_or_state_dict, model=None):
    """Our state dict (or model) -> the release's key names, position tables included, so the release's
    code loads it with its own ``load_state_dict``."""
    if isinstance(model_or_state_dict, nn.Module):
        model = model_or_state_dict
        state_dict = model.state_dict()
    else:
        state_dict = model_or_state_dict
    out = {}
    for key, value in state_dict.items():
        for old, new in _RELEASE_PREFIXES:
            if key.startswith(new):
                key = old + key[len(new):]
                break
        out[key] = value
    if model is not None:
        out["pos_embed"] = model.pos_embed.detach().clone()
        out["de_pos_embed"] = model.decoder_pos_embed.detach().clone()
    return out


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


# ---------------------------------------------------------------------------------------------------------
# the encoder for classification (fine-tuning, linear probing, kNN)

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


def _create_classifier(size, pretrained=False, **kwargs):
    if pretrained:
        raise ValueError("no pretrained weights are downloaded; pass a checkpoint with --finetune")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return VisionTransformerForClassification(**{**MODEL_SIZES[size], **kwargs})


@register_model
def bootmae_tiny_patch16_224(pretrained=False, **kwargs):
    return _create_classifier("tiny", pretrained, **kwargs)


@register_model
def bootmae_small_patch16_224(pretrained=False, **kwargs):
    return _create_classifier("small", pretrained, **kwargs)


@register_model
def bootmae_base_patch16_224(pretrained=False, **kwargs):
    return _create_classifier("base", pretrained, **kwargs)


@register_model
def bootmae_large_patch16_224(pretrained=False, **kwargs):
    return _create_classifier("large", pretrained, **kwargs)


@register_model
def bootmae_huge_patch14_224(pretrained=False, **kwargs):
    return _create_classifier("huge", pretrained, **kwargs)


ENCODER_PREFIXES = ("patch_embed.", "cls_token", "blocks.", "norm.")


def encoder_state_dict(checkpoint, model_key="model"):
    """The encoder tensors of a checkpoint (ours or the release's, pretraining or fine-tuning), in our key
    names: decoders, heads and the fixed position tables dropped, ``module.``/``encoder.`` prefixes removed.

    ``checkpoint`` is a loaded dict; ``model_key`` may list alternatives separated by '|' ("model|module").
    Raises ValueError when the checkpoint has no such entry or no encoder tensors.
    """
    state = None
    for key in model_key.split("|"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            state = checkpoint[key]
            break
    if state is None:
        if isinstance(checkpoint, dict) and any(torch.is_tensor(v) for v in checkpoint.values()):
            state = checkpoint  # a bare state dict
        else:
            raise ValueError(f"the checkpoint has no '{model_key}' entry (it has: {', '.join(map(str, checkpoint))})")
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "encoder."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.startswith(ENCODER_PREFIXES) and torch.is_tensor(value):
            out[key] = value
    if not any(k.startswith("blocks.") for k in out):
        raise ValueError(f"the checkpoint's '{model_key}' entry holds no encoder tensors (no 'blocks.*' keys)")
    return out


def load_encoder(model, state_dict):
    """Copies encoder tensors into ``model`` (shapes must match). Returns (loaded, not_in_checkpoint,
    unused) key lists so the caller can report exactly what was transferred."""
    own = model.state_dict()
    loaded, unused = [], []
    bad = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    if bad:
        k = bad[0]
        raise ValueError(f"the checkpoint's encoder does not fit the model: {k} is {tuple(state_dict[k].shape)} "
                         f"in the checkpoint but {tuple(own[k].shape)} in the model ({len(bad)} such tensors); "
                         f"choose the --model of the checkpoint's size")
    with torch.no_grad():
        for key, value in state_dict.items():
            if key in own:
                own[key].copy_(value)
                loaded.append(key)
            else:
                unused.append(key)
    missing = [k for k in own if k not in state_dict]
    return loaded, missing, unused


def split_qkv_bias(state_dict):
    """Encoder tensors of a model with a full qkv bias (MAE's and timm's ``attn.qkv.bias``, [3 * inner]) in
    this encoder's layout: ``q_bias`` and ``v_bias``. The key bias is dropped, which changes nothing: it adds
    q . b_k to every logit of a query, and softmax over the keys ignores a constant shift."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("attn.qkv.bias"):
            q, _, v = value.chunk(3)
            out[key[:-len("qkv.bias")] + "q_bias"] = q
            out[key[:-len("qkv.bias")] + "v_bias"] = v
        else:
            out[key] = value
    return out
