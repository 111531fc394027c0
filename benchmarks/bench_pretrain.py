"""Training-step benchmark: images/s, ms/step, peak memory, FLOPs per image and MFU.

    python benchmarks/bench_pretrain.py --model bootmae_base --batch_size 8 --path fast plain
    python benchmarks/bench_pretrain.py --model bootmae_base --batch_size 256 --amp bf16 --compile

A step is what the training loop does: momentum-encoder forward on the full images, student forward,
``bootmae_loss``, backward, AdamW step, EMA update (``--task finetune``: classifier forward/backward/step).
Masks are real (the release's generator), made before timing; data loading is not timed (``--synthetic``
images), so the figure is the model's. Warm-up steps are excluded; the clock is read after a device
synchronisation; ``--repeats`` timed blocks give a median and spread.

``--path plain`` is a straightforward eager implementation of the same mathematics in the release's style:
explicit softmax attention, a per-tensor python EMA loop and the for-loop AdamW. ``--path fast`` is this
repository's default: SDPA attention, timm's foreach EMA, fused AdamW, optional ``torch.compile``.
Prints a table line and one JSON line per configuration.

Paper Table 5's rows: ``--target_fraction 0.25|0.5|0.75`` feeds that fraction of the patches (drawn from the
masked ones) to the momentum encoder and evaluates the feature loss on them; ``--mae`` times the MAE baseline
as ``run_pretraining.py --mae`` builds it (``ablation_flags.MAE_PRESET``: no feature predictor, no momentum encoder, MAE's
8-block 512-wide decoder without cross-attention, random masks, per-patch normalised pixels), e.g.
``for f in 0.25 0.5 0.75 1; do python benchmarks/bench_pretrain.py --batch_size 256 --amp bf16
--target_fraction $f; done; python benchmarks/bench_pretrain.py --batch_size 256 --amp bf16 --mae``.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import modeling_bootmae  # noqa: E402
import pretraining_args  # noqa: E402
import pretraining_state  # noqa: E402
import utils  # noqa: E402
from engine_for_pretraining import bootmae_loss, sample_target_patches, target_patch_count  # noqa: E402
from flops import classifier_flops, train_step_flops  # noqa: E402
from masking_generator import build_masking_generator  # noqa: E402

# dense peak TFLOP/s (no sparsity) used when the device is recognised
PEAK_TFLOPS = {
    ("H100", torch.bfloat16): 989.0, ("H100", torch.float16): 989.0, ("H100", torch.float32): 494.0,
    ("H200", torch.bfloat16): 989.0, ("H200", torch.float16): 989.0, ("H200", torch.float32): 494.0,
    ("A100", torch.bfloat16): 312.0, ("A100", torch.float16): 312.0, ("A100", torch.float32): 156.0,
}


# ---------------------------------------------------------------------------------------------------------
# the two paths

class PlainEMA:
    """The release's EMA: one python-level update per tensor."""

    def __init__(self, model):
        import copy
        self.module = copy.deepcopy(model).eval()
        self.decay = 0.999

    @torch.no_grad()
    def update(self, model):
        for ema_v, v in zip(self.module.state_dict().values(), model.state_dict().values()):
            ema_v.copy_(ema_v * self.decay + (1.0 - self.decay) * v)


def recipe_args(args):
    """``run_pretraining.py``'s arguments of the benchmarked pretraining: the release's BootMAE (its scripts'
    flags, --weight_mask included) or, with --mae, the MAE preset; --decoder_dim overrides either."""
    flags = ["--model", args.model, "--input_size", str(args.input_size), "--mae" if args.mae else "--weight_mask"]
    for flag in ("patch_size", "decoder_dim"):
        if getattr(args, flag):
            flags += [f"--{flag}", str(getattr(args, flag))]
    return pretraining_args.get_args_parser().parse_args(flags)


def build(args, path, device, amp_dtype):
    from timm.models import create_model
    from timm.utils import ModelEmaV3
    torch.manual_seed(0)
    recipe = recipe_args(args)
    if args.task == "finetune":
        model = create_model(args.model + "_patch16_224" if "patch" not in args.model else args.model,
                             img_size=args.input_size, num_classes=1000, drop_path_rate=0.1).to(device)
    else:
        model = pretraining_state.build_model(recipe).to(device)
    if args.checkpointing:
        model.set_grad_checkpointing(True)
    fast = path == "fast"
    groups = [{"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": 0.05},
              {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    if fast:
        optimizer = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), foreach=False)
    ema = None
    if args.task == "pretrain" and recipe.feature_weight > 0:
        ema = ModelEmaV3(model, decay=0.999) if fast else PlainEMA(model)
    step_model = model
    teacher_fn = ema.module.target_features if ema is not None else None
    if fast and args.compile:
        step_model = torch.compile(model)
        if teacher_fn is not None:
            teacher_fn = torch.compile(ema.module.target_features)
    return model, step_model, optimizer, ema, teacher_fn


