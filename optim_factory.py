"""Optimizer parameter groups (the release's AdamW grouping, with optional layer-wise lr decay)."""
import torch


def param_groups(model, weight_decay, skip_list=(), layer_id_fn=None, layer_decay=None, num_layers=None):
    """Parameter groups as the release builds them: no weight decay on 1-D parameters (norms, q/v biases),
    on biases and on the names in ``skip_list`` (cls token, position embedding); everything else, the 3-D
    mask tokens included, decays. With ``layer_id_fn`` and ``layer_decay``, each group also carries
    ``lr_scale = layer_decay ** (num_layers + 1 - layer_id)`` (BEiT's layer-wise decay)."""
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
            if layer_id is not None and layer_decay is not None:
                group["lr_scale"] = layer_decay ** (num_layers + 1 - layer_id)
            groups[key] = group
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return list(groups.values())


def create_optimizer(args, model, skip_list=None, betas=(0.9, 0.95), **group_kwargs):
    """AdamW over ``param_groups``; betas (0.9, 0.95) as the release hard-wires for pretraining. The fused
    CUDA kernel is used on GPUs (same update, fewer launches)."""
    skip = set(skip_list if skip_list is not None else getattr(model, "no_weight_decay", set)())
    groups = param_groups(model, args.weight_decay, skip, **group_kwargs)
    for g in groups:
        g.pop("param_names")
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=args.lr, betas=betas, eps=getattr(args, "opt_eps", 1e-8), fused=fused)
