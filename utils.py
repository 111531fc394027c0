"""Distributed helpers, checkpoint I/O, step logging, schedules and the loss scaler shared by the entry points."""
import argparse
import datetime
import glob
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


def mark_first_nonfinite(record, loss, step, *values):
    """``record``: a device tensor [1 + len(values)] whose first entry is -1 until a step's ``loss`` is NaN or
    infinite; that first step's number and ``values`` (e.g. the loss terms) are then written into it. No host
    sync: the training loop reads it (``record[0] >= 0``) at its print interval and raises NonFiniteLossError."""
    first = (record[0] < 0) & ~torch.isfinite(loss.detach())
    now = torch.stack([torch.tensor(float(step), device=record.device, dtype=record.dtype),
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
                            timeout=datetime.timedelta(minutes=getattr(args, "dist_timeout", 30)))
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
    micro-step unscale_ -> ``clip_grad_norm`` -> step -> update)."""
    state_dict_key = "scaler"

    def __init__(self, device_type, fp16):
        self.fp16 = fp16
        self.scaler = torch.amp.GradScaler(device_type, enabled=fp16)

    @staticmethod
    def clip_grad_norm(parameters, clip_grad=None):
        """The total norm of the (unscaled) gradients of ``parameters`` before clipping, a tensor (no host sync);
        with ``clip_grad`` the gradients are then scaled down to at most that norm."""
        if clip_grad:
            return torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
        grads = [p.grad for p in parameters if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))

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


def append_log(output_dir, record):
    """Appends ``record`` to output_dir/log.txt as one JSON line (rank 0). log.txt holds one record per epoch:
    records of this epoch and later already there, which a run killed after writing them and before
    checkpoint-last.pth moved on left behind, are dropped first (the resumed run writes them again)."""
    if is_main_process() and output_dir:
        path = os.path.join(output_dir, "log.txt")
        try:
            os.makedirs(output_dir, exist_ok=True)   # the run's first record creates the folder
            if isinstance(record.get("epoch"), int):
                _drop_records_from(path, record["epoch"])
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise _write_failure(path, e) from e


def _drop_records_from(path, epoch):
    """Rewrites log.txt at ``path`` without its records of ``epoch`` and later (and without a line a kill cut
    short); leaves it as it is when there are none."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not (isinstance(record, dict) and isinstance(record.get("epoch"), int) and record["epoch"] >= epoch):
            keep.append(line if line.endswith("\n") else line + "\n")
    if keep != lines:
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)
        print0(f"{path}: {len(lines) - len(keep)} record(s) from epoch {epoch} on dropped, left by an interrupted "
               f"run; this run writes them again")


# ---------------------------------------------------------------------------------------------------------
# checkpoints

class CheckpointWriteError(Exception):
    """A checkpoint or log record that could not be written (full disk, no permission): the entry points print
    the message as one line and exit with status 1; the files written before stay as they were."""


def _tensor_bytes(obj):
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _write_failure(path, exc, needed=None):
    """``exc`` (an OSError, or torch's RuntimeError around one) as a CheckpointWriteError naming ``path`` and
    the free space of its file system."""
    import shutil
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else one_line_error(exc)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    need = f", it needs about {needed / 2**20:.1f} MiB" if needed else ""
    return CheckpointWriteError(f"cannot write {path} ({reason}); {free} on {folder}{need}: free space there, "
                                f"check its permissions or choose another --output_dir; the files written before "
                                f"are intact")


# the temporary name of a checkpoint being written: <name>.tmp.<pid>
TEMPORARY_RE = re.compile(r".+\.pth\.tmp\.\d+")


