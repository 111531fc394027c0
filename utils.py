"""Errors, distributed helpers, step logging, schedules, the loss scaler and the command-line flags and checks shared
by the entry points (checkpoint reading and writing: checkpoints.py)."""
import argparse
import datetime
import json
import math
import os
import random
import re
import socket

import numpy as np
import torch
import torch.distributed as dist


class UsageError(Exception):
    """Bad input from the user: the entry points print the message as one line and exit with status 2."""


class NonFiniteLossError(RuntimeError):
    """A training loss became NaN or infinite (too high an lr, no clipping, fp16 overflow): the entry points
    print the message, which names the step and what to change, as one line and exit with status 2."""


def one_line_error(exc):
    """The message of ``exc`` as one line. An exception raised inside a DataLoader worker reaches the main
    process re-raised by torch as the same type, with the worker's traceback folded into the message
    ("Caught UsageError in DataLoader worker process 0.\nOriginal Traceback ...\nutils.UsageError: <msg>");
    the original message is then what follows the type name on the last line."""
    text = str(exc).strip()
    if "\nOriginal Traceback" in text:
        last = text.splitlines()[-1]
        name = type(exc).__name__ + ": "
        text = last[last.find(name) + len(name):] if name in last else last
    return " ".join(text.split())


def write_json_atomic(path, obj):
    """``obj`` as indented JSON at ``path``, written to ``path.tmp`` and renamed: a reader never sees half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def mark_first_nonfinite(record, loss, step, *values):
    """``record``: a device tensor [1 + len(values)] whose first entry is -1 until a step's ``loss`` is NaN or
    infinite; that first step's number and ``values`` (e.g. the loss terms) are then written into it. No host
    sync: the training loop reads it (``record[0] >= 0``) at its print interval and raises NonFiniteLossError."""
    first = (record[0] < 0) & ~torch.isfinite(loss.detach())
    # new_full fills on the device: torch.tensor(..., device=cuda) would copy from the host and wait for the GPU
    now = torch.stack([record.new_full((), float(step)),
                       *(torch.as_tensor(v).detach().to(record) for v in values)])
    record.copy_(torch.where(first, now, record))


# ---------------------------------------------------------------------------------------------------------
# distributed

def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def get_rank():
    return dist.get_rank() if is_dist() else 0


def is_main_process():
    return get_rank() == 0


def print0(*args, **kwargs):
    if is_main_process():
        print(*args, **kwargs, flush=True)


def free_port():
    """A TCP port on 127.0.0.1 that is free now (for a one-process group's MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# how long a collective waits for the slowest process before the run fails
DIST_TIMEOUT = datetime.timedelta(minutes=30)


def init_distributed_mode(args):
    """Reads the launcher's environment in one place and sets args.distributed, rank, world_size, gpu.

    torchrun and ``python -m torch.distributed.launch`` set RANK / WORLD_SIZE / LOCAL_RANK (the latter
    also passes ``--local-rank``, which the parser accepts and ignores in favour of the environment);
    ``srun`` sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, with MASTER_ADDR / MASTER_PORT exported by
    the sbatch script. NCCL on CUDA, gloo on CPU.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        args.rank, args.world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        args.gpu = int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        args.rank, args.world_size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        args.gpu = int(env.get("SLURM_LOCALID", 0))
        if "MASTER_ADDR" not in env:
            raise UsageError("srun launch without MASTER_ADDR: export MASTER_ADDR (the first node's host name) "
                             "and MASTER_PORT in the sbatch script, as scripts/pretrain/*.sbatch do")
        env.setdefault("MASTER_PORT", "29500")
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(args.rank), str(args.world_size), str(args.gpu)
    else:
        args.rank, args.world_size, args.gpu, args.distributed = 0, 1, 0, False
        return
    args.distributed = True
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(args.gpu)
        args.device = f"cuda:{args.gpu}"
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, init_method="env://", world_size=args.world_size, rank=args.rank,
                            timeout=DIST_TIMEOUT)
    dist.barrier()
    print0(f"distributed: {args.world_size} processes, backend {backend}")


class ShardSampler(torch.utils.data.Sampler):
    """Indices rank, rank + world, rank + 2 world, ... in order, with no padding: the shards of all ranks
    together hold each item exactly once, so summed counts give the exact accuracy whatever the set's size
    (``DistributedSampler`` pads with repeated items, which would count twice). ``num_replicas`` and
    ``rank`` default to this process's."""

    def __init__(self, dataset, num_replicas=None, rank=None):
        self.num_items = len(dataset)
        self.world = get_world_size() if num_replicas is None else num_replicas
        self.rank = get_rank() if rank is None else rank

    def __iter__(self):
        return iter(range(self.rank, self.num_items, self.world))

    def __len__(self):
        return len(range(self.rank, self.num_items, self.world))


def all_reduce_mean(tensor):
    if is_dist():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor /= get_world_size()
    return tensor


def seed_everything(seed):
    """Seeds python, numpy and torch; the training loop calls it at the start of every epoch with a seed
    derived from (seed, rank, epoch), so a resumed run draws the same data order, masks and drop-path
    noise as an uninterrupted one."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------
# schedules

def cosine_scheduler(base_value, final_value, epochs, steps_per_epoch, warmup_epochs=0, start_warmup_value=0.0):
    """Per-step values: linear warm-up from ``start_warmup_value`` over ``warmup_epochs``, then a half
    cosine from ``base_value`` to ``final_value``. Indexed by the global optimisation step. As in the release
    (BEiT's scheduler), the warm-up's last step already has ``base_value`` (``linspace`` with its endpoint)."""
    warmup = int(warmup_epochs * steps_per_epoch)
    total = int(epochs * steps_per_epoch)
    warm = np.linspace(start_warmup_value, base_value, warmup) if warmup > 0 else np.array([])
    steps = np.arange(total - warmup)
    cos = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    return np.concatenate([warm, cos])


# ---------------------------------------------------------------------------------------------------------
# mixed precision

class LossScaler:
    """The GradScaler of a run, kept in checkpoints under ``scaler``: active for fp16 only (for bf16 and float32
    its calls pass through). The training loops call ``scaler`` in the open (scale -> backward; on the update
    micro-step ``optim_factory.optimizer_step``: unscale_ -> clip -> step -> update)."""

    def __init__(self, device_type, fp16):
        self.fp16 = fp16
        self.scaler = torch.amp.GradScaler(device_type, enabled=fp16)

    def state_dict(self):
        return self.scaler.state_dict()

    def load_state_dict(self, state_dict):
        if self.fp16 and state_dict:
            self.scaler.load_state_dict(state_dict)


# ---------------------------------------------------------------------------------------------------------
# logging

def format_seconds(seconds):
    return str(datetime.timedelta(seconds=int(seconds)))


class StepLogger:
    """Sums metrics on the device every step; ``flush`` does the only host sync (one all-reduce + one
    copy) and returns the means since the last flush, averaged over ranks."""

    def __init__(self, device, names, log_writer=None):
        self.names = list(names)
        self.device = device
        self.log_writer = log_writer
        self.window = torch.zeros(len(names) * 2, device=device)
        self.total = torch.zeros(len(names) * 2, device=device)

    def add(self, **values):
        for i, name in enumerate(self.names):
            v = values.get(name)
            if v is not None:
                self.window[i] += v.float()
                self.window[len(self.names) + i] += 1

    def _means(self, buf):
        buf = all_reduce_mean(buf).tolist()
        n = len(self.names)
        return {name: buf[i] / buf[n + i] if buf[n + i] else float("nan") for i, name in enumerate(self.names)}

    def flush(self, step):
        means = self._means(self.window)
        self.total += self.window
        self.window.zero_()
        if self.log_writer is not None:
            for name, v in means.items():
                self.log_writer.add_scalar(f"train/{name}", v, step)
        return means

    def epoch_means(self):
        self.total += self.window
        self.window.zero_()
        return self._means(self.total)


class LazySummaryWriter:
    """TensorBoard's SummaryWriter for ``log_dir``, created (with the folder and its events file) by the first
    record: a run that fails before it has anything to log (e.g. on its first batch) leaves no file behind."""

    def __init__(self, log_dir):
        self.log_dir, self._writer = log_dir, None

    def __getattr__(self, name):
        if self._writer is None:
            if name in ("flush", "close"):
                return lambda *args, **kwargs: None
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(log_dir=self.log_dir)
        return getattr(self._writer, name)


def run_log_writer(args):
    """The run's TensorBoard writer (``--log_dir``, else ``--output_dir``) on rank 0, None elsewhere or without an
    output folder. Lazy: the folder and its events file appear with the run's first record (as log.txt and the
    checkpoints do: checkpoints.append_log, checkpoints.save_on_master), so a run that fails before it has anything
    to write leaves nothing."""
    return LazySummaryWriter(args.log_dir or args.output_dir) if is_main_process() and args.output_dir else None


def run_cli(description, get_args_parser, main):
    """The entry points' command line: parse, run ``main(args)``, and report user errors (UsageError) and a
    diverged run (NonFiniteLossError) as one ``error: ...`` line with exit status 2, and a failed write
    (CheckpointWriteError) as one line with exit status 1; the process group is always torn down."""
    import sys
    from checkpoints import CheckpointWriteError   # checkpoints imports this module
    args = argparse.ArgumentParser(description, parents=[get_args_parser()]).parse_args()
    try:
        main(args)
    except (UsageError, NonFiniteLossError) as e:
        print(f"error: {one_line_error(e)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except CheckpointWriteError as e:
        print(f"error: {one_line_error(e)}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        if is_dist():
            dist.destroy_process_group()


def add_loader_args(p, demo_help="samples per epoch of --data_set demo"):
    """The data-loading flags every training entry point has."""
    p.add_argument("--demo_size", default=2048, type=int, help=demo_help)
    p.add_argument("--imagenet_default_mean_and_std", action="store_true",
                   help="normalise with ImageNet's mean/std instead of the release's 0.5/0.5")
    p.add_argument("--num_workers", default=10, type=int)
    p.add_argument("--pin_mem", action="store_true", default=True)
    p.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")


def default_device():
    """The --device default of the entry points: cuda where there is one, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_run_args(p, resume_help):
    """Output, device, seed, resuming and launcher flags every training entry point has."""
    p.add_argument("--output_dir", default="", help="checkpoints, log.txt, TensorBoard events")
    p.add_argument("--log_dir", default=None, help="TensorBoard folder (default: --output_dir)")
    p.add_argument("--device", default=default_device())
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--resume", default="", help=resume_help)
    p.add_argument("--auto_resume", action="store_true", default=True,
                   help="continue from output_dir/checkpoint-last.pth if it exists (default on)")
    p.add_argument("--no_auto_resume", action="store_false", dest="auto_resume")
    p.add_argument("--start_epoch", default=0, type=int)
    p.add_argument("--local_rank", "--local-rank", default=-1, type=int,
                   help="set by torch.distributed.launch; LOCAL_RANK from the environment is what is used")


# ---------------------------------------------------------------------------------------------------------
# flag checks: each entry point's check_args runs them before anything is built or created

_BOUND = r"\s*(-?[0-9.e+-]+|inf)\s*"


def check_range(flag, value, allowed, note=""):
    """Raises UsageError unless ``value`` (a number, or a list of numbers for an nargs flag; None: not given,
    accepted) is finite and within ``allowed``, written as the message shows it: ">= 0", "> 0", "[0, 1)",
    "(0, 1]", ... The message names the flag, its value, what is allowed and ``note`` (what the flag means)."""
    if value is None:
        return
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    one_sided = re.fullmatch(r"(>=|>)" + _BOUND, allowed)
    interval = re.fullmatch(r"([\[(])" + _BOUND + "," + _BOUND + r"([\])])", allowed)
    if not (one_sided or interval):
        raise ValueError(f"check_range: cannot read the range {allowed!r}")
    left, low, high, right = ("[" if one_sided.group(1) == ">=" else "(", one_sided.group(2), "inf", ")") \
        if one_sided else interval.groups()
    low, high = float(low), float(high)

    def inside(v):
        return (v >= low if left == "[" else v > low) and (v <= high if right == "]" else v < high)

    if all(math.isfinite(v) and inside(v) for v in values):
        return
    shown = " ".join(str(v) for v in values)
    finite = "" if all(math.isfinite(v) for v in values) else "a finite number "
    what = f"must be {finite}{allowed}" if one_sided else f"must be {finite}in {allowed}" if finite \
        else f"is outside {allowed}" if len(values) == 1 else f"must each be in {allowed}"
    raise UsageError(f"{flag} {shown} {what}" + (f" ({note})" if note else ""))


def check_flags(args, ranges):
    """``check_range`` for each (flag name, allowed range[, note]) of ``ranges`` that ``args`` has."""
    for flag, allowed, *note in ranges:
        if hasattr(args, flag):
            check_range(f"--{flag}", getattr(args, flag), allowed, *note)


def check_device(name):
    """--device: a device torch can parse and this machine has."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name} is not a device name; use cpu or cuda (cuda:N for one GPU)") from None
    if device.type == "cpu":
        return
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available here (no GPU, or a PyTorch without CUDA); "
                             f"use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
        return
    backend = getattr(torch, device.type, None)
    if not getattr(backend, "is_available", lambda: False)():
        raise UsageError(f"--device {name}: {device.type} is not available here; use cpu or cuda")


def check_output_path(flag, path, folder=True):
    """A folder (``folder``) or file the run will create or write: refused when it exists as the other kind,
    or when its nearest existing parent is a file or not writable. Creates nothing."""
    if not path:
        return
    kind = "folder" if folder else "file"
    if os.path.exists(path):
        if os.path.isdir(path) != folder:
            raise UsageError(f"{flag} {path} is a {'file' if folder else 'folder'}; give the path of a {kind} "
                             f"(it is created if missing)")
        if not os.access(path, os.W_OK | (os.X_OK if folder else 0)):
            raise UsageError(f"{flag} {path} is not writable; give a {kind} you can write to")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path} cannot be created: {parent} is a file; give a path under a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path} cannot be created: {parent} is not writable; give a path you can write to")


def check_run_args(args):
    """The flags of ``add_loader_args`` and ``add_run_args``."""
    check_flags(args, (("num_workers", ">= 0"), ("demo_size", ">= 1"), ("start_epoch", ">= 0")))
    check_device(args.device)
    check_output_path("--output_dir", args.output_dir)
    check_output_path("--log_dir", args.log_dir)


def resolve_amp(name, device):
    """``--amp`` for ``device``: (name, autocast dtype or None). Default (None): bf16 on CUDA where supported,
    else fp16; none (float32) on CPU. fp16 needs CUDA (its loss scaling is a CUDA feature here)."""
    if name is None:
        name = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "none"
    if name == "fp16" and device.type != "cuda":
        raise UsageError("--amp fp16 needs a CUDA device; use --amp bf16 or none on CPU")
    return name, {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[name]


def unwrap_model(model):
    """The plain module under torch.compile (``_orig_mod``) and DDP (``module``) wrappers."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
