"""End-to-end tests of ``run_pretraining.py``, run as a subprocess on the CPU: outputs of a demo run,
two-process torchrun (gloo), bit-exact resume after a kill and a release-format checkpoint (the one-line errors
for bad input: tests/test_pretraining_bad_input.py).

All runs use a tiny configuration: bootmae_tiny at 32 px (a 2x2 patch grid, 3 patches masked), a 64-wide,
1-block decoder, the bundled demo photos, num_workers 0 unless a test is about workers.
"""
import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import modeling_bootmae  # noqa: E402
from engine_for_pretraining import WALL_CLOCK_STATS, ema_momentum_at  # noqa: E402
import checkpoints  # noqa: E402
import utils  # noqa: E402
from shared_helpers import clean_env, read_log  # noqa: E402

TIMEOUT = 300
COMMON = ["--model", "bootmae_tiny", "--input_size", "32", "--decoder_dim", "64", "--decoder_depth", "1",
          "--mask_num", "3", "--num_mask_patches", "2", "--min_mask_patches_per_block", "1",
          "--max_mask_patches_per_block", "2", "--warmup_epochs", "1", "--min_lr", "1e-6", "--num_workers", "0",
          "--print_freq", "100"]
# 32 demo items, batch 8: 4 steps per epoch, 3 epochs
DEMO = COMMON + ["--data_set", "demo", "--demo_size", "32", "--batch_size", "8", "--epochs", "3"]
EPOCHS = 3
# the reconstruction grid: 4 images x 5 panels of 32 px enlarged to 96, padding 2, under a 28 px label header
PNG_SIZE = (5 * (96 + 2) + 2, 28 + 4 * (96 + 2) + 2)
DONE_RE = re.compile(r"epoch (\d+) done: loss (\S+) \(pixel (\S+), feature (\S+)\) averaged over (\d+) process")


