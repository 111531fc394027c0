"""The pretrained encoder for the downstream jobs (fine-tuning, linear probing, kNN): model names and the plain
encoder (loading a checkpoint's encoder: ``checkpoints.load_pretrained_encoder``)."""
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