def make_batches(args, model, device, n=4):
    g = torch.Generator().manual_seed(0)
    grid = args.input_size // model.patch_size
    num_patches = grid * grid
    mask_num = args.mask_num or round(0.75 * num_patches)
    gen = build_masking_generator(recipe_args(args).mask_type, (grid, grid), mask_num,
                                  round(mask_num * 120 / 147),
                                  max_num_patches=max(16, round(60 * num_patches / 196)),
                                  min_num_patches=min(16, max(1, num_patches // 12)),
                                  rng=__import__("numpy").random.default_rng(0))
    batches = []
    for _ in range(n):
        images = torch.randn(args.batch_size, 3, args.input_size, args.input_size, generator=g).to(device)
        mask = torch.stack([torch.from_numpy(gen()).flatten() for _ in range(args.batch_size)]).to(device)
        labels = torch.randint(0, 1000, (args.batch_size,), generator=g).to(device)
        batches.append((images, mask, labels))
    return batches, num_patches, mask_num


class Runner:
    """One configuration (path) built once; ``time_block`` times ``steps`` training steps."""

    def __init__(self, args, path, device, amp_dtype):
        self.args, self.path, self.device, self.amp_dtype = args, path, device, amp_dtype
        with modeling_bootmae.fused_attention(path == "fast"):
            built = build(args, path, device, amp_dtype)
        self.model, self.step_model, self.optimizer, self.ema, self.teacher_fn = built
        self.batches, self.num_patches, self.mask_num = make_batches(args, self.model, device)
        self.loss_fn = torch.compile(bootmae_loss) if path == "fast" and args.compile else bootmae_loss
        self.recipe = recipe_args(args)
        self.autocast = dict(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
        self.times = []
        self.i = 0

    def step(self):
        args, model = self.args, self.model
        images, mask, labels = self.batches[self.i % len(self.batches)]
        self.i += 1
        with torch.autocast(**self.autocast):
            if args.task == "finetune":
                loss = torch.nn.functional.cross_entropy(self.step_model(images).float(), labels)
            else:
                ids = target = None
                if self.teacher_fn is not None and args.target_fraction < 1:
                    ids = sample_target_patches(mask, self.mask_num,
                                                target_patch_count(args.target_fraction, self.num_patches))
                if self.teacher_fn is not None:
                    target = self.teacher_fn(images) if ids is None else self.teacher_fn(images, ids)
                pixel_pred, feature_pred = self.step_model(images, mask, self.mask_num)
        if args.task == "pretrain":
            pl, fl = self.loss_fn(pixel_pred, feature_pred, target, images, mask, model.patch_size,
                                  self.recipe.weight_mask, target_ids=ids, pixel_norm=self.recipe.pixel_norm)
            loss = pl + fl
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(model)
        return loss

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def warmup(self):
        with modeling_bootmae.fused_attention(self.path == "fast"):
            for _ in range(self.args.warmup):
                self.step()
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def time_block(self):
        with modeling_bootmae.fused_attention(self.path == "fast"):
            t0 = time.perf_counter()
            for _ in range(self.args.steps):
                loss = self.step()
            self.sync()
            self.times.append((time.perf_counter() - t0) / self.args.steps)
        if not torch.isfinite(loss).item():
            raise RuntimeError(f"{self.path}: non-finite loss")

    def result(self):
        args, device, model = self.args, self.device, self.model
        if args.task == "finetune":
            flops = classifier_flops(model, self.num_patches, 1000)
        else:
            flops = train_step_flops(model, self.num_patches, self.mask_num,
                                     None if args.mae else target_patch_count(args.target_fraction, self.num_patches))
        measured = None
        if args.check_flops:
            from torch.utils.flop_counter import FlopCounterMode
            with modeling_bootmae.fused_attention(self.path == "fast"), FlopCounterMode(display=False) as counter:
                self.step()
            measured = counter.get_total_flops() / args.batch_size
        if device.type == "cuda":
            peak_mem, mem_kind = torch.cuda.max_memory_allocated() / 2**30, "cuda allocated"
        else:
            peak_mem, mem_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process RSS (all paths)"
        med = statistics.median(self.times)
        images_per_s = args.batch_size / med
        peak = args.peak_tflops
        if peak is None and device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            peak = next((v for (k, dt), v in PEAK_TFLOPS.items()
                         if k in name and dt == (self.amp_dtype or torch.float32)), None)
        return dict(task=args.task, model=args.model, path=self.path, device=str(device),
                    device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    threads=torch.get_num_threads(), amp=args.amp, compile=bool(args.compile and self.path == "fast"),
                    checkpointing=args.checkpointing, batch_size=args.batch_size, input_size=args.input_size,
                    patch_size=model.patch_size, mask_num=self.mask_num if args.task == "pretrain" else 0,
                    ms_per_step=med * 1e3, ms_min=min(self.times) * 1e3, ms_max=max(self.times) * 1e3,
                    repeats=len(self.times), images_per_s=images_per_s, gflops_per_image=flops / 1e9,
                    gflops_per_image_flop_counter=None if measured is None else measured / 1e9,
                    achieved_tflops=flops * images_per_s / 1e12,
                    mfu=None if peak is None else flops * images_per_s / (peak * 1e12), peak_tflops=peak,
                    peak_memory_gib=peak_mem, peak_memory_kind=mem_kind, mae=args.mae,
                    target_fraction=None if args.mae else args.target_fraction)


def profile_steps(runner, path, steps=2):
    """Operator/kernel table of ``steps`` training steps, sorted by device time (CPU time on CPU)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.device.type == "cuda" else [])
    with modeling_bootmae.fused_attention(runner.path == "fast"), profile(activities=activities) as prof:
        for _ in range(steps):
            runner.step()
        runner.sync()
    key = "self_cuda_time_total" if runner.device.type == "cuda" else "self_cpu_time_total"
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=90))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="pretrain", choices=["pretrain", "finetune"])
    p.add_argument("--model", default="bootmae_base")
    p.add_argument("--batch_size", default=8, type=int)
    p.add_argument("--input_size", default=224, type=int)
    p.add_argument("--patch_size", default=None, type=int, help="default: the model's")
    p.add_argument("--decoder_dim", default=None, type=int, help="pixel decoder width (default: the model's)")
    p.add_argument("--mask_num", default=None, type=int, help="default: 75 %% of the patches")
    p.add_argument("--device", default=utils.default_device())
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--path", nargs="+", default=["fast"], choices=["fast", "plain"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model and momentum encoder (fast path)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing of the encoder blocks")
    p.add_argument("--warmup", default=3, type=int)
    p.add_argument("--steps", default=5, type=int, help="steps per timed block")
    p.add_argument("--repeats", default=3, type=int)
    p.add_argument("--peak_tflops", default=None, type=float, help="device peak for MFU (default: known GPUs)")
    p.add_argument("--check_flops", action="store_true", help="also count FLOPs with torch.utils.flop_counter")
    p.add_argument("--json", default=None, help="append JSON lines to this file")
    p.add_argument("--mae", action="store_true", help="the MAE baseline of paper Table 5 (see above)")
    p.add_argument("--profile", default=None,
                   help="after timing, profile two steps of the first path and write the kernel table to this file")
    p.add_argument("--target_fraction", default=1.0, type=float,
                   help="fraction of the patches fed to the momentum encoder (paper Table 5; 1 = the full image)")
    args = p.parse_args()
    device = torch.device(args.device)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    runners = [Runner(args, path, device, amp_dtype) for path in args.path]
    for r in runners:
        r.warmup()
    # timed blocks alternate between the paths so that background load hits them alike
    for _ in range(args.repeats):
        for r in runners:
            r.time_block()
    if args.profile:
        profile_steps(runners[0], args.profile)
    results = []
    for runner in runners:
        r = runner.result()
        path = runner.path
        results.append(r)
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
        print(f"{r['task']} {r['model']} {path:5s} {r['device_name']} {args.amp} bs {args.batch_size}: "
              f"{r['ms_per_step']:.1f} ms/step [{r['ms_min']:.1f}, {r['ms_max']:.1f}]  {r['images_per_s']:.2f} img/s  "
              f"{r['gflops_per_image']:.2f} GFLOP/img"
              + ("" if r["gflops_per_image_flop_counter"] is None else
                 f" (flop counter {r['gflops_per_image_flop_counter']:.2f})")
              + f"  {r['achieved_tflops']:.3f} TFLOP/s  MFU {mfu}  peak mem {r['peak_memory_gib']:.2f} GiB",
              flush=True)
        print(json.dumps(r), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    if len(results) == 2:
        plain = next(r for r in results if r["path"] == "plain")
        fast = next(r for r in results if r["path"] == "fast")
        pairs = [p / f for p, f in zip(runners[args.path.index("plain")].times, runners[args.path.index("fast")].times)]
        print(f"speed-up fast / plain: {plain['ms_per_step'] / fast['ms_per_step']:.2f}x (medians); "
              f"per alternating block: median {statistics.median(pairs):.2f}x, range [{min(pairs):.2f}, {max(pairs):.2f}]")


if __name__ == "__main__":
    main()
