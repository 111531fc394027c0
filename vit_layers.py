"""The ViT building blocks, defined once: the fixed sin-cos position table, the attention kernel, ``Attention``
(optionally with BEiT's relative position bias), ``CrossAttention``, ``Block`` (optionally with layer scale),
``DecoderBlock`` and the release's initialisation. The encoder (``modeling_vit``), BootMAE's decoders
(``modeling_bootmae``) and the downstream backbone (``backbone_vit``) are built from them.
"""
import math
from functools import lru_cache, partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from timm.models.beit import gen_relative_position_index

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


def attention(q, k, v, dropout_p=0.0, bias=None):
    """q: [B, H, N, d], k/v: [B, H, M, d] -> [B, H, N, d]; bias: None or logits added before the softmax,
    broadcastable to [B, H, N, M] (a relative position bias)."""
    if FUSED_ATTENTION:
        if q.is_cuda and q.shape[-1] % 8:
            return padded_attention(q, k, v, dropout_p, bias=bias)
        if q.is_cuda or q.dtype == torch.float32:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
        # bf16 on CPU: PyTorch's CPU flash kernel is 2-6x slower than two bf16 matrix products around a
        # float32 softmax at ViT sequence lengths (17-197 tokens, measured on avx512_bf16), so take those.
    # the explicit form (the plain path, and bf16 on CPU); the softmax runs in float32 or wider (float64 stays)
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias
    attn = attn.softmax(dim=-1, dtype=torch.promote_types(attn.dtype, torch.float32)).to(q.dtype)
    if dropout_p > 0:
        attn = F.dropout(attn, dropout_p)
    return attn @ v


def padded_attention(q, k, v, dropout_p=0.0, multiple=8, bias=None):
    """SDPA with the head dim zero-padded to a multiple of ``multiple``.

    The fast GPU kernels (cuDNN, flash) want head dims in multiples of 8; the release's 512-wide pixel
    decoder with 12 heads has 42 (a kernel about 2x slower on an H100). Zero columns in q and k leave every
    dot product unchanged, the padded output columns (zero columns of v) are dropped, and the scale stays
    1/sqrt(true head dim): the same attention.
    """
    d = q.shape[-1]
    pad = (0, -d % multiple)
    out = F.scaled_dot_product_attention(F.pad(q, pad), F.pad(k, pad), F.pad(v, pad), attn_mask=bias,
                                         dropout_p=dropout_p, scale=d ** -0.5)
    return out[..., :d]


def relative_position_index(grid_h, grid_w):
    """BEiT's [1 + N, 1 + N] index into a relative position bias table of (2h-1)(2w-1) + 3 rows: the patch
    pairs by (row offset, column offset), then one row each for cls->patch, patch->cls and cls->cls (timm's)."""
    return gen_relative_position_index((grid_h, grid_w))


@lru_cache(maxsize=None)
def _relative_position_index_on(grid_h, grid_w, device):
    # one index per grid and device, shared by every block (the forward pass builds none)
    return relative_position_index(grid_h, grid_w).to(device)


def _qv_bias(q_bias, v_bias):
    # BEiT's layout: learnable q and v biases, the k bias fixed at zero.
    return torch.cat((q_bias, torch.zeros_like(v_bias), v_bias))


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``.

    One bias-free qkv Linear plus learnable q- and v-biases (BEiT). The inner width is
    num_heads * (dim // num_heads): it differs from dim when the heads do not divide it (the release's
    512-wide pixel decoder with 12 heads has an inner width of 504), and checkpoints depend on that.

    ``window_size=(h, w)`` adds BEiT's relative position bias: a learned table
    ``relative_position_bias_table`` [(2h-1)(2w-1) + 3, heads] (zeros at the start; the release's fine-tuned
    backbone has one per block), looked up by ``relative_position_index`` and added to the logits; for
    another token grid the table's patch part is resized bicubically.
    """

    def __init__(self, dim, num_heads=8, qkv_bias=True, attn_drop=0.0, proj_drop=0.0, window_size=None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        inner = self.head_dim * num_heads
        self.qkv = nn.Linear(dim, inner * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(inner)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(inner)) if qkv_bias else None
        self.window_size = None if window_size is None else tuple(window_size)
        if window_size is not None:
            gh, gw = window_size
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * gh - 1) * (2 * gw - 1) + 3, num_heads))
        self.attn_drop = attn_drop
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def relative_position_bias(self, grid):
        """[heads, 1+N, 1+N] bias for the token grid (h, w) (cls token first)."""
        table = self.relative_position_bias_table
        gh, gw = self.window_size
        if tuple(grid) != (gh, gw):
            pairs = table[:-3].reshape(2 * gh - 1, 2 * gw - 1, -1).permute(2, 0, 1)[None]
            pairs = F.interpolate(pairs, size=(2 * grid[0] - 1, 2 * grid[1] - 1), mode="bicubic",
                                  align_corners=False)
            table = torch.cat([pairs[0].flatten(1).t(), table[-3:]], dim=0)
        index = _relative_position_index_on(*grid, table.device)
        n = index.shape[0]
        return table[index.view(-1)].view(n, n, -1).permute(2, 0, 1)

    def forward(self, x, grid=None):
        """x: [B, N, dim] -> [B, N, dim]. grid: the (h, w) patch grid of x's tokens after the cls token, used
        by the relative position bias only (default ``window_size``)."""
        B, N, _ = x.shape
        bias = None if self.q_bias is None else _qv_bias(self.q_bias, self.v_bias)
        qkv = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        rel = None
        if self.window_size is not None:
            rel = self.relative_position_bias(grid or self.window_size).unsqueeze(0).to(q.dtype)
        x = attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0, bias=rel)
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
        self.q_bias = nn.Parameter(torch.zeros(inner)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(inner)) if qkv_bias else None
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
    """Pre-norm transformer block: x += Attn(LN(x)); x += MLP(LN(x)).

    BootMAE's pretraining has no layer scale; ``layer_scale_init`` adds BEiT's (x += gamma_1 * Attn(LN(x));
    x += gamma_2 * MLP(LN(x)), learned per channel from that value) and ``window_size`` the relative
    position bias of ``Attention``: the release's fine-tuned backbone uses both, under these names.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, norm_layer=LayerNorm, layer_scale_init=None, window_size=None):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop,
                              window_size=window_size)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        if layer_scale_init is None:
            self.gamma_1 = self.gamma_2 = None
        else:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))

    def forward(self, x, grid=None):
        """x: [B, 1+N, dim] -> [B, 1+N, dim]; grid: see ``Attention.forward``."""
        if self.gamma_1 is None:
            x = x + self.drop_path(self.attn(self.norm1(x), grid))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x), grid))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


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

