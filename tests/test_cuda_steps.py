"""One pretraining and one fine-tuning step on a CUDA GPU with the GPU defaults: --amp and --compile left unset
resolve to bf16 autocast and torch.compile there. The real entry points run as subprocesses (as a user
launches them) on a tiny model: bootmae_tiny at 32 px (a 2x2 patch grid), one batch of 8 per run.

The GPU tests are skipped without CUDA; their command lines are parsed and checked by the entry points'
own checks everywhere (test_gpu_command_lines_are_valid), so a renamed flag is caught on a CPU-only machine.
"""
import json
import math
import os

import pytest
import torch

import checkpoints
import run_class_finetuning as rcf
import run_pretraining
from shared_helpers import read_log
from test_finetune import _run as run_finetuning
from test_linprobe import make_npz, make_pretrained
from test_pretraining_e2e import COMMON, _ok, run_cli

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: one bf16 + torch.compile pretraining and fine-tuning step")

# one step: 8 demo images, batch 8, one epoch; warm-up off so that the step uses the full lr
PRETRAIN = COMMON + ["--data_set", "demo", "--demo_size", "8", "--batch_size", "8", "--epochs", "1",
                     "--warmup_epochs", "0", "--save_ckpt_freq", "1"]


def finetune_argv(data, pretrained, out):
    """One step of 8 images (make_npz's colour classes), from the pretraining checkpoint, with a model EMA."""
    return ["--model", "bootmae_tiny_patch16_224", "--input_size", "32", "--data_set", "npz", "--data_path", data,
            "--finetune", pretrained, "--output_dir", out, "--batch_size", "8", "--epochs", "1",
            "--warmup_epochs", "0", "--num_workers", "0", "--model_ema", "--model_ema_decay", "0.9",
            "--save_ckpt_freq", "0", "--print_freq", "1"]


def test_gpu_command_lines_are_valid(tmp_path):
    """The command lines below pass each entry point's parser and checks (no GPU needed)."""
    args = run_pretraining.get_args_parser().parse_args(PRETRAIN + ["--output_dir", str(tmp_path / "pre")])
    run_pretraining.check_args(args)
    assert (args.amp, args.compile, args.epochs, args.batch_size) == (None, None, 1, 8)
    pretrained = tmp_path / "pretrained.pth"
    make_pretrained(str(pretrained))
    args = rcf.get_args_parser().parse_args(finetune_argv(str(tmp_path), str(pretrained), str(tmp_path / "ft")))
    rcf.check_args(args)
    assert (args.amp, args.compile, args.patch_size, args.model_ema) == (None, None, 16, True)


def printed_args(stdout):
    """The resolved flags the entry point prints as its ``args:`` line."""
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("args: "))[len("args: "):])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """The pretraining step, run once for both tests: (output folder, its stdout)."""
    out = str(tmp_path_factory.mktemp("cuda_pretrain"))
    proc = run_cli(PRETRAIN + ["--output_dir", out])
    _ok(proc)
    return out, proc.stdout


def check_run(stdout, out, compiled, losses, checkpoint):
    """What a GPU run must show: the GPU defaults resolved to bf16 and compile, finite logged ``losses``, and a
    ``checkpoint`` with model, model EMA and optimizer whose weights are finite. Returns (record, checkpoint)."""
    assert compiled in stdout
    resolved = printed_args(stdout)
    assert (resolved["amp"], resolved["compile"]) == ("bf16", True), resolved
    (record,) = read_log(out)
    for key in losses:
        assert math.isfinite(record[key]), (key, record)
    ckpt = checkpoints.load_checkpoint(os.path.join(out, checkpoint))
    assert {"model", "model_ema", "optimizer"} <= set(ckpt)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    return record, ckpt


@needs_cuda
def test_pretraining_step_bf16_compiled(pretrained):
    out, stdout = pretrained
    _, ckpt = check_run(stdout, out, "torch.compile: model, target encoder and losses compiled",
                        ("train_loss", "train_pixel_loss", "train_feature_loss"), "checkpoint-0.pth")
    assert ckpt["epoch"] == 0 and os.path.isfile(os.path.join(out, "checkpoint-last.pth"))


@needs_cuda
def test_finetuning_step_bf16_compiled(pretrained, tmp_path):
    make_npz(str(tmp_path), n_train=8, n_test=8)
    out = str(tmp_path / "ft")
    stdout = run_finetuning(finetune_argv(str(tmp_path), os.path.join(pretrained[0], "checkpoint-0.pth"), out))
    record, _ = check_run(stdout, out, "torch.compile: training forward compiled",
                          ("train_loss", "test_loss", "test_ema_loss"), "checkpoint-last.pth")
    assert record["test_num_images"] == 8
