"""One fine-tuning epoch (plain DDP + autocast, or a DeepSpeed engine) and top-1/top-5 evaluation (of a checkpoint
with --eval, of the model and its EMA after each epoch)."""
import contextlib
import json
import time

import torch
import torch.nn as nn
from timm.utils import accuracy

import utils
from finetune_deepspeed import deepspeed_step
from optim_factory import optimizer_step, set_schedules


def report_step(logger, optimizer, log_writer, epoch, step, steps_per_epoch, start):
    """The print interval's line (means since the last one, over ranks) and its TensorBoard scalars."""
    it = epoch * steps_per_epoch + step
    means = logger.flush(it)
    elapsed = time.time() - start
    eta = elapsed / (step + 1) * (steps_per_epoch - step - 1)
    lrs = [g["lr"] for g in optimizer.param_groups]
    if log_writer is not None:
        log_writer.add_scalar("opt/lr", max(lrs), it)
        log_writer.add_scalar("opt/min_lr", min(lrs), it)
    acc = f"  class_acc {means['class_acc']:.4f}" if "class_acc" in means else ""
    utils.print0(f"Epoch: [{epoch}] [{step + 1:>{len(str(steps_per_epoch))}}/{steps_per_epoch}] "
                 f"eta {utils.format_seconds(eta)}  lr {max(lrs):.3e} (min {min(lrs):.3e})  "
                 f"loss {means['loss']:.4f}{acc}  grad_norm {means['grad_norm']:.3f}  "
                 f"{elapsed / (step + 1):.3f} s/step")


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch, args, lr_schedule, wd_schedule,
                    loss_scaler=None, model_ema=None, mixup_fn=None, log_writer=None, amp_dtype=None,
                    deepspeed_engine=False, input_dtype=None):
    """One epoch over ``data_loader``.

    ``model`` is the (possibly DDP-wrapped) classifier with ``loss_scaler`` a ``utils.LossScaler`` (backward; on the
    update micro-step unscale, clip, optimizer step, scaler update), or with ``deepspeed_engine=True`` a DeepSpeed
    engine (``finetune_deepspeed.deepspeed_step``: the engine owns precision, accumulation and clipping;
    ``input_dtype`` is its parameters' dtype). ``model_ema`` (timm ``ModelEmaV3`` of the unwrapped model)
    is updated after each optimizer step. ``lr_schedule``/``wd_schedule`` are per-step arrays indexed by
    the global optimisation step, so a resumed run continues them exactly.
    """
    model.train()
    unwrapped = utils.unwrap_model(model)
    update_freq = args.update_freq
    steps_per_epoch = len(data_loader) // update_freq
    names = ["loss", "grad_norm"] + ([] if mixup_fn is not None else ["class_acc"])
    logger = utils.StepLogger(device, names, log_writer)
    # first non-finite step, kept on the device so that no step waits for a host sync
    bad_step = torch.full((1,), -1.0, device=device)
    start = time.time()
    if not deepspeed_engine:
        scaler = loss_scaler.scaler
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer.zero_grad(set_to_none=True)
    for data_iter, (samples, targets) in enumerate(data_loader):
        step = data_iter // update_freq
        if step >= steps_per_epoch:
            break
        it = epoch * steps_per_epoch + step
        if data_iter % update_freq == 0:
            set_schedules(optimizer, lr_schedule[it], wd_schedule[it])
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        update = (data_iter + 1) % update_freq == 0
        if deepspeed_engine:
            outputs, loss, grad_norm = deepspeed_step(model, criterion, samples, targets, input_dtype, update, device)
        else:
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                outputs = model(samples)
            loss = criterion(outputs.float(), targets)
            # accumulation micro-steps keep their gradients local; the update micro-step all-reduces them (DDP)
            with model.no_sync() if not update and hasattr(model, "no_sync") else contextlib.nullcontext():
                scaler.scale(loss / update_freq).backward()
            grad_norm = optimizer_step(optimizer, scaler, params, args.clip_grad) if update else None
        if update and model_ema is not None:
            model_ema.update(unwrapped)
        utils.mark_first_nonfinite(bad_step, loss, it)
        class_acc = None
        if mixup_fn is None:
            class_acc = (outputs.detach().argmax(-1) == targets).float().mean()
        logger.add(loss=loss.detach(), grad_norm=grad_norm, class_acc=class_acc)
        last = data_iter + 1 == steps_per_epoch * update_freq
        if update and (step % args.print_freq == 0 or last):
            if bad_step.item() >= 0:
                raise utils.NonFiniteLossError(
                    f"non-finite loss at step {int(bad_step.item())} (epoch {epoch}); lower --lr, set "
                    f"--clip_grad, or use --amp bf16/none")
            report_step(logger, optimizer, log_writer, epoch, step, steps_per_epoch, start)
    stats = logger.epoch_means()
    lrs = [g["lr"] for g in optimizer.param_groups]
    stats.update(lr=max(lrs), min_lr=min(lrs),
                 weight_decay=max((g["weight_decay"] for g in optimizer.param_groups), default=0.0))
    return stats


