"""The BootMAE encoder as a 4-scale backbone for dense prediction (semantic_segmentation/, detection/).

``ViTPyramid`` *is* the repository's encoder (``modeling_bootmae.VisionTransformer`` with its ``Block``s, drop
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
loads with ``modeling_bootmae.load_encoder`` and the release's fine-tuned UperNet backbone maps one to one.

The release fine-tuned on ADE20K with BEiT's backbone, which adds three things that BootMAE's pretraining does
not have: a learned position embedding (initialised from the pretraining table), a relative position bias per
block (zeros at the start) and a learnable layer scale (``gamma_1``/``gamma_2``, ones at the start). They are
off by default (this repository's encoder as pretrained); ``release_layout=True`` switches all three on, which
is what its UperNet checkpoint needs (see ``convert_release_segmentor``).

Also here, shared by both folders:
  * ``layer_decay_param_groups`` / ``register_mmengine()``: the layer-decay optimizer-wrapper constructor for
    mmengine (``LayerDecayOptimWrapperConstructor``), with the one layer-id rule of
    ``modeling_bootmae.encoder_layer_id`` (the one fine-tuning uses);
  * ``load_openmmlab_checkpoint`` / ``openmmlab_safe_globals``: weights-only loading of OpenMMLab checkpoints;
  * a converter from pretraining checkpoints (ours or the release's, online or momentum encoder) to backbone
    weights, and from the release's UperNet checkpoint to an mmsegmentation 1.x checkpoint:

    python backbone_vit.py convert --checkpoint out/checkpoint-799.pth --output bootmae_base_backbone.pth
    python backbone_vit.py convert --checkpoint out/checkpoint-799.pth --model_key model_ema --output ema.pth
    python backbone_vit.py convert-release-upernet --checkpoint BootMAE_Base_800_UperNet.pth --output upernet.pth

Nothing here imports OpenMMLab at module level: the backbone and the converter are plain PyTorch.
"""
import argparse
import contextlib
import math
import os
import pickle
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
import modeling_bootmae
import utils
from modeling_bootmae import LayerNorm, VisionTransformer, encoder_layer_id

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