def run_cli(args, **env):
    return subprocess.run([sys.executable, "run_pretraining.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT, env=clean_env(**env))


def _ok(proc):
    assert proc.returncode == 0, \
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr


def _load(path):
    """As checkpoints.load_checkpoint does: weights only, argparse.Namespace the one allowed extra type."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _assert_states_equal(a, b, what):
    assert a.keys() == b.keys(), what
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


def _assert_optimizers_equal(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for pid in a["state"]:
        _assert_states_equal(a["state"][pid], b["state"][pid], f"optimizer state of param {pid}")


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """An uninterrupted 3-epoch demo run (also the reference for the resume test)."""
    out = str(tmp_path_factory.mktemp("run_a"))
    proc = run_cli(DEMO + ["--output_dir", out])
    _ok(proc)
    return out, proc


# -------------------------------------------------------------------------------------- 1. CPU end to end

def test_compiled_run_matches_eager(run_a, tmp_path):
    # --compile (the default on CUDA) compiles the model, the momentum encoder and the losses; one epoch of
    # it gives the eager run's losses
    eager_out, eager_proc = run_a
    assert "torch.compile:" not in eager_proc.stdout  # off by default on CPU
    out = str(tmp_path / "compiled")
    proc = run_cli(DEMO[:-1] + ["1", "--compile", "--output_dir", out], OMP_NUM_THREADS="1")
    _ok(proc)
    assert "torch.compile: model, target encoder and losses compiled" in proc.stdout
    compiled, eager = read_log(out)[0], read_log(eager_out)[0]
    for key in ("train_loss", "train_pixel_loss", "train_feature_loss"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-4), key


def test_cpu_demo_run_outputs(run_a):
    out, proc = run_a
    names = sorted(os.listdir(out))
    events = [n for n in names if n.startswith("events.out.tfevents.")]
    assert len(events) == 1
    assert sorted(set(names) - set(events)) == ["checkpoint-2.pth", "checkpoint-last.pth", "log.txt",
                                                "reconstruction.png"]   # no leftover .tmp files

    # log.txt: one JSON record per epoch
    log = read_log(out)
    assert [r["epoch"] for r in log] == list(range(EPOCHS))
    for r in log:
        for key in ("train_loss", "train_pixel_loss", "train_feature_loss", "train_grad_norm", "train_lr"):
            assert math.isfinite(r[key]), (key, r)
        assert r["train_steps"] == 4
        assert r["train_loss"] == pytest.approx(r["train_pixel_loss"] + r["train_feature_weight"]
                                                * r["train_feature_loss"], rel=1e-5)
        assert r["train_feature_weight"] == 1.0          # min(4 * (epoch + 1) / 3, 1)
        assert r["train_ema_momentum"] == pytest.approx(0.999 + 0.0009 * r["epoch"] / 100)
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    # the summary lines print the same numbers
    done = [DONE_RE.search(line) for line in proc.stdout.splitlines()]
    done = [m for m in done if m]
    assert [int(m.group(1)) for m in done] == list(range(EPOCHS))
    for m, r in zip(done, log):
        assert float(m.group(2)) == pytest.approx(r["train_loss"], abs=1e-4)
        assert m.group(5) == "1"

    # checkpoint: the release's layout, loadable with weights_only=True
    ckpt = _load(os.path.join(out, "checkpoint-last.pth"))
    assert {"model", "model_ema", "optimizer", "scaler", "epoch", "args"} <= set(ckpt)
    assert ckpt["epoch"] == EPOCHS - 1
    assert isinstance(ckpt["args"], dict)   # plain values: torch.load's defaults open the file
    assert ckpt["args"]["model"] == "bootmae_tiny" and ckpt["args"]["lr"] == 1.5e-4   # the base lr, as given
    assert checkpoints.load_checkpoint(os.path.join(out, "checkpoint-last.pth"))["epoch"] == EPOCHS - 1
    numbered = _load(os.path.join(out, "checkpoint-2.pth"))
    assert numbered["epoch"] == EPOCHS - 1
    _assert_states_equal(numbered["model"], ckpt["model"], "checkpoint-2 vs checkpoint-last")
    state = ckpt["model"]
    assert all(torch.isfinite(v).all() for v in state.values())
    # 4 steps per epoch: AdamW's step count
    assert all(s["step"].item() == 4 * EPOCHS for s in ckpt["optimizer"]["state"].values())

    # the weights moved away from their initialisation. The CLI seeds torch with --seed 0 before building
    # the model, so the initialisation is rebuilt here; the momentum encoder (0.999) must have moved far
    # less than the model, which also proves the rebuilt initialisation is the right one
    utils.seed_everything(0)
    init = modeling_bootmae.bootmae_tiny(img_size=32, drop_path_rate=0.1, decoder_dim=64,
                                         decoder_depth=1).state_dict()
    for name in ("blocks.0.attn.qkv.weight", "blocks.11.mlp.fc2.weight", "pixel_decoder.head.proj.weight",
                 "feature_decoder.head.weight"):
        moved = (state[name] - init[name]).norm().item()
        ema_moved = (ckpt["model_ema"][name] - init[name]).norm().item()
        assert moved > 0, name
        assert ema_moved < 0.1 * moved, (name, moved, ema_moved)

    # reconstruction.png: a real PNG, 4 rows (images) x 5 panels
    with Image.open(os.path.join(out, "reconstruction.png")) as img:
        assert img.format == "PNG"
        assert img.size == PNG_SIZE
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.std() > 10   # not a blank image

    # TensorBoard: per-step training scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(out, events[0]))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/pixel_loss", "train/feature_loss", "opt/lr", "opt/ema_momentum"} <= set(tags)
    # first and last step of every epoch (print_freq 100, 4 steps per epoch)
    assert [e.step for e in acc.Scalars("train/loss")] == [0, 3, 4, 7, 8, 11]
    assert all(math.isfinite(e.value) for e in acc.Scalars("train/loss"))


# -------------------------------------------------------------------------------------- 2. torchrun

WRAPPER = """
import os, sys
sys.path.insert(0, {root!r})
import torch
import run_pretraining, utils

# The CLI unchanged, except that after each checkpoint every rank also dumps its own model, momentum encoder
# and optimizer (the real checkpoint is rank 0's only), so that the test can compare the ranks.
_save = run_pretraining.save_checkpoint
def save_checkpoint(args, epoch, model, momentum_encoder, optimizer, loss_scaler):
    _save(args, epoch, model, momentum_encoder, optimizer, loss_scaler)
    torch.save({{"model": model.state_dict(), "model_ema": momentum_encoder.module.state_dict(),
                "optimizer": optimizer.state_dict()}},
               os.path.join(os.environ["RANK_DUMP_DIR"], f"rank{{utils.get_rank()}}-epoch{{epoch}}.pth"))
run_pretraining.save_checkpoint = save_checkpoint
run_pretraining.cli()
"""


def test_torchrun_two_cpu_processes(tmp_path):
    """``torch.distributed.run --nproc_per_node 2`` on the CPU (gloo): both ranks print the same averaged
    loss, rank 0 alone writes one set of outputs, and the ranks' models, momentum encoders and optimizer
    states are identical after training (the momentum encoders start from rank 0's broadcast weights)."""
    wrapper = tmp_path / "run_pretraining_dump_ranks.py"
    wrapper.write_text(WRAPPER.format(root=ROOT))
    out, dumps = tmp_path / "out", tmp_path / "ranks"
    dumps.mkdir()
    args = COMMON + ["--data_set", "demo", "--demo_size", "32", "--batch_size", "4", "--epochs", "2",
                     "--log_all_ranks", "--output_dir", str(out)]
    for attempt in range(2):   # the free port can be taken between choosing and binding it
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(utils.free_port()), str(wrapper), *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
                              env=clean_env(RANK_DUMP_DIR=str(dumps), OMP_NUM_THREADS="1"))
        if proc.returncode == 0 or "address already in use" not in (proc.stdout + proc.stderr).lower():
            break
    _ok(proc)
    assert "distributed: 2 processes, backend gloo" in proc.stdout
    assert "32 images, 4 batches of 4 per process" in proc.stdout   # the sampler splits the data
    assert "total batch 8" in proc.stdout

    lines = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"\[rank (\d)\] " + DONE_RE.pattern, line)
        if m:
            assert (m.group(1), m.group(2)) not in lines
            lines[(m.group(1), m.group(2))] = m.groups()[2:]
    assert sorted(lines) == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    for epoch in ("0", "1"):
        assert lines[("0", epoch)] == lines[("1", epoch)]
        assert lines[("0", epoch)][-1] == "2"
        assert math.isfinite(float(lines[("0", epoch)][0]))

    names = sorted(os.listdir(out))
    events = [n for n in names if n.startswith("events.out.tfevents.")]
    assert len(events) == 1
    assert sorted(set(names) - set(events)) == ["checkpoint-1.pth", "checkpoint-last.pth", "log.txt",
                                                "reconstruction.png"]
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1]   # written once, by rank 0
    for r in log:
        assert float(lines[("0", str(r["epoch"]))][0]) == pytest.approx(r["train_loss"], abs=1e-4)

    # the ranks stayed in sync, and the checkpoint is that common state
    for epoch in (0, 1):
        r0 = torch.load(dumps / f"rank0-epoch{epoch}.pth", weights_only=True)
        r1 = torch.load(dumps / f"rank1-epoch{epoch}.pth", weights_only=True)
        _assert_states_equal(r0["model"], r1["model"], f"model, epoch {epoch}")
        _assert_states_equal(r0["model_ema"], r1["model_ema"], f"momentum encoder, epoch {epoch}")
        _assert_optimizers_equal(r0["optimizer"], r1["optimizer"])
    ckpt = _load(out / "checkpoint-last.pth")
    _assert_states_equal(ckpt["model"], r0["model"], "checkpoint vs rank 0")
    _assert_states_equal(ckpt["model_ema"], r0["model_ema"], "checkpoint momentum encoder vs rank 0")


