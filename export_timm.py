"""Export a BootMAE encoder (pretrained or fine-tuned; ours or the release's) as a plain timm ViT.

    python export_timm.py --checkpoint out/checkpoint-799.pth --output bootmae_base.pth
    python export_timm.py --checkpoint finetune/checkpoint-best.pth --model_key model_ema --output ft.pth

The file is a bare state dict for timm's ``vit_{tiny,small,base,large}_patch16_224`` / ``vit_huge_patch14_224``
(``VisionTransformer`` with a class token and a learned ``pos_embed`` that includes the class position):

* ``attn.q_bias`` / ``attn.v_bias`` become ``attn.qkv.bias`` = [q_bias, 0, v_bias] (the key bias is zero,
  as in BEiT's attention, so timm's plain qkv bias computes the same projection);
* the fixed 2-D sin-cos position table becomes timm's ``pos_embed`` (its cls row is zero, so timm adding it
  to the class token changes nothing); the release's stored table is used where the checkpoint has one of
  the right size;
* a fine-tuned model with ``fc_norm`` maps to ``global_pool='avg'`` (timm then puts the norm after the pool
  and makes the final ``norm`` the identity, exactly our classifier), one without it to ``'token'``;
  ``head`` is copied. A pretraining checkpoint gives ``num_classes=0`` and keeps the final ``norm``, so
  ``forward_features`` returns the same normed tokens as ours.

The script prints the ``timm.create_model`` call that loads the file (no network: ``pretrained_cfg_overlay``
points timm at the local file, and carries the class count so timm loads strictly, plus the mean/std the
encoder was trained with). It loads the state dict into that timm model before writing, and writes
atomically.
"""
import argparse
import os
import re
import sys

import torch

import checkpoints
import modeling_bootmae
import release_format
import utils

TIMM_NAMES = {"tiny": "vit_tiny_patch16_224", "small": "vit_small_patch16_224", "base": "vit_base_patch16_224",
              "large": "vit_large_patch16_224", "huge": "vit_huge_patch14_224"}

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
# per-block tensors whose names timm shares with ours
_SAME = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias", "norm2.weight",
         "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")


def select_entry(checkpoint, model_key):
    """The state dict under the first of the '|'-separated keys present, or the checkpoint itself if it is a
    bare state dict; ``module.``/``encoder.`` prefixes removed (``release_format.checkpoint_entry``)."""
    try:
        return release_format.checkpoint_entry(checkpoint, model_key)
    except ValueError as e:
        raise utils.UsageError(f"{e}; choose --model_key") from e


def infer_size(state):
    """(size name, patch size) from the tensors: width from cls_token, depth from the block indices."""
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise utils.UsageError("the checkpoint entry holds no encoder (no cls_token / patch_embed.proj.weight); "
                               "choose the --model_key of the encoder")
    width = state["cls_token"].shape[-1]
    depth = 1 + max(int(m.group(1)) for m in map(_BLOCK.match, state) if m)
    patch = state["patch_embed.proj.weight"].shape[-1]
    for size, cfg in modeling_bootmae.MODEL_SIZES.items():
        if cfg["embed_dim"] == width and cfg["depth"] == depth:
            return size, patch
    raise utils.UsageError(f"an encoder of width {width} and depth {depth} is none of the sizes "
                           f"{', '.join(modeling_bootmae.MODEL_SIZES)}; timm has no matching vit_* model")