def relative_position_index(grid_h, grid_w):
    """BEiT's [1 + N, 1 + N] index into a relative position bias table of (2h-1)(2w-1) + 3 rows: the patch
    pairs by (row offset, column offset), then one row each for cls->patch, patch->cls and cls->cls."""
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])              # [2, N]
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)    # [N, N, 2]
    num = (2 * grid_h - 1) * (2 * grid_w - 1) + 3
    index = torch.zeros(grid_h * grid_w + 1, grid_h * grid_w + 1, dtype=torch.long)
    index[1:, 1:] = (rel[..., 0] + grid_h - 1) * (2 * grid_w - 1) + rel[..., 1] + grid_w - 1
    index[0, :] = num - 3
    index[:, 0] = num - 2
    index[0, 0] = num - 1
    return index


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
                         norm_layer=LayerNorm)
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
            gh, gw = self.patch_embed.grid_size
            self.rel_window = (gh, gw)
            for blk in self.blocks:
                blk.gamma_1 = nn.Parameter(torch.full((embed_dim,), float(layer_scale_init)))
                blk.gamma_2 = nn.Parameter(torch.full((embed_dim,), float(layer_scale_init)))
                blk.attn.relative_position_bias_table = nn.Parameter(
                    torch.zeros((2 * gh - 1) * (2 * gw - 1) + 3, num_heads))
        self._rel_index_cache = {}

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

    def _rel_bias(self, attn, grid):
        """[heads, 1+N, 1+N] bias for the grid from a block's table (resized bicubically for other grids)."""
        table = attn.relative_position_bias_table
        gh, gw = self.rel_window
        if tuple(grid) != (gh, gw):
            pairs = table[:-3].reshape(2 * gh - 1, 2 * gw - 1, -1).permute(2, 0, 1)[None]
            pairs = F.interpolate(pairs, size=(2 * grid[0] - 1, 2 * grid[1] - 1), mode="bicubic",
                                  align_corners=False)
            table = torch.cat([pairs[0].flatten(1).t(), table[-3:]], dim=0)
        key = (tuple(grid), table.device)
        if key not in self._rel_index_cache:
            self._rel_index_cache[key] = relative_position_index(*grid).to(table.device)
        index = self._rel_index_cache[key]
        n = index.shape[0]
        return table[index.view(-1)].view(n, n, -1).permute(2, 0, 1)

    def _release_block(self, blk, x, grid):
        """The release's block: x += gamma_1 * Attn(LN(x)) with the relative position bias added to the
        attention logits; x += gamma_2 * MLP(LN(x)). Same parameters as ``Block`` plus the three extras."""
        attn = blk.attn
        B, N, _ = x.shape
        h = blk.norm1(x)
        bias = None if attn.q_bias is None else modeling_bootmae._qv_bias(attn.q_bias, attn.v_bias)
        qkv = F.linear(h, attn.qkv.weight, bias).reshape(B, N, 3, attn.num_heads, attn.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        rel = self._rel_bias(attn, grid).unsqueeze(0).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=rel,
                                             dropout_p=attn.attn_drop if self.training else 0.0)
        out = attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(B, N, -1)))
        x = x + blk.drop_path(blk.gamma_1 * out)
        return x + blk.drop_path(blk.gamma_2 * blk.mlp(blk.norm2(x)))

    def _run(self, blk, x, grid):
        if not self.release_layout:
            return self.run_block(blk, x)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._release_block, blk, x, grid, use_reentrant=False)
        return self._release_block(blk, x, grid)

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
            x = self._run(blk, x, grid)
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
            loaded, missing, unused = modeling_bootmae.load_encoder(self, state)
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
      bare state dict): its encoder via ``modeling_bootmae.encoder_state_dict`` (decoders, heads and the
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
    return modeling_bootmae.encoder_state_dict(checkpoint, model_key)


# ------------------------------------------------------------------------------------------------ layer decay

def layer_id_for(name, num_layers, backbone_prefix="backbone."):
    """The layer id of a parameter of a whole model: ``encoder_layer_id`` for the backbone's parameters
    (0: patch embedding, cls token, position table; b + 1: block b; num_layers + 1: the pyramid), and
    num_layers + 1 (lr scale 1) for everything outside the backbone (neck, heads)."""
    if not name.startswith(backbone_prefix):
        return num_layers + 1
    return encoder_layer_id(name[len(backbone_prefix):], num_layers)


def layer_decay_param_groups(model, lr, weight_decay, layer_decay, num_layers=None, backbone_prefix="backbone.",
                             skip_list=None):
    """Parameter groups of a whole detector/segmentor: the repository's split (``optim_factory.param_groups``:
    no weight decay on 1-D tensors, biases, cls token and position table) and BEiT's layer-wise lr decay,
    ``lr = lr * layer_decay ** (num_layers + 1 - layer_id)`` with ``layer_id_for``. Each group carries
    ``lr``, ``lr_scale``, ``layer_id``, ``weight_decay`` and ``param_names``."""
    import optim_factory
    backbone = model
    for part in backbone_prefix.strip(".").split("."):
        backbone = getattr(backbone, part, None) if part else backbone
    if num_layers is None:
        num_layers = getattr(backbone, "num_layers", None) or len(getattr(backbone, "blocks", ()))
        if not num_layers:
            raise ValueError(f"cannot tell the number of encoder blocks under '{backbone_prefix}'; "
                             f"set paramwise_cfg.num_layers")
    if skip_list is None:
        skip = getattr(backbone, "no_weight_decay", set)() if backbone is not None else set()
        skip_list = {backbone_prefix + k for k in skip}
    groups = optim_factory.param_groups(model, weight_decay, set(skip_list),
                                        layer_id_fn=lambda n: layer_id_for(n, num_layers, backbone_prefix),
                                        layer_decay=layer_decay, num_layers=num_layers)
    for group in groups:
        # every name of a group has the same id (groups are keyed by it)
        group.setdefault("layer_id", layer_id_for(group["param_names"][0], num_layers, backbone_prefix))
        group["lr"] = lr * group["lr_scale"]
    return groups


_REGISTERED = False


def register_mmengine():
    """Registers ``LayerDecayOptimWrapperConstructor`` in mmengine's root registry (which mmsegmentation's
    and mmdetection's registries fall back to). Imports mmengine only when called."""
    global _REGISTERED
    if _REGISTERED:
        return
    from mmengine.optim import DefaultOptimWrapperConstructor
    from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS

    class LayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
        """mmengine constructor with layer-wise lr decay (``layer_decay_param_groups``). ``paramwise_cfg``:
        ``layer_decay_rate`` (required) and ``num_layers`` (default: the backbone's block count), the
        release's names. The optimizer's ``lr``/``weight_decay`` are the base values."""

        def add_params(self, params, module, prefix="", **kwargs):
            cfg = self.paramwise_cfg
            if "layer_decay_rate" not in cfg:
                raise ValueError("LayerDecayOptimWrapperConstructor needs paramwise_cfg.layer_decay_rate")
            groups = layer_decay_param_groups(module, self.base_lr, self.base_wd or 0.0,
                                              cfg["layer_decay_rate"], cfg.get("num_layers"))
            for group in groups:
                # the names stay out of the optimizer (torch treats a 'param_names' entry as its own)
                group.pop("param_names")
            params.extend(groups)

    OPTIM_WRAPPER_CONSTRUCTORS.register_module(name="LayerDecayOptimWrapperConstructor",
                                               module=LayerDecayOptimWrapperConstructor, force=True)
    _REGISTERED = True


# ----------------------------------------------------------------------------------------- checkpoint loading

def openmmlab_safe_globals():
    """The non-tensor types that OpenMMLab checkpoints hold and nothing else: numpy arrays, dtypes and
    scalars (in ``meta`` and the message hub), and mmengine's ``HistoryBuffer`` (the logged scalars of a
    runner's message hub) when mmengine is installed. PyTorch >= 2.6 loads ``weights_only`` by default and
    refuses them; allowing exactly these keeps loading free of arbitrary pickled code."""
    import numpy as np
    allowed = [np.ndarray, np.dtype]
    for mod_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        with contextlib.suppress(ImportError):
            mod = __import__(mod_name, fromlist=["_reconstruct", "scalar"])
            allowed += [mod._reconstruct, mod.scalar]
            break
    # dtype classes (numpy >= 1.25 pickles a dtype by its class, e.g. numpy.dtypes.Float64DType)
    for name in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                 "float16", "float32", "float64", "str_", "bytes_", "object_"):
        allowed.append(type(np.dtype(getattr(np, name))))
    with contextlib.suppress(ImportError):
        from mmengine.logging.history_buffer import HistoryBuffer
        allowed.append(HistoryBuffer)
        # a HistoryBuffer pickles its statistics functions as getattr(HistoryBuffer, 'mean') (pickle protocol
        # 2 names a class's function that way); a getattr that answers only those names stands in for the
        # builtin, which would reach anything
        allowed.append((_history_buffer_getattr, "builtins.getattr"))
    return allowed


