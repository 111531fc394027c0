"""Optimizer parameter groups (the release's AdamW grouping, with optional layer-wise lr decay), the schedules'
per-step setting, and the optimizer step the training loops share."""
import torch


def param_groups(model, weight_decay, skip_list=(), layer_id_fn=None, layer_decay=None, num_layers=None):
    """Parameter groups as the release builds them: no weight decay on 1-D parameters (norms, q/v biases),
    on biases and on the names in ``skip_list`` (cls token, position embedding); everything else, the 3-D
    mask tokens included, decays. With ``layer_id_fn`` each group also records its ``layer_id``, and with
    ``layer_decay`` it carries ``lr_scale = layer_decay ** (num_layers + 1 - layer_id)`` (BEiT's layer-wise
    decay); the training loops multiply the scheduled lr by ``lr_scale``."""
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim == 1 or name.endswith(".bias") or name in skip_list
        decay_name = "no_decay" if no_decay else "decay"
        layer_id = layer_id_fn(name) if layer_id_fn is not None else None
        key = decay_name if layer_id is None else f"layer_{layer_id}_{decay_name}"
        if key not in groups:
            group = {"params": [], "param_names": [], "weight_decay": 0.0 if no_decay else weight_decay}
            if layer_id is not None:
                group["layer_id"] = layer_id
                if layer_decay is not None:
                    group["lr_scale"] = float(layer_decay ** (num_layers + 1 - layer_id))
            groups[key] = group
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return list(groups.values())


def finetune_param_groups(model, weight_decay, layer_decay, backbone_decay=1.0, skip_list=None):
    """Fine-tuning groups of a ``VisionTransformerForClassification``: the release's weight-decay split and
    BEiT's layer-wise lr decay, layer ids from ``modeling_bootmae.encoder_layer_id`` (0: patch embedding and
    cls token, b + 1: block b, L + 1: fc_norm/norm and head). ``lr_scale`` is
    ``layer_decay ** (L + 1 - layer_id)``, times ``backbone_decay`` for the encoder (layer ids 0..L), as the
    release's ``--backbone_decay`` does; the head's scale is 1. Groups keep ``param_names`` (pop it before
    handing them to an optimizer)."""
    from modeling_bootmae import encoder_layer_id
    num_layers = len(model.blocks)
    skip = set(skip_list if skip_list is not None else getattr(model, "no_weight_decay", set)())
    groups = param_groups(model, weight_decay, skip, layer_id_fn=lambda n: encoder_layer_id(n, num_layers),
                          layer_decay=layer_decay, num_layers=num_layers)
    for group in groups:
        if group["layer_id"] <= num_layers:
            group["lr_scale"] *= backbone_decay
    return groups


# devices with a fused AdamW kernel in torch
_FUSED_DEVICES = ("cuda", "cpu", "xpu", "mps")


def adamw(groups, lr, betas=(0.9, 0.999), eps=1e-8, fused=True):
    """torch AdamW over prepared groups (``param_names`` dropped). ``fused``: one kernel for all tensors,
    the same update as the per-tensor loop (to float rounding) and several times faster on CPU as on GPU;
    ``fused=False`` gives torch's default implementation."""
    groups = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
    fused = fused and all(p.device.type in _FUSED_DEVICES for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)


def create_optimizer(args, model, skip_list=None, betas=(0.9, 0.95), lr=None, **group_kwargs):
    """AdamW over ``param_groups`` with run_pretraining.py's ``args.lr`` (or ``lr``, the batch-scaled one),
    ``args.weight_decay`` and ``args.fused_adamw``; betas (0.9, 0.95) as the release hard-wires for
    pretraining, eps adamw's 1e-8."""
    skip = set(skip_list if skip_list is not None else getattr(model, "no_weight_decay", set)())
    groups = param_groups(model, args.weight_decay, skip, **group_kwargs)
    return adamw(groups, args.lr if lr is None else lr, betas, fused=args.fused_adamw)


# ---------------------------------------------------------------------------------------------------------
# the step, shared by the pretraining and fine-tuning loops

def set_schedules(optimizer, lr, weight_decay):
    """Scheduled lr times each group's ``lr_scale`` (layer-wise decay); the scheduled weight decay on the
    groups that decay. Python floats: optimizer state goes into checkpoints loaded with weights_only=True,
    which refuses numpy scalars."""
    for group in optimizer.param_groups:
        group["lr"] = float(lr) * group.get("lr_scale", 1.0)
        if group["weight_decay"] > 0:
            group["weight_decay"] = float(weight_decay)


def clip_grad_norm(parameters, clip_grad=None):
    """The total norm of the (unscaled) gradients of ``parameters`` before clipping, a tensor (no host sync);
    with ``clip_grad`` the gradients are then scaled down to at most that norm."""
    if clip_grad:
        return torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def optimizer_step(optimizer, scaler, params, clip_grad=None):
    """The update micro-step after the backward passes: unscale the gradients (fp16), measure and clip their
    norm, step (under fp16 the GradScaler skips a step whose gradients hold inf or NaN, and shrinks its scale),
    update the scale, clear the gradients. Returns the gradient norm before clipping (a device tensor)."""
    scaler.unscale_(optimizer)
    grad_norm = clip_grad_norm(params, clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