@torch.no_grad()
def evaluate(data_loader, model, device=None, amp_dtype=None, distributed=False, forward=None):
    """Top-1 / top-5 accuracy (in %) and mean cross-entropy over ``data_loader`` (fine-tuning and linear
    probing).

    Correct predictions are counted as integers (timm's ``accuracy`` per batch, times the batch size), so
    the result does not depend on how the set is split into batches or, with ``distributed`` (each rank
    holds a ``utils.ShardSampler`` shard), into processes: the counts are summed over ranks. The model runs
    on its parameters' device and in their dtype (``device`` is accepted for the release's call signature),
    under autocast when ``amp_dtype`` is set. ``forward(images) -> logits`` replaces ``model(images)`` (the
    linear probe runs its head outside the encoder's autocast).
    """
    model.eval()
    forward = forward or model
    criterion = nn.CrossEntropyLoss(reduction="sum")
    # inputs follow the model: an EMA kept on the CPU (--model_ema_force_cpu) is evaluated there
    param = next(model.parameters())
    device, input_dtype = param.device, param.dtype
    # loss sum, top-1 count, top-5 count, samples; float64 keeps the counts exact
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    for images, target in data_loader:
        images = images.to(device, non_blocking=True).to(input_dtype)
        target = torch.as_tensor(target).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            output = forward(images)
        output = output.float()
        acc1, acc5 = accuracy(output, target, topk=(1, 5))
        n = target.shape[0]
        totals += torch.stack([criterion(output, target).double(), torch.round(acc1.double() * n / 100),
                               torch.round(acc5.double() * n / 100), torch.tensor(float(n), device=device,
                                                                                  dtype=torch.float64)])
    if distributed and utils.is_dist():
        if torch.distributed.get_backend() == "nccl" and totals.device.type != "cuda":
            # NCCL reduces only CUDA tensors (an EMA kept on the CPU counts there)
            totals = totals.to(torch.device("cuda", torch.cuda.current_device()))
        torch.distributed.all_reduce(totals)
    loss_sum, correct1, correct5, count = totals.tolist()
    count = max(count, 1.0)
    return {"acc1": 100.0 * correct1 / count, "acc5": 100.0 * correct5 / count, "loss": loss_sum / count,
            "correct1": int(correct1), "num_images": int(count)}


def evaluate_epoch(args, epoch, val_loader, model, model_ema, device, eval_amp, best, log_writer):
    """The epoch's validation record (the model's and the EMA's accuracy) and whether it is the best so far
    (``best`` is updated)."""
    test_stats = evaluate(val_loader, model, device, eval_amp, args.dist_eval)
    record = {f"test_{k}": v for k, v in test_stats.items()}
    accs = [test_stats["acc1"]]
    if model_ema is not None:
        ema_stats = evaluate(val_loader, model_ema.module, device, eval_amp, args.dist_eval)
        record.update({f"test_ema_{k}": v for k, v in ema_stats.items()})
        accs.append(ema_stats["acc1"])
    is_best = False
    if max(accs) > best["acc1"] or best["epoch"] is None:
        best.update(acc1=max(accs), epoch=epoch)
        is_best = True
    utils.print0(f"epoch {epoch}: Acc@1 {test_stats['acc1']:.3f} Acc@5 {test_stats['acc5']:.3f} loss "
                 f"{test_stats['loss']:.4f} on {test_stats['num_images']} images"
                 + (f"  EMA Acc@1 {record['test_ema_acc1']:.3f}" if model_ema is not None else "")
                 + f"  (max {best['acc1']:.3f}, epoch {best['epoch']})")
    if log_writer is not None:
        for k in ("acc1", "acc5", "loss"):
            log_writer.add_scalar(f"perf/test_{k}", test_stats[k], epoch)
            if model_ema is not None:
                log_writer.add_scalar(f"perf/test_ema_{k}", record[f"test_ema_{k}"], epoch)
    return record, is_best


def evaluate_checkpoint(args, val_loader, model, model_ema, device, eval_amp, ds_dtype, ckpt, resume_path):
    """--eval: the accuracy of the resumed weights (and of their EMA), printed and returned."""
    model.to(ds_dtype if args.enable_deepspeed else torch.float32)
    results = {"checkpoint": resume_path, **evaluate(val_loader, model, device, eval_amp, args.dist_eval)}
    if model_ema is not None and "model_ema" in ckpt:
        ema = evaluate(val_loader, model_ema.module, device, eval_amp, args.dist_eval)
        results.update({f"ema_{k}": v for k, v in ema.items()})
    utils.print0(f"* Acc@1 {results['acc1']:.3f} Acc@5 {results['acc5']:.3f} loss {results['loss']:.3f} "
                 f"on {results['num_images']} images"
                 + (f"  (EMA: Acc@1 {results['ema_acc1']:.3f})" if "ema_acc1" in results else ""))
    utils.print0("eval: " + json.dumps(results))
    return results