def save_on_master(obj, path):
    """Rank 0 writes to a temporary file beside ``path`` (``TEMPORARY_RE``), flushes it to the disk and renames
    it into place, so a crash never leaves a truncated checkpoint under the real name. A write that fails
    (full disk, no permission) removes the temporary file and raises CheckpointWriteError."""
    if not is_main_process():
        return
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        # a Python file object: a failed write surfaces as the OSError itself (torch.save on a path name
        # reports it as an "enforce fail" RuntimeError without the reason)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)   # the run's first save creates the folder
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        raise _write_failure(path, e, _tensor_bytes(obj)) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(output_dir):
    """Removes the temporary checkpoint files (``TEMPORARY_RE``) that killed runs left in ``output_dir``; rank 0
    calls it before its first save (one run writes to an output folder at a time)."""
    if not is_main_process() or not output_dir or not os.path.isdir(output_dir):
        return
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if TEMPORARY_RE.fullmatch(name) and os.path.isfile(path):
            size = os.path.getsize(path)
            os.remove(path)
            print0(f"removed {path} ({size / 2**20:.1f} MiB), a checkpoint an interrupted run did not finish")


def _numpy_scalar_types():
    # The release (like BEiT) sets each param group's lr from a numpy schedule, so its optimizer state holds
    # numpy float64 scalars; unpickling one needs numpy's scalar constructor and dtype classes. These build
    # plain numbers from bytes and run no other code.
    scalar = getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray
    types = [scalar.scalar, np.dtype]
    types += [getattr(np.dtypes, name) for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType",
                                                    "BoolDType") if hasattr(np, "dtypes") and hasattr(np.dtypes, name)]
    return types


# what torch.load(weights_only=True) may build besides tensors, containers and plain values
CHECKPOINT_SAFE_TYPES = [argparse.Namespace, *_numpy_scalar_types()]


