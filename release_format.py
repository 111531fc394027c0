"""Checkpoint formats: the key names of the authors' release and the encoder tensors of any checkpoint.

``from_release_state_dict`` / ``to_release_state_dict`` / ``is_release_state_dict`` convert BootMAE state dicts
from and to the release's names (``modeling_bootmae`` exports them, as README documents);
``encoder_state_dict`` reads the encoder of a checkpoint (ours or the release's, pretraining or fine-tuning),
``backbone_state_dict`` the downstream backbone's tensors (also OpenMMLab checkpoints' ``backbone.*``);
``load_encoder`` copies them into a model (``load_checkpoint_encoder``: from a loaded checkpoint),
``report_loading`` says what was transferred and ``split_qkv_bias`` adapts MAE's and timm's full qkv bias.
"""
import torch
import torch.nn as nn

import utils
from modeling_vit import ENCODER_PREFIXES

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



def checkpoint_entry(checkpoint, model_key="model"):
    """The state dict under the first of the '|'-separated keys of ``model_key`` that ``checkpoint`` holds, or
    the checkpoint itself if it is a bare state dict, with ``module.``/``encoder.`` prefixes removed. Raises
    ValueError naming the entries the checkpoint has."""
    state = next((checkpoint[k] for k in model_key.split("|")
                  if isinstance(checkpoint, dict) and isinstance(checkpoint.get(k), dict)), None)
    if state is None:
        if isinstance(checkpoint, dict) and any(torch.is_tensor(v) for v in checkpoint.values()):
            state = checkpoint  # a bare state dict
        else:
            have = ", ".join(map(str, checkpoint)) if isinstance(checkpoint, dict) else type(checkpoint).__name__
            raise ValueError(f"the checkpoint has no '{model_key}' entry (it has: {have})")
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "encoder."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def encoder_state_dict(checkpoint, model_key="model"):
    """The encoder tensors of a checkpoint (ours or the release's, pretraining or fine-tuning), in our key
    names: decoders, heads and the fixed position tables dropped, ``module.``/``encoder.`` prefixes removed.

    ``checkpoint`` is a loaded dict; ``model_key`` may list alternatives separated by '|' ("model|module").
    Raises ValueError when the checkpoint has no such entry or no encoder tensors.
    """
    out = {k: v for k, v in checkpoint_entry(checkpoint, model_key).items()
           if k.startswith(ENCODER_PREFIXES) and torch.is_tensor(v)}
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


def load_checkpoint_encoder(model, checkpoint, path, model_key="model", entry=encoder_state_dict):
    """``load_encoder`` of the tensors that ``entry`` (default ``encoder_state_dict``; the backbone passes
    ``backbone_state_dict``) reads from ``checkpoint``, the loaded file ``path``. A checkpoint without them, or
    of another size, raises UsageError naming ``path``. Returns (loaded, not_in_checkpoint, unused) key lists."""
    try:
        return load_encoder(model, entry(checkpoint, model_key))
    except ValueError as e:
        raise utils.UsageError(f"{path}: {e}") from e


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
    """Backbone tensors, in ``backbone_vit.ViTPyramid``'s names, from a loaded checkpoint of any of these kinds:

    * a pretraining or fine-tuning checkpoint, ours or the release's (``model``/``model_ema``/``module``, or a
      bare state dict): its encoder via ``encoder_state_dict`` (decoders, heads and the release's fixed
      position table dropped; the backbone recomputes the fixed table);
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
    return encoder_state_dict(checkpoint, model_key)


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