@pytest.mark.parametrize("argv, expected", [(["--local-rank=1"], 1), (["--local_rank", "3"], 3), ([], -1)])
def test_launch_style_local_rank_is_accepted(argv, expected):
    """``python -m torch.distributed.launch`` appends ``--local-rank=N``; the parser accepts it (the value
    used is LOCAL_RANK from the environment)."""
    import run_pretraining
    parser = argparse.ArgumentParser("test", parents=[run_pretraining.get_args_parser()])
    args = parser.parse_args(["--data_set", "demo"] + argv)
    assert args.local_rank == expected


# -------------------------------------------------------------------------------------- 3. resume

def _start_and_kill_after_first_checkpoint(cmd_args, out):
    proc = subprocess.Popen([sys.executable, "run_pretraining.py", *cmd_args], cwd=ROOT, env=clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = os.path.join(out, "checkpoint-last.pth")
    deadline = time.monotonic() + TIMEOUT
    try:
        # written via rename, so once it exists it is complete
        while not os.path.exists(last) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
    assert os.path.exists(last), "the run ended or timed out without writing checkpoint-last.pth"
    return _load(last)["epoch"]


def test_resume_after_kill_is_bit_exact(run_a, tmp_path):
    """Kill a run once its first checkpoint exists, rerun the same command: it resumes from
    checkpoint-last.pth and ends with the same model, momentum encoder and optimizer state, bit for bit,
    as the uninterrupted run (every epoch reseeds python/numpy/torch from seed, epoch and rank, so data
    order, crops, masks and drop-path noise do not depend on where the run started)."""
    a_out, _ = run_a
    out = str(tmp_path / "run_b")
    cmd = DEMO + ["--output_dir", out]
    for _ in range(3):
        killed_at = _start_and_kill_after_first_checkpoint(cmd, out)
        if killed_at < EPOCHS - 1:
            break
        shutil.rmtree(out)   # it finished before the kill landed: try again
    assert killed_at < EPOCHS - 1

    proc = run_cli(cmd)
    _ok(proc)
    start = killed_at + 1
    assert f"resume: {out}/checkpoint-last.pth (our format), continuing at epoch {start}" in proc.stdout
    assert f"training epochs {start}..{EPOCHS - 1}" in proc.stdout
    assert "AdamW moments restart" not in proc.stdout

    a = _load(os.path.join(a_out, "checkpoint-last.pth"))
    b = _load(os.path.join(out, "checkpoint-last.pth"))
    assert a["epoch"] == b["epoch"] == EPOCHS - 1
    _assert_states_equal(a["model"], b["model"], "model")
    _assert_states_equal(a["model_ema"], b["model_ema"], "momentum encoder")
    _assert_optimizers_equal(a["optimizer"], b["optimizer"])
    assert os.path.exists(os.path.join(out, f"checkpoint-{EPOCHS - 1}.pth"))

    # the schedules continued: the resumed epochs have the uninterrupted run's lr, loss, momentum
    a_log = {r["epoch"]: r for r in read_log(a_out)}
    b_log = read_log(out)
    b_epochs = [r["epoch"] for r in b_log]
    assert b_epochs[-(EPOCHS - start):] == list(range(start, EPOCHS))   # written after the resume
    assert len(set(b_epochs)) == len(b_epochs)
    wall_clock = {f"train_{k}" for k in WALL_CLOCK_STATS}   # images/s and data wait: not reproducible
    for r in b_log:
        assert set(r) == set(a_log[r["epoch"]]) and wall_clock <= set(r)
        assert {k: v for k, v in r.items() if k not in wall_clock} == \
               {k: v for k, v in a_log[r["epoch"]].items() if k not in wall_clock}


# -------------------------------------------------------------------------------------- 4. release format

def test_release_format_checkpoint_resumes(tmp_path):
    """A checkpoint in the authors' key names (model and model_ema, epoch 0, args, and an optimizer state
    whose parameter groups are the release's, not ours) resumes at epoch 1: weights and momentum encoder
    are loaded, the optimizer mismatch is reported and AdamW's moments restart."""
    kw = dict(img_size=32, decoder_dim=64, decoder_depth=1)
    torch.manual_seed(123)
    model = modeling_bootmae.bootmae_tiny(**kw)
    torch.manual_seed(456)
    ema = modeling_bootmae.bootmae_tiny(**kw)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)   # one group: not our grouping
    sum(p.sum() for p in model.parameters()).backward()
    opt.step()
    release_model = modeling_bootmae.to_release_state_dict(model)
    assert modeling_bootmae.is_release_state_dict(release_model)
    assert {"mask_token_1", "lm_head.proj.weight", "decode_blocks.0.attn.qkv.weight", "pos_embed"} <= set(release_model)
    path = str(tmp_path / "release.pth")
    torch.save({"model": release_model, "model_ema": modeling_bootmae.to_release_state_dict(ema),
                "optimizer": opt.state_dict(), "epoch": 0,
                "args": argparse.Namespace(model="pretrain_bootmae_tiny_patch16_224", lr=1.5e-4)}, path)
    out = str(tmp_path / "out")

    proc = run_cli(COMMON + ["--data_set", "demo", "--demo_size", "32", "--batch_size", "8", "--epochs", "2",
                             "--resume", path, "--output_dir", out])
    _ok(proc)
    assert f"resume: {path} (release format), continuing at epoch 1" in proc.stdout
    assert re.search(r"optimizer state in .* does not match this model's parameter groups \(release ordering\); "
                     r"AdamW moments restart", proc.stdout)
    assert "training epochs 1..1" in proc.stdout
    assert [r["epoch"] for r in read_log(out)] == [1]

    ckpt = _load(os.path.join(out, "checkpoint-last.pth"))
    assert ckpt["epoch"] == 1
    assert all(s["step"].item() == 4 for s in ckpt["optimizer"]["state"].values())   # fresh moments
    # 4 AdamW steps at lr <= 5e-6 move each weight by at most ~2e-5: the result is the loaded model
    ours, ours_ema = model.state_dict(), ema.state_dict()
    drift = max((ckpt["model"][k] - ours[k]).abs().max().item() for k in ours)
    assert 0 < drift < 1e-4
    # the momentum encoder is the loaded model_ema (not a copy of the model), moved 4 times towards the
    # (nearly unchanged) model with epoch 1's momentum
    d4 = ema_momentum_at(1) ** 4
    assert max((ours_ema[k] - ours[k]).abs().max().item() for k in ours) > 0.1
    for k in ours:
        torch.testing.assert_close(ckpt["model_ema"][k], d4 * ours_ema[k] + (1 - d4) * ours[k], atol=1e-6, rtol=0)
