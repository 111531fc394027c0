"""The pretrained encoder for the downstream jobs (fine-tuning, linear probing, kNN): model names, the plain
encoder, and loading a checkpoint's encoder with a report of what was transferred."""
import checkpoints
import modeling_bootmae
import utils

# timm's registered names of the pretraining models are bootmae_<size>; the classifiers are
# bootmae_<size>_patch16_224 (patch14 for huge); the release's linear probe says base_patch16_224.
SIZES = tuple(modeling_bootmae.MODEL_SIZES)


def parse_model_size(name):
    """'bootmae_base', 'bootmae_base_patch16_224', 'base_patch16_224', 'vit_base_patch16' -> 'base'.
    Raises UsageError for anything else."""
    core = name
    for prefix in ("bootmae_", "vit_"):
        if core.startswith(prefix):
            core = core[len(prefix):]
    size = core.split("_")[0]
    rest = core[len(size):]
    if size not in SIZES or rest not in ("", "_patch16_224", "_patch14_224", "_patch16", "_patch14"):
        raise utils.UsageError(f"unknown --model {name}; choose one of "
                               + ", ".join(f"bootmae_{s}" for s in SIZES)
                               + " (or the classifier names bootmae_<size>_patch16_224, base_patch16_224, ...)")
    return size


def build_encoder(size, input_size, patch_size=None):
    """The plain encoder (``VisionTransformer``: blocks and final norm, no decoders, no head)."""
    cfg = dict(modeling_bootmae.MODEL_SIZES[size])
    if patch_size:
        cfg["patch_size"] = patch_size
    if input_size % cfg["patch_size"]:
        raise utils.UsageError(f"--input_size {input_size} is not divisible by the patch size {cfg['patch_size']}; "
                               f"use a multiple of it")
    return modeling_bootmae.VisionTransformer(img_size=input_size, **cfg)


def load_pretrained_encoder(model, path, model_key="model|module"):
    """Loads the encoder of a checkpoint (ours or the release's; pretraining or fine-tuning) into ``model``
    and prints exactly what was transferred. Returns (loaded, not_in_checkpoint, unused) key lists.

    Bad input (missing file, unreadable file, no encoder tensors, another model size) raises UsageError.
    """
    checkpoint = checkpoints.load_checkpoint(path)
    try:
        state = modeling_bootmae.encoder_state_dict(checkpoint, model_key)
        loaded, missing, unused = modeling_bootmae.load_encoder(model, state)
    except ValueError as e:
        raise utils.UsageError(f"{path}: {e}") from e
    utils.print0(f"loaded {len(loaded)} encoder tensors from {path} (entry '{model_key}')")
    utils.print0(f"  newly initialised (not in the checkpoint): {', '.join(missing) or 'none'}")
    if unused:
        shown = ", ".join(unused[:8]) + (f", ... ({len(unused) - 8} more)" if len(unused) > 8 else "")
        utils.print0(f"  in the checkpoint but not used ({len(unused)}): {shown}")
    return loaded, missing, unused


def load_encoder_checked(model, path, model_key):
    """Loads the encoder and refuses a checkpoint that leaves encoder tensors uninitialised (except the
    final norm, whose absence is only reported: a fine-tuned mean-pooling model has none)."""
    _, missing, _ = load_pretrained_encoder(model, path, model_key)
    essential = [k for k in missing if not k.startswith("norm.")]
    if essential:
        raise utils.UsageError(f"{path} lacks {len(essential)} encoder tensors of this model (e.g. {essential[0]}); "
                               f"pass the --model of the checkpoint's size")
    if missing:
        utils.print0(f"warning: {path} has no final norm ('norm.*'); features use an identity-initialised LayerNorm")
