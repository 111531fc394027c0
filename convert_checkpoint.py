"""Checkpoint converters for the downstream backbone (``backbone_vit.ViTPyramid``) and their command line:
pretraining/fine-tuning checkpoints (ours or the release's, online or momentum encoder) -> backbone weights,
and the release's UperNet checkpoint -> an mmsegmentation 1.x checkpoint:

    python backbone_vit.py convert --checkpoint out/checkpoint-799.pth --output bootmae_base_backbone.pth
    python backbone_vit.py convert --checkpoint out/checkpoint-799.pth --model_key model_ema --output ema.pth
    python backbone_vit.py convert-release-upernet --checkpoint BootMAE_Base_800_UperNet.pth --output upernet.pth

(``python convert_checkpoint.py ...`` is the same command line.) Plain PyTorch: nothing here imports OpenMMLab.
"""
import argparse
import math
import os
import sys

import torch

import checkpoints
import modeling_bootmae
import release_format
import utils
from backbone_vit import ViTPyramid
from openmmlab_glue import load_openmmlab_checkpoint


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
        state = release_format.backbone_state_dict(checkpoint, model_key)
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
    report = release_format.report_loading(checkpoint_path, model_key, loaded, missing, unused)
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