def _history_buffer_getattr(obj, name):
    from mmengine.logging.history_buffer import HistoryBuffer
    methods = set(HistoryBuffer._statistics_methods) | {"min", "max", "current", "mean"}
    if (obj is HistoryBuffer or isinstance(obj, HistoryBuffer)) and isinstance(name, str) and name in methods:
        return getattr(obj, name)
    raise pickle.UnpicklingError(f"getattr({getattr(obj, '__name__', type(obj).__name__)}, {name!r}) is not "
                                 f"allowed in a checkpoint (only HistoryBuffer's statistics methods are)")


@contextlib.contextmanager
def openmmlab_safe_loading():
    """``torch.load(weights_only=True)``, which is PyTorch's default and the one mmengine's loaders use,
    accepts ``openmmlab_safe_globals()`` inside this block; safe loading stays on."""
    with torch.serialization.safe_globals(openmmlab_safe_globals()):
        yield


def load_openmmlab_checkpoint(path):
    """``checkpoints.load_checkpoint`` (weights-only, ``argparse.Namespace`` allowed) that also reads OpenMMLab's
    own checkpoints (see ``openmmlab_safe_globals``). Any other object in the file is an error that names
    it, instead of a hint to switch safe loading off."""
    with openmmlab_safe_loading():
        try:
            return checkpoints.load_checkpoint(path)
        except utils.UsageError as e:
            unsafe = []
            with contextlib.suppress(Exception):  # the listing is a hint only; the error below stands
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}"
                       for g in openmmlab_safe_globals()}
            unsafe = [u for u in unsafe if u not in allowed and u != "argparse.Namespace"]
            if unsafe:
                raise utils.UsageError(f"{path} holds objects that weights-only loading does not allow: "
                                       f"{', '.join(unsafe)}; re-save its tensors, e.g. with "
                                       f"python backbone_vit.py convert") from e
            raise


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
    loaded, missing, unused = modeling_bootmae.load_encoder(model, state)
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