def to_timm(state, input_size=None):
    """Our / the release's encoder tensors -> (timm state dict, timm.create_model keyword arguments)."""
    size, patch = infer_size(state)
    cfg = modeling_bootmae.MODEL_SIZES[size]
    width, depth = cfg["embed_dim"], cfg["depth"]
    input_size = input_size or 224
    if input_size % patch:
        raise utils.UsageError(f"--input_size {input_size} is not divisible by the checkpoint's patch size {patch}")
    grid = input_size // patch
    out = {"cls_token": state["cls_token"], "patch_embed.proj.weight": state["patch_embed.proj.weight"],
           "patch_embed.proj.bias": state["patch_embed.proj.bias"]}
    stored = state.get("pos_embed")
    if torch.is_tensor(stored) and stored.shape == (1, 1 + grid * grid, width):
        out["pos_embed"] = stored.float().clone()
    else:
        out["pos_embed"] = modeling_bootmae.sincos_pos_embed_2d(width, grid, grid)
    qkv_bias = "blocks.0.attn.q_bias" in state
    used = set(out) | {"pos_embed"}
    for i in range(depth):
        p = f"blocks.{i}."
        for name in _SAME:
            if p + name not in state:
                raise utils.UsageError(f"the checkpoint lacks {p + name}; it is not a complete encoder")
            out[p + name] = state[p + name]
        if qkv_bias:
            q, v = state[p + "attn.q_bias"], state[p + "attn.v_bias"]
            out[p + "attn.qkv.bias"] = torch.cat([q, torch.zeros_like(v), v])
            used |= {p + "attn.q_bias", p + "attn.v_bias"}
    used |= set(out)
    if "head.weight" in state and state["head.weight"].ndim == 2:
        num_classes = state["head.weight"].shape[0]
        out["head.weight"], out["head.bias"] = state["head.weight"], state["head.bias"]
        global_pool = "avg" if "fc_norm.weight" in state else "token"
    else:
        num_classes, global_pool = 0, "token"
    norm = "fc_norm" if global_pool == "avg" else "norm"
    if f"{norm}.weight" not in state:
        raise utils.UsageError(f"the checkpoint lacks {norm}.weight, which a timm model with global_pool="
                               f"'{global_pool}' needs")
    out[f"{norm}.weight"], out[f"{norm}.bias"] = state[f"{norm}.weight"], state[f"{norm}.bias"]
    used |= set(out)
    # tensors that would change the function but that a plain timm ViT has no place for (layer scale,
    # relative position biases) must not be dropped silently; decoders and release extras are expected
    ignorable = ("pixel_decoder.", "feature_decoder.", "decode", "down", "lm_head", "mask_token", "de_pos_embed",
                 "norm.", "head.", "fc_norm.", "relative_position_index")
    leftover = [k for k in state if k not in used and not k.startswith(ignorable) and torch.is_tensor(state[k])]
    if leftover:
        raise utils.UsageError(f"the checkpoint has tensors a plain timm ViT cannot hold ({', '.join(leftover[:4])}"
                               f"{', ...' if len(leftover) > 4 else ''}); it is not a BootMAE/BEiT-style encoder "
                               f"without layer scale")
    out = {k: v.detach().float().clone().contiguous() for k, v in out.items()}
    kwargs = dict(num_classes=num_classes, global_pool=global_pool)
    if input_size != 224 or patch != cfg["patch_size"]:
        kwargs["img_size"] = input_size
    if patch != cfg["patch_size"]:
        kwargs["patch_size"] = patch
    if not qkv_bias:
        kwargs["qkv_bias"] = False
    return out, TIMM_NAMES[size], kwargs


def create_call(name, path, kwargs, mean, std, input_size):
    overlay = (f"dict(file={path!r}, num_classes={kwargs['num_classes']}, mean={tuple(mean)}, std={tuple(std)}, "
               f"input_size=(3, {input_size}, {input_size}), crop_pct={224 / 256})")
    extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay={overlay}{extra})"


def export(checkpoint_path, output_path, model_key="model|module", input_size=None, imagenet_mean_std=None):
    """Writes the timm state dict and returns the ``timm.create_model`` line that loads it."""
    import timm
    from datasets import mean_std
    ckpt = checkpoints.load_checkpoint(checkpoint_path)
    saved_args = checkpoints.checkpoint_args(ckpt)   # a dict in our checkpoints, a Namespace in the release's
    # default: the size the encoder was trained at (our checkpoints record it), else 224
    input_size = input_size or getattr(saved_args, "input_size", None) or 224
    state, name, kwargs = to_timm(select_entry(ckpt, model_key), input_size)
    # fail here rather than in the user's code: the file must load strictly into the model the line builds
    model = timm.create_model(name, pretrained=False, **kwargs)
    result = model.load_state_dict(state, strict=True)
    del model, result
    if imagenet_mean_std is None:
        imagenet_mean_std = bool(getattr(saved_args, "imagenet_default_mean_and_std", False))
    mean, std = mean_std(argparse.Namespace(imagenet_default_mean_and_std=imagenet_mean_std))
    folder = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{output_path}.tmp.{os.getpid()}"
    if output_path.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(state, tmp)
    else:
        torch.save(state, tmp)
    os.replace(tmp, output_path)
    size = kwargs.get("img_size", 224)
    return create_call(name, os.path.abspath(output_path), kwargs, mean, std, size)


def get_args_parser():
    p = argparse.ArgumentParser("Export a BootMAE encoder to timm", add_help=False)
    p.add_argument("--checkpoint", required=True, help="pretraining or fine-tuning checkpoint (ours or the release's)")
    p.add_argument("--output", required=True, help="file to write (.pth, or .safetensors)")
    p.add_argument("--model_key", default="model|module",
                   help="entries to try, '|'-separated: 'model' (online encoder / fine-tuned model), 'model_ema' "
                        "(momentum encoder or fine-tuning EMA)")
    p.add_argument("--input_size", default=None, type=int,
                   help="image side the position table is made for (default: the checkpoint's --input_size, else 224); "
                        "timm resamples the table for other sizes")
    p.add_argument("--imagenet_default_mean_and_std", action="store_true", default=None,
                   help="the encoder was trained on ImageNet-normalised inputs (default: read from the checkpoint's "
                        "args, else the release's 0.5/0.5)")
    return p


def cli():
    parser = argparse.ArgumentParser("Export a BootMAE encoder to timm", parents=[get_args_parser()])
    args = parser.parse_args()
    try:
        if os.path.abspath(args.output) == os.path.abspath(args.checkpoint):
            raise utils.UsageError("--output is the --checkpoint itself; write the export to another file")
        line = export(args.checkpoint, args.output, args.model_key, args.input_size, args.imagenet_default_mean_and_std)
    except utils.UsageError as e:
        print(f"error: {utils.one_line_error(e)}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(f"wrote {args.output}; load it with:")
    print(f"    import timm; model = {line}")


if __name__ == "__main__":
    cli()
