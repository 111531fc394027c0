"""Fine-tuning and linear probing learn, and their step bookkeeping is right.

On four colour classes (test_linprobe.make_npz: 40 px images, pixel noise) that even a randomly initialised
tiny ViT separates: fine-tuning (run_class_finetuning.main) and linear probing (main_linprobe.main) lower
the loss, reach a test accuracy far above the 25 % of chance (ACCURACY_BAR) and move the head; fine-tuning
with --update_freq 2 steps the lr along BEiT's schedule once per optimizer step, and its model EMA is the EMA
at --model_ema_decay of the online weights after each optimizer step, computed here from optimizer step
hooks. Fine-tuning's --update_freq 2 at batch B trains exactly as --update_freq 1 at 2B
(engine_for_finetuning.train_one_epoch on fixed tensors). Linear probing's lr is blr x (processes x batch x
--accum_iter) / 256 on the MAE schedule, with one optimizer step per --accum_iter batches.
"""
import argparse
import copy
import math

import numpy as np
import pytest
import torch
from timm.loss import LabelSmoothingCrossEntropy
from timm.utils import ModelEmaV3

import checkpoints
import main_linprobe
import modeling_bootmae as mb
import run_class_finetuning as rcf
import utils
from engine_for_finetuning import train_one_epoch
from optim_factory import adamw, finetune_param_groups
from shared_helpers import read_log
from test_finetune import _in_process, one_thread  # noqa: F401  (one_thread: autouse fixture)
from test_linprobe import common, make_npz, parse, probe_data  # noqa: F401  (probe_data: fixture)

# four colour classes: chance is 25 %; every test below asks for at least this top-1 accuracy
ACCURACY_BAR = 90.0


class StepRecorder:
    """Global optimizer step hooks: each step's (lr, weight decay) of every group; with ``snapshot(optimizer)``
    (a dict or list of tensors) the snapshot before the first step and after the last one, and with
    ``ema_decay`` an EMA of the snapshots computed here: ema <- decay x ema + (1 - decay) x snapshot after each
    optimizer step, starting from the snapshot before the first."""

    def __init__(self, snapshot=None, ema_decay=None):
        self.snapshot, self.ema_decay = snapshot, ema_decay
        self.groups = []
        self.before_first = self.last = self.ema = None

    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
        self.handles = [register_optimizer_step_pre_hook(self._pre), register_optimizer_step_post_hook(self._post)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _pre(self, optimizer, args, kwargs):
        self.groups.append([(g["lr"], g["weight_decay"]) for g in optimizer.param_groups])
        if self.before_first is None and self.snapshot is not None:
            self.before_first = self.snapshot(optimizer)
            if self.ema_decay is not None:
                self.ema = {k: v.clone() for k, v in self.before_first.items()}

    def _post(self, optimizer, args, kwargs):
        if self.snapshot is not None:
            self.last = self.snapshot(optimizer)
        if self.ema is not None:
            for k, v in self.ema.items():
                if v.is_floating_point():
                    self.ema[k] = self.ema_decay * v + (1 - self.ema_decay) * self.last[k]

    @property
    def steps(self):
        return len(self.groups)


def state_copy(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_states_close(actual, expected, what, **tol):
    assert actual.keys() == expected.keys(), what
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], msg=lambda m: f"{what}, {k}: {m}", **tol)


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    make_npz(str(root))  # 64 training and 32 test images, 16 / 8 per class
    return root


# ---------------------------------------------------------------------------------------------------------
# fine-tuning