# ---------------------------------------------------------------------------------------------- entry points

def _openmmlab_parser(mode):
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description=f"{mode} with OpenMMLab's runner (BootMAE backbone)")
    parser.add_argument("config")
    if mode == "test":
        parser.add_argument("checkpoint", help="a checkpoint of this model (mmengine's, or converted)")
        parser.add_argument("--tta", action="store_true", help="test-time augmentation (the config's tta_pipeline)")
        parser.add_argument("--out", help="seg: folder for the predicted maps; det: a .pkl of the raw results")
    else:
        parser.add_argument("--pretrained", help="pretraining checkpoint (ours or the release's) or converted "
                                                 "backbone weights; overrides model.backbone.pretrained")
        parser.add_argument("--model-key", "--model_key", dest="model_key",
                            help="entry of a pretraining checkpoint: model (online encoder) or model_ema")
        parser.add_argument("--resume", action="store_true",
                            help="continue from the newest checkpoint in the work dir")
        parser.add_argument("--amp", action="store_true", help="mixed precision (fp16 with a dynamic loss scale)")
    parser.add_argument("--work-dir", "--work_dir", dest="work_dir", help="logs and checkpoints")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default=None,
                        help="override config entries, e.g. train_dataloader.batch_size=4")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none",
                        help="none: one process; pytorch: torchrun / torch.distributed.launch; slurm: srun")
    # torch.distributed.launch passes --local-rank / --local_rank; torchrun sets LOCAL_RANK
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=0)
    return parser


def openmmlab_main(mode, argv=None):
    """``train``/``test`` entry of semantic_segmentation/ and detection/: reads the config (whose
    ``custom_imports`` registers the backbone), applies the command line and runs mmengine's Runner. OpenMMLab's
    checkpoints are read weights-only with ``openmmlab_safe_globals`` allowed."""
    try:
        from mmengine.config import Config
        from mmengine.runner import Runner
    except ImportError as e:
        print(f"error: OpenMMLab is not installed ({e}); run bash setup_openmmlab.sh", file=sys.stderr)
        return 2
    args = _openmmlab_parser(mode).parse_args(argv)
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    if args.launcher != "none" and not torch.cuda.is_available():
        # mmengine's launchers give every process a CUDA device and wrap the model with device_ids
        print(f"error: --launcher {args.launcher} needs GPUs (mmengine gives each process a CUDA device); "
              f"on CPU run one process (--launcher none)", file=sys.stderr)
        return 2
    if not os.path.isfile(args.config):
        print(f"error: config {args.config} does not exist", file=sys.stderr)
        return 2
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    if args.work_dir:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = os.path.join("work_dirs", os.path.splitext(os.path.basename(args.config))[0])
    if mode == "train":
        if args.pretrained:
            if not os.path.isfile(args.pretrained):
                print(f"error: checkpoint {args.pretrained} does not exist", file=sys.stderr)
                return 2
            cfg.model.backbone.pretrained = args.pretrained
            if cfg.model.get("pretrained") is not None:
                cfg.model.pretrained = None  # mmseg's EncoderDecoder refuses both
        if args.model_key:
            cfg.model.backbone.model_key = args.model_key
        if args.amp:
            cfg.optim_wrapper.type = "AmpOptimWrapper"
            cfg.optim_wrapper.setdefault("loss_scale", "dynamic")
        if args.resume:
            cfg.resume = True
    else:
        if not os.path.isfile(args.checkpoint):
            print(f"error: checkpoint {args.checkpoint} does not exist", file=sys.stderr)
            return 2
        cfg.load_from = args.checkpoint
        if args.tta or cfg.get("test_time_aug", False):
            if "tta_model" not in cfg or "tta_pipeline" not in cfg:
                print("error: the config has no tta_model / tta_pipeline", file=sys.stderr)
                return 2
            cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
            cfg.tta_model.module = cfg.model
            cfg.model = cfg.tta_model
        if args.out:
            if cfg.get("default_scope") == "mmdet":
                cfg.test_evaluator = [cfg.test_evaluator, dict(type="DumpDetResults", out_file_path=args.out)]
            else:
                cfg.test_evaluator["output_dir"] = args.out
    with openmmlab_safe_loading():
        runner = Runner.from_cfg(cfg)
        if mode == "train":
            runner.train()
        else:
            runner.test()
    return 0


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