def load_checkpoint(path):
    """``torch.load`` with ``weights_only=True``: tensors, containers and plain values only, plus
    ``argparse.Namespace`` (the release's ``args``) and numpy scalars (the lr values in the release's
    optimizer state). Never ``weights_only=False``: loading a file must not run pickled code."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path} does not exist; check the path given to --resume/--finetune")
    try:
        with torch.serialization.safe_globals(CHECKPOINT_SAFE_TYPES):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's weights_only failures wrap the real reason (e.g. "Unsupported operand 44" for random
        # bytes) in a banner that suggests weights_only=False; report the reason instead
        reason = e.__context__ if "Weights only load failed" in str(e) and e.__context__ is not None else e
        first = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
        raise UsageError(f"cannot read checkpoint {path} ({first}); it is corrupt, truncated or not a "
                         f"PyTorch checkpoint with plain tensors") from e


def resume_candidates(output_dir):
    """The checkpoints auto-resume may start from, newest first: checkpoint-last.pth, then checkpoint-N.pth by
    falling N."""
    if not output_dir:
        return []
    numbered = []
    for path in glob.glob(os.path.join(glob.escape(output_dir), "checkpoint-*.pth")):
        m = re.fullmatch(r"checkpoint-(\d+)\.pth", os.path.basename(path))
        if m:
            numbered.append((int(m.group(1)), path))
    last = os.path.join(output_dir, "checkpoint-last.pth")
    return ([last] if os.path.isfile(last) else []) + [path for _, path in sorted(numbered, reverse=True)]


def load_resume_checkpoint(resume, output_dir, auto_resume=True):
    """(path, checkpoint) to resume from, or ("", None): ``resume`` when given (an unreadable file is an error);
    else, with ``auto_resume``, the newest of ``resume_candidates(output_dir)`` that loads, saying which newer
    ones were skipped and why."""
    if resume:
        return resume, load_checkpoint(resume)
    if not auto_resume:
        return "", None
    skipped = []
    for path in resume_candidates(output_dir):
        try:
            ckpt = load_checkpoint(path)
        except UsageError as e:
            skipped.append((path, e))
            continue
        for bad, e in skipped:
            print0(f"warning: auto-resume skips {bad}: {one_line_error(e)}; resuming from {path}")
        return path, ckpt
    if skipped:
        raise UsageError(f"auto-resume found no readable checkpoint in {output_dir}: "
                         + "; ".join(one_line_error(e) for _, e in skipped)
                         + "; move the files away to start afresh, or pass --resume with a good checkpoint")
    return "", None


def optimizer_state_fits(optimizer, state):
    """Whether a saved optimizer ``state`` (``state_dict()``) has ``optimizer``'s group sizes and, where it
    holds AdamW moments, their shapes: a checkpoint of another model or grouping fails and is not loaded."""
    groups = state.get("param_groups", [])
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        return False
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in groups for i in g["params"]]
    for pid, p in zip(ids, params):
        s = state.get("state", {}).get(pid, {})
        if "exp_avg" in s and s["exp_avg"].shape != p.shape:
            return False
    return True


def args_dict(args):
    """``args`` as a dict of plain values (str, int, float, bool, None, lists and tuples of them): checkpoints
    store it so, and ``torch.load(path)`` with PyTorch's default ``weights_only=True`` opens them."""
    def plain(v):
        if v is None or type(v) in (bool, int, float, str):
            return v
        if isinstance(v, np.bool_):
            return bool(v)
        if isinstance(v, (int, np.integer)):
            return int(v)
        if isinstance(v, (float, np.floating)):
            return float(v)
        if type(v) is tuple:
            return tuple(plain(x) for x in v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return str(v)
    return {k: plain(v) for k, v in vars(args).items()}


def checkpoint_args(ckpt):
    """The ``args`` of a checkpoint as an argparse.Namespace: ours store a dict (``args_dict``), the release's
    and our older ones a Namespace; empty when there are none."""
    saved = ckpt.get("args") if isinstance(ckpt, dict) else None
    if isinstance(saved, argparse.Namespace):
        return argparse.Namespace(**vars(saved))
    return argparse.Namespace(**saved) if isinstance(saved, dict) else argparse.Namespace()


def warn_schedule_changes(args, ckpt, path, fields, accumulation="update_freq"):
    """Prints one warning line when this run's schedule-defining ``fields`` (and total batch: batch_size x
    ``accumulation`` x world_size) differ from those of the checkpoint it resumes: the lr and weight-decay
    schedules are built from this run's values, so the resumed epochs follow another curve than the trained
    ones did. Settings the checkpoint does not record are not compared."""
    saved = checkpoint_args(ckpt)

    def total(a):
        parts = [getattr(a, k, None) for k in ("batch_size", accumulation, "world_size")]
        return parts[0] * parts[1] * parts[2] if all(isinstance(p, int) for p in parts) else None

    changes = []
    for name, before, now in [*((f"--{k}", getattr(saved, k, None), getattr(args, k, None)) for k in fields),
                              ("total batch", total(saved), total(args))]:
        if isinstance(before, (int, float)) and isinstance(now, (int, float)) and not math.isclose(before, now):
            changes.append(f"{name} {before:g} -> {now:g}")
    if changes:
        print0(f"warning: resuming {path} with another schedule: {', '.join(changes)}; the lr and weight-decay "
               f"schedules are rebuilt from this run's values, so the remaining epochs do not continue the curve "
               f"the trained ones followed (pass the checkpoint's values to continue it)")
    return changes


def run_cli(description, get_args_parser, main):
    """The entry points' command line: parse, run ``main(args)``, and report user errors (UsageError) and a
    diverged run (NonFiniteLossError) as one ``error: ...`` line with exit status 2, and a failed write
    (CheckpointWriteError) as one line with exit status 1; the process group is always torn down."""
    import sys
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


def add_run_args(p, resume_help):
    """Output, device, seed, resuming and launcher flags every training entry point has."""
    p.add_argument("--output_dir", default="", help="checkpoints, log.txt, TensorBoard events")
    p.add_argument("--log_dir", default=None, help="TensorBoard folder (default: --output_dir)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
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