def test_finetuning_learns_and_its_ema_is_the_ema_of_the_steps(colours, tmp_path, monkeypatch, capsys):
    """3 epochs of 4 optimizer steps of 2 x 8 images (--update_freq 2) from a random encoder, no augmentation
    beyond crop and flip, EMA decay 0.9."""
    decay, epochs = 0.9, 3
    built = []

    def create_model(*args, **kwargs):
        built.append(rcf_create_model(*args, **kwargs))
        return built[-1]

    rcf_create_model = rcf.create_model
    monkeypatch.setattr(rcf, "create_model", create_model)
    out = tmp_path / "ft"
    argv = ["--model", "bootmae_tiny_patch16_224", "--input_size", "32", "--patch_size", "8", "--data_set", "npz",
            "--data_path", str(colours), "--output_dir", str(out), "--batch_size", "8", "--update_freq", "2",
            "--num_workers", "0", "--epochs", str(epochs), "--lr", "2e-3", "--warmup_epochs", "1", "--drop_path", "0",
            "--aa", "none", "--color_jitter", "0", "--reprob", "0", "--smoothing", "0", "--model_ema",
            "--model_ema_decay", str(decay), "--save_ckpt_freq", "0", "--print_freq", "100", "--no_auto_resume"]
    with StepRecorder(lambda _: state_copy(built[0]), ema_decay=decay) as rec:
        _in_process(argv, capsys)
    log = read_log(out)
    # the lr of the head's group (layer scale 1, the largest) at each optimizer step, as BEiT's scheduler gives it
    # over 12 steps: a 4-step linear warm-up from 0 that ends on the peak, then a half cosine to --min_lr 1e-6
    peak, low = 2e-3, 1e-6
    expected = [peak * k / 3 for k in range(4)] + [low + (peak - low) * (1 + math.cos(math.pi * k / 8)) / 2
                                                   for k in range(8)]
    assert rec.steps == epochs * 64 // 16
    np.testing.assert_allclose([max(lr for lr, _ in groups) for groups in rec.groups], expected, rtol=1e-12)
    # loss falls, the classes are told apart
    assert log[-1]["train_loss"] < 0.5 * log[0]["train_loss"], [r["train_loss"] for r in log]
    assert log[-1]["test_acc1"] >= ACCURACY_BAR, [r["test_acc1"] for r in log]
    assert log[-1]["test_loss"] < 0.5 * math.log(4)
    ckpt = checkpoints.load_checkpoint(str(out / "checkpoint-last.pth"))
    assert_states_close(ckpt["model"], rec.last, "online weights after the last step", rtol=0, atol=0)
    # the head moved far from its 0.001-scaled initialisation (450 x its norm in this run)
    head0, head = rec.before_first["head.weight"], ckpt["model"]["head.weight"]
    assert (head - head0).norm() > 100 * head0.norm()
    # the EMA: decay 0.9 from the initial weights over the online weights after each of the 12 steps. main builds
    # timm's ModelEmaV3 without warm-up (use_warmup=False) and updates it without a step count, so every update,
    # the first included, uses the constant --model_ema_decay
    assert_states_close(ckpt["model_ema"], rec.ema, f"model EMA at decay {decay}")


def _accumulation_run(model, batches, update_freq, epochs, lr_schedule, wd_schedule, decay):
    """``epochs`` of train_one_epoch over ``batches`` with AdamW on layer-decay groups and an EMA, as main
    builds them; returns (model, EMA, optimizer, StepRecorder with the EMA at ``decay`` computed here)."""
    model = copy.deepcopy(model)
    optimizer = adamw(finetune_param_groups(model, 0.05, 0.75), 1.0)
    ema = ModelEmaV3(model, decay=decay)
    args = argparse.Namespace(update_freq=update_freq, clip_grad=None, print_freq=1)
    criterion = LabelSmoothingCrossEntropy(smoothing=0.1)
    with StepRecorder(lambda _: state_copy(model), ema_decay=decay) as rec:
        for epoch in range(epochs):
            train_one_epoch(model, criterion, batches, optimizer, torch.device("cpu"), epoch, args, lr_schedule,
                            wd_schedule, loss_scaler=utils.LossScaler("cpu", fp16=False), model_ema=ema)
    return model, ema, optimizer, rec


