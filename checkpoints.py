"""Checkpoint reading and writing for every entry point: the atomic write on rank 0 (``save_on_master``) and its
errors, safe loading (``load_checkpoint``: weights_only with a short allow-list), resume and auto-resume with fallback
to older files, the run's ``args`` stored as plain values, the schedule-change warning, log.txt appends, and the epoch loop of the
training entry points (``run_epochs``), which orders each epoch's record before its checkpoints."""
import argparse
import glob
import json
import math
import os
import re
import time

import numpy as np
import torch

import release_format
import utils


def append_log(output_dir, record):
    """Appends ``record`` to output_dir/log.txt as one JSON line (rank 0). log.txt holds one record per epoch:
    records of this epoch and later already there, which a run killed after writing them and before
    checkpoint-last.pth moved on left behind, are dropped first (the resumed run writes them again)."""
    if utils.is_main_process() and output_dir:
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
        utils.print0(f"{path}: {len(lines) - len(keep)} record(s) from epoch {epoch} on dropped, left by an "
                     f"interrupted run; this run writes them again")


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
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else utils.one_line_error(exc)
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
    if not utils.is_main_process():
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
    if not utils.is_main_process() or not output_dir or not os.path.isdir(output_dir):
        return
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if TEMPORARY_RE.fullmatch(name) and os.path.isfile(path):
            size = os.path.getsize(path)
            os.remove(path)
            utils.print0(f"removed {path} ({size / 2**20:.1f} MiB), a checkpoint an interrupted run did not finish")


