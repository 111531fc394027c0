"""Analytic FLOPs of BootMAE's training step and of the classifier: matrix products only, a multiply-add counted
as 2 FLOPs, as MFU is usually counted (``benchmarks/bench_pretrain.py`` checks them against
``torch.utils.flop_counter``; the ablation runner estimates GPU-hours with them)."""


def _block_flops(tokens, width, heads, mlp_ratio, context_tokens=0, context_dim=0):
    inner = heads * (width // heads)
    f = 2 * tokens * width * 3 * inner + 4 * tokens * tokens * inner + 2 * tokens * inner * width
    f += 4 * tokens * width * int(width * mlp_ratio)
    if context_tokens:
        f += 2 * tokens * width * inner + 4 * context_tokens * context_dim * inner
        f += 4 * tokens * context_tokens * inner + 2 * tokens * inner * width
    return f


def bootmae_flops(model, num_patches, num_masked, teacher_patches=None):
    """Per image: (student forward, momentum-encoder forward, patch-embedding forward) FLOPs. The momentum
    encoder sees ``teacher_patches`` patches (default all); without a feature predictor (MAE) it costs 0."""
    D, P = model.embed_dim, model.patch_size
    depth, heads = len(model.blocks), model.num_heads
    ratio = model.blocks[0].mlp.fc1.out_features / D
    vis = 1 + num_patches - num_masked
    full = 1 + num_patches
    patch_embed = 2 * num_patches * 3 * P * P * D
    encoder = patch_embed + depth * _block_flops(vis, D, heads, ratio)
    student = encoder
    for dec, head_out in ((model.pixel_decoder, 3 * P * P), (model.feature_decoder, D)):
        if dec is None:
            continue
        width, dheads = dec.embed.out_features, dec.blocks[0].attn.num_heads
        context = vis if dec.has_context else 0
        student += 2 * vis * D * width + len(dec.blocks) * _block_flops(full, width, dheads, ratio, context, D)
        student += 2 * num_patches * width * head_out
    teacher = 0
    if model.feature_decoder is not None:
        fed = num_patches if teacher_patches is None else teacher_patches
        # the patch embedding runs on the whole image before the subset is gathered
        teacher = patch_embed + depth * _block_flops(1 + fed, D, heads, ratio)
    return student, teacher, patch_embed


def train_step_flops(model, num_patches, num_masked, teacher_patches=None, teachers=1):
    """Forward + backward (2x forward; the patch embedding needs no input gradient) + the forward of each of the
    ``teachers`` target networks."""
    student, teacher, patch_embed = bootmae_flops(model, num_patches, num_masked, teacher_patches)
    return 3 * student - patch_embed + teachers * teacher


def classifier_flops(model, num_patches, num_classes):
    D = model.embed_dim
    ratio = model.blocks[0].mlp.fc1.out_features / D
    patch_embed = 2 * num_patches * 3 * model.patch_size ** 2 * D
    fwd = patch_embed + len(model.blocks) * _block_flops(1 + num_patches, D, model.num_heads, ratio)
    fwd += 2 * D * num_classes
    return 3 * fwd - patch_embed