def test_finetuning_update_freq_2_equals_the_double_batch():
    """--update_freq 2 at batch 4 against --update_freq 1 at batch 8 over the same 32 images, 2 epochs of 4
    optimizer steps: the same lr and weight decay at each step (schedules whose every entry differs), the same
    AdamW step count, parameters and EMA (one update per optimizer step) to float tolerance."""
    torch.manual_seed(0)
    # float64: in float32, AdamW's normalised update turns the rounding differences of gradients that nearly
    # cancel (a patch-embedding bias) into parameter differences of 2e-6; in float64 the two runs agree to 1e-14
    model = mb.VisionTransformerForClassification(img_size=16, patch_size=4, embed_dim=48, depth=2, num_heads=3,
                                                  num_classes=4, drop_path_rate=0.0, init_scale=1.0).double()
    images, labels = torch.randn(32, 3, 16, 16, dtype=torch.float64), torch.arange(32) % 4
    epochs, steps = 2, 4
    lr_schedule = np.linspace(1e-3, 2e-3, epochs * steps)
    wd_schedule = np.linspace(0.05, 0.01, epochs * steps)
    runs = {}
    for update_freq, batch in ((1, 8), (2, 4)):
        batches = list(zip(images.split(batch), labels.split(batch)))
        runs[update_freq] = _accumulation_run(model, batches, update_freq, epochs, lr_schedule, wd_schedule, 0.9)
    (m1, ema1, opt1, rec1), (m2, ema2, opt2, rec2) = runs[1], runs[2]
    assert rec1.steps == rec2.steps == epochs * steps
    # step k of both runs: lr_schedule[k] x the group's layer-decay scale, wd_schedule[k] where weights decay
    expected = [[(lr * g["lr_scale"], wd if g["weight_decay"] > 0 else 0.0) for g in opt1.param_groups]
                for lr, wd in zip(lr_schedule, wd_schedule)]
    assert rec1.groups == rec2.groups == expected
    for opt in (opt1, opt2):
        assert [float(s["step"]) for s in opt.state.values()] == [epochs * steps] * len(opt.state)
    # each step moves a parameter by about its lr (1e-3 and more); float64 rounding is below 1e-14
    assert_states_close(state_copy(m2), state_copy(m1), "parameters", rtol=0, atol=1e-12)
    assert_states_close(state_copy(ema2.module), state_copy(ema1.module), "EMA", rtol=0, atol=1e-12)
    for rec, ema in ((rec1, ema1), (rec2, ema2)):
        assert_states_close(state_copy(ema.module), rec.ema, "EMA vs the EMA of the steps", rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# linear probing

def head_tensors(optimizer):
    """The probe's trained tensors, Linear weight then bias (engine_for_linprobe.build_optimizer's two groups)."""
    return [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]


def test_finetuning_non_finite_loss_names_the_first_bad_step():
    """A NaN image in the second of three batches: the guard, read only at the last step (print_freq 100),
    names the first non-finite step, epoch 1 x 3 + 1 = 4, in one line with what to change."""
    torch.manual_seed(0)
    model = mb.VisionTransformerForClassification(img_size=16, patch_size=4, embed_dim=48, depth=2, num_heads=3,
                                                  num_classes=4, drop_path_rate=0.0)
    images, labels = torch.randn(12, 3, 16, 16), torch.arange(12) % 4
    images[5] = float("nan")
    batches = list(zip(images.split(4), labels.split(4)))
    optimizer = adamw(finetune_param_groups(model, 0.05, 0.75), 1.0)
    args = argparse.Namespace(update_freq=1, clip_grad=None, print_freq=100)
    with pytest.raises(utils.NonFiniteLossError) as info:
        train_one_epoch(model, torch.nn.CrossEntropyLoss(), batches, optimizer, torch.device("cpu"), 1, args,
                        np.full(6, 1e-3), np.full(6, 0.05), loss_scaler=utils.LossScaler("cpu", fp16=False))
    msg = str(info.value)
    assert msg.startswith("non-finite loss at step 4 (epoch 1);") and "--lr" in msg and "\n" not in msg


def test_linear_probe_learns(probe_data, tmp_path):
    """6 epochs of 8 steps on a random 4-block encoder's mean-pooled features. blr 320 at batch 8 is lr 10, which
    LARS's trust ratio (0.001 ||w|| / ||g||) turns into steps of 1 % of the weight's norm (before momentum)."""
    out = tmp_path / "probe"
    args = parse(common(probe_data, "--finetune", str(probe_data / "pretrained.pth"), "--global_pool", "--depth", "4",
                        "--batch_size", "8", "--epochs", "6", "--warmup_epochs", "1", "--blr", "320",
                        "--output_dir", str(out), "--print_freq", "100"))
    with StepRecorder(head_tensors) as rec:
        main_linprobe.main(args)
    log = read_log(out)
    assert rec.steps == 6 * 64 // 8
    assert log[-1]["train_loss"] < 0.5 * log[0]["train_loss"], [r["train_loss"] for r in log]
    assert log[-1]["test_acc1"] >= ACCURACY_BAR, [r["test_acc1"] for r in log]
    assert log[-1]["test_loss"] < 0.5 * math.log(4)
    ckpt = checkpoints.load_checkpoint(str(out / "checkpoint-last.pth"))
    weight0, weight = rec.before_first[0], ckpt["model"]["head.1.weight"]
    assert torch.equal(weight, rec.last[0])
    assert (weight - weight0).norm() > 0.5 * weight0.norm()  # 1.9 x in this run


def test_linear_probe_lr_scaling_and_accumulation(probe_data, monkeypatch):
    """Seen from rank 0 of 2 processes (the world size the entry point reads is 2; its sampler then gives this
    rank 32 of the 64 images): batch 8 x --accum_iter 2 x 2 processes = 32, so --blr 0.2 is lr 0.025.
    4 batches per epoch make 2 optimizer steps, whose lrs follow MAE's schedule at the fractional epoch of
    their first batch: warm-up over epoch 0 (0, lr / 2), then the cosine over epoch 1 (lr, lr / 2)."""
    monkeypatch.setattr(utils, "get_world_size", lambda: 2)
    args = parse(common(probe_data, "--finetune", str(probe_data / "pretrained.pth"), "--depth", "2",
                        "--batch_size", "8", "--accum_iter", "2", "--epochs", "2", "--warmup_epochs", "1",
                        "--blr", "0.2"))
    with StepRecorder() as rec:
        main_linprobe.main(args)
    lr = 0.2 * 8 * 2 * 2 / 256
    assert args.lr == pytest.approx(lr, rel=1e-12)
    expected = [0.0, lr / 2, lr, lr / 2]
    assert rec.steps == len(expected)
    for step, (groups, want) in enumerate(zip(rec.groups, expected)):
        assert [g[0] for g in groups] == pytest.approx([want, want], rel=1e-12, abs=1e-15), step