def run_epochs(args, start_epoch, sampler, log_writer, run_epoch, summary=None):
    """Epochs ``start_epoch``..args.epochs - 1: each reseeds every generator (args.seed + 1000003 x epoch + rank)
    and ``sampler``, then ``run_epoch(epoch)`` trains and evaluates and returns (the epoch's log.txt record, a
    function that writes its checkpoints). The record is appended first, then the checkpoints are written: a run
    killed before checkpoint-last.pth moves on repeats the epoch, and its first record replaces the one left
    behind (append_log). Temporary files an interrupted run left are removed first (``remove_stale_temporaries``).
    The TensorBoard writer is flushed after each epoch and closed at the end; the closing line "training time ..."
    ends with ``summary()`` when given. Returns the last epoch's record (None when no epoch was left to run)."""
    remove_stale_temporaries(args.output_dir)
    rank = utils.get_rank()
    utils.print0(f"training epochs {start_epoch}..{args.epochs - 1}")
    start_time, record = time.time(), None
    for epoch in range(start_epoch, args.epochs):
        utils.seed_everything(args.seed + 1000003 * epoch + rank)
        sampler.set_epoch(epoch)
        record, save_checkpoints = run_epoch(epoch)
        append_log(args.output_dir, record)
        save_checkpoints()
        if log_writer is not None:
            log_writer.flush()
    if log_writer is not None:
        log_writer.close()
    utils.print0(f"training time {utils.format_seconds(time.time() - start_time)}" + (summary() if summary else ""))
    return record


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
        raise utils.UsageError(f"checkpoint {path} does not exist; check the path given to --resume/--finetune")
    try:
        with torch.serialization.safe_globals(CHECKPOINT_SAFE_TYPES):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's weights_only failures wrap the real reason (e.g. "Unsupported operand 44" for random
        # bytes) in a banner that suggests weights_only=False; report the reason instead
        reason = e.__context__ if "Weights only load failed" in str(e) and e.__context__ is not None else e
        first = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
        raise utils.UsageError(f"cannot read checkpoint {path} ({first}); it is corrupt, truncated or not a "
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
        except utils.UsageError as e:
            skipped.append((path, e))
            continue
        for bad, e in skipped:
            utils.print0(f"warning: auto-resume skips {bad}: {utils.one_line_error(e)}; resuming from {path}")
        return path, ckpt
    if skipped:
        raise utils.UsageError(f"auto-resume found no readable checkpoint in {output_dir}: "
                               + "; ".join(utils.one_line_error(e) for _, e in skipped)
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
        utils.print0(f"warning: resuming {path} with another schedule: {', '.join(changes)}; the lr and "
                     f"weight-decay schedules are rebuilt from this run's values, so the remaining epochs do not "
                     f"continue the curve the trained ones followed (pass the checkpoint's values to continue it)")
    return changes


# ---------------------------------------------------------------------------------------------------------
# fine-tuning's classifier checkpoints

def classifier_state(state_dict):
    """A classifier state dict from a checkpoint's entry: ``module.`` prefixes removed and the release's
    stored sin-cos table dropped (here it is a buffer recomputed from the input grid)."""
    out = {}
    for key, value in state_dict.items():
        while key.startswith("module."):
            key = key[len("module."):]
        if key != "pos_embed":
            out[key] = value
    return out


def load_classifier(model, state_dict, path, what="model"):
    """Loads a fine-tuning checkpoint's ``what`` entry into the classifier ``model``; a checkpoint of another
    model, size or number of classes (or a pretraining checkpoint) raises UsageError naming the first mismatch."""
    state = classifier_state(state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    bad = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or bad:
        if bad:
            k = bad[0]
            detail = f"{k} is {tuple(state[k].shape)} in the checkpoint but {tuple(own[k].shape)} here"
            if k.startswith("head."):
                detail += f" (the checkpoint's head has {state[k].shape[0]} classes: set --nb_classes to it)"
        elif unexpected and any(k.startswith(("pixel_decoder.", "feature_decoder.", "decode_blocks", "down."))
                                for k in unexpected):
            detail = "it is a pretraining checkpoint; pass it to --finetune, not --resume"
        else:
            detail = (f"{len(missing)} missing (e.g. {', '.join(missing[:3]) or '-'}), {len(unexpected)} unexpected "
                      f"(e.g. {', '.join(unexpected[:3]) or '-'})")
        raise utils.UsageError(f"{path}: its {what} does not fit --model {model.default_cfg_name}: {detail}")
    model.load_state_dict(state)


def load_classifier_resume(args):
    """(path, checkpoint) of the fine-tuning run to resume (--resume, or auto-resume in --output_dir), or
    (None, None); the release's DeepSpeed files ('module' entry) are read as ours ('model')."""
    path, ckpt = load_resume_checkpoint(args.resume, args.output_dir, args.auto_resume)
    if ckpt is None:
        return None, None
    if isinstance(ckpt, dict) and not isinstance(ckpt.get("model"), dict) and isinstance(ckpt.get("module"), dict):
        # the release's DeepSpeed runs saved the classifier as 'module' (mp_rank_00_model_states.pt)
        ckpt = {**ckpt, "model": ckpt["module"]}
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise utils.UsageError(f"{path} has no 'model' entry; give a fine-tuning checkpoint (checkpoint-*.pth)")
    return path, ckpt


def load_optimizer_state(optimizer, ckpt, path):
    """Restores a fine-tuning checkpoint's AdamW state when it fits ``optimizer`` (else the moments restart), keeping
    this command line's per-group ``lr_scale`` and ``layer_id``."""
    if "optimizer" not in ckpt:
        utils.print0(f"resume: {path} has no optimizer state (a DeepSpeed run's plain file, or weights only); "
                     f"AdamW moments restart")
        return
    if not optimizer_state_fits(optimizer, ckpt["optimizer"]):
        utils.print0(f"resume: the optimizer state in {path} does not match this model's parameter groups; AdamW "
                     f"moments restart")
        return
    # the checkpoint would also overwrite each group's lr_scale; keep the ones of this command line
    scales = [(g.get("lr_scale"), g.get("layer_id")) for g in optimizer.param_groups]
    optimizer.load_state_dict(ckpt["optimizer"])
    for g, (scale, layer_id) in zip(optimizer.param_groups, scales):
        if scale is not None:
            g["lr_scale"] = scale
        if layer_id is not None:
            g["layer_id"] = layer_id


# ---------------------------------------------------------------------------------------------------------
# the pretrained encoder of the downstream jobs (fine-tuning, linear probing, kNN)

def load_pretrained_encoder(model, path, model_key="model|module", new=None):
    """Loads the encoder of a checkpoint (ours or the release's; pretraining or fine-tuning) into ``model``
    and prints exactly what was transferred. Returns (loaded, not_in_checkpoint, unused) key lists.

    ``new``: prefixes of the tensors of ``model`` that the checkpoint need not hold (the probe's fc_norm and
    head); with it, a checkpoint that leaves any other tensor uninitialised is refused, and an absent final
    norm (``norm.*``, allowed where ``new`` names it: a fine-tuned mean-pooling model has none) is reported.
    Bad input (missing file, unreadable file, no encoder tensors, another model size) raises UsageError.
    """
    checkpoint = load_checkpoint(path)
    loaded, missing, unused = release_format.load_checkpoint_encoder(model, checkpoint, path, model_key)
    utils.print0(f"loaded {len(loaded)} encoder tensors from {path} (entry '{model_key}')")
    utils.print0(f"  newly initialised (not in the checkpoint): {', '.join(missing) or 'none'}")
    if unused:
        shown = ", ".join(unused[:8]) + (f", ... ({len(unused) - 8} more)" if len(unused) > 8 else "")
        utils.print0(f"  in the checkpoint but not used ({len(unused)}): {shown}")
    if new is not None:
        lacking = [k for k in missing if not k.startswith(tuple(new))]
        if lacking:
            raise utils.UsageError(f"{path} lacks {len(lacking)} encoder tensors of this model (e.g. {lacking[0]}); "
                                   f"pass the --model of the checkpoint's size")
        if any(k.startswith("norm.") for k in missing):
            utils.print0(f"warning: {path} has no final norm ('norm.*'); features use an identity-initialised "
                         f"LayerNorm")
    return loaded, missing, unused
