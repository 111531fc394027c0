"""Fine-tuning through a DeepSpeed engine (``run_class_finetuning.py --enable_deepspeed``): its configuration, the
engine's set-up and resume, one training micro-step, and the engine's own checkpoints beside the plain ones.

The engine owns precision, gradient accumulation, clipping and the optimizer step; the plain path (DDP + autocast +
``utils.LossScaler``) trains the same recipe and is the one to read first (``engine_for_finetuning``)."""
import json
import os
import re
import shutil

import torch

import utils

# where DeepSpeed's own checkpoints go, inside --output_dir
DEEPSPEED_DIR = "deepspeed"


def single_process_env():
    """DeepSpeed needs a process group; run without a launcher it would look for MPI. One process started
    directly gets the environment of a one-process torchrun instead (left alone under torchrun / srun)."""
    env = os.environ
    if ("RANK" in env and "WORLD_SIZE" in env) or int(env.get("SLURM_NTASKS", "1")) > 1:
        return
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(utils.free_port()))


def deepspeed_config(args, device, world):
    """The DeepSpeed configuration, built here rather than read from a file: the release's (AdamW, dynamic
    fp16 loss scale with 2^7 start and window 128) with this run's batch, accumulation, clipping, ZeRO
    stage and precision. The lr here is a placeholder: the training loop sets every group's lr (schedule x
    lr_scale) before each step."""
    betas = list(args.opt_betas or (0.9, 0.999))
    # torch's AdamW (its fused kernel on CUDA) instead of DeepSpeed's FusedAdam: the same update, without
    # FusedAdam's JIT build, which needs nvcc on GPUs and takes about 80 s on the CPU
    params = {"lr": args.lr, "weight_decay": args.weight_decay, "betas": betas, "eps": args.opt_eps,
              "torch_adam": True}
    if device.type == "cuda":
        params["fused"] = True
    return {
        "train_batch_size": args.batch_size * args.update_freq * world,
        "train_micro_batch_size_per_gpu": args.batch_size,
        "gradient_accumulation_steps": args.update_freq,
        "optimizer": {"type": "AdamW", "params": params},
        "bf16": {"enabled": args.amp == "bf16"},
        "fp16": {"enabled": args.amp == "fp16", "loss_scale": 0, "initial_scale_power": 7, "loss_scale_window": 128},
        "zero_optimization": {"stage": args.zero_stage},
        "gradient_clipping": float(args.clip_grad or 0.0),
        "steps_per_print": 1 << 30,  # the training loop logs
        "wall_clock_breakdown": False,
    }


def init_engine(args, model, groups, device, world, ds_dtype, ckpt, resume_path):
    """(engine, optimizer): the DeepSpeed engine around ``model`` with the parameter ``groups``; its state
    (ZeRO partitions, AdamW moments) restored from the folder that the resumed ``ckpt`` names, if any."""
    import deepspeed
    config = deepspeed_config(args, device, world)
    for g in groups:
        g.pop("param_names")
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    # DeepSpeed casts only the parameters to bf16/fp16; the fixed sin-cos table (a buffer) would promote
    # the tokens back to fp32 ahead of half-precision LayerNorms. The release's model.half() cast it too.
    for buf in engine.module.buffers():
        if buf.is_floating_point():
            buf.data = buf.data.to(ds_dtype)
    if engine.gradient_accumulation_steps() != args.update_freq:
        raise RuntimeError("DeepSpeed's accumulation steps differ from --update_freq")
    if ckpt is not None and ckpt.get("deepspeed_tag"):
        ds_dir = os.path.join(os.path.dirname(resume_path) or ".", DEEPSPEED_DIR)
        if os.path.isdir(os.path.join(ds_dir, ckpt["deepspeed_tag"])):
            engine.load_checkpoint(ds_dir, tag=ckpt["deepspeed_tag"], load_optimizer_states=True,
                                   load_lr_scheduler_states=False)
            utils.print0(f"resume: DeepSpeed state from {os.path.join(ds_dir, ckpt['deepspeed_tag'])}")
        else:
            utils.print0(f"resume: {ds_dir}/{ckpt['deepspeed_tag']} is missing; AdamW moments restart")
    elif ckpt is not None:
        utils.print0(f"resume: {resume_path} holds no DeepSpeed state; AdamW moments restart")
    utils.print0(f"DeepSpeed: ZeRO stage {args.zero_stage}, {args.amp if args.amp != 'none' else 'fp32'}, "
                 f"optimizer {type(optimizer).__name__}")
    return engine, optimizer


def write_config(args, device, world):
    """output_dir/deepspeed_config.json, the configuration the engine was built with (rank 0)."""
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "deepspeed_config.json"), "w") as f:
        json.dump(deepspeed_config(args, device, world), f, indent=2)


def deepspeed_step(engine, criterion, samples, targets, input_dtype, update, device):
    """One micro-step through the engine: (outputs, loss, gradient norm on the update micro-step or None).
    The engine divides the loss by the accumulation steps and steps only on the boundary."""
    outputs = engine(samples.to(input_dtype))
    loss = criterion(outputs.float(), targets)
    engine.backward(loss)
    grad_norm = None
    if update and not (engine.fp16_enabled() or engine.bfloat16_enabled() or engine.zero_optimization()):
        # fp32 without ZeRO: the engine steps torch's optimizer directly and reports no norm; the
        # gradients are the parameters' own, already averaged over ranks: measure them before the step
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in engine.parameters() if p.grad is not None])
    engine.step()
    if update and grad_norm is None:
        norm = engine.get_global_grad_norm()
        grad_norm = None if norm is None else torch.as_tensor(float(norm), device=device)
    return outputs, loss, grad_norm


def fp32_state(engine):
    """The module's state dict with each parameter's fp32 master copy where DeepSpeed keeps one (ZeRO 1/2:
    a collective, every rank calls it), else the module's own tensor; float32 on the CPU."""
    from deepspeed.utils import safe_get_full_fp32_param
    state = {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        state[name] = (full if full is not None else param.detach()).float().cpu()
    return state


def save_engine(engine, output_dir, epoch):
    """Saves the engine (ZeRO partitions, optimizer) under ``deepspeed/epoch-<epoch>/``; returns the entries
    the plain checkpoint files add: the fp32 weights and ``deepspeed_tag`` naming that folder."""
    tag = f"epoch-{epoch}"
    engine.save_checkpoint(os.path.join(output_dir, DEEPSPEED_DIR), tag=tag, client_state={"epoch": epoch})
    return {"model": fp32_state(engine), "deepspeed_tag": tag}


def prune_tags(output_dir, keep_epochs):
    """Removes DeepSpeed folders no plain checkpoint refers to (the last, the best, the numbered ones); every
    rank waits for the plain files first, rank 0 removes."""
    if utils.is_dist():
        torch.distributed.barrier()
    if not utils.is_main_process():
        return
    keep = {f"epoch-{e}" for e in keep_epochs if e is not None}
    for name in os.listdir(output_dir):
        m = re.fullmatch(r"checkpoint-(\d+)\.pth", name)
        if m:
            keep.add(f"epoch-{int(m.group(1))}")
    root = os.path.join(output_dir, DEEPSPEED_DIR)
    for name in os.listdir(root):
        if re.fullmatch(r"epoch-\d+", name) and name not in keep:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
