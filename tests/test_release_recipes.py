"""The release's published command lines mean the same runs here, and so do the shipped scripts.

The six command lines of the authors' ``scripts/{pretrain,finetune,linear}`` (ViT-B and ViT-L) are written
below as literals, flags as the release wrote them (placeholder paths). Each is parsed by our parser and its
effective values (the flags that change the run, the total batch, the absolute lr, the momentum schedule) are
compared with the values the release ran with: its flags plus its parsers' defaults, also literals here.
Our ``scripts/`` are expanded by bash (``PYTHON``/``srun`` replaced by a stub that prints its arguments) and
must give the same values for the same job. Then ``run_pretraining.py --mae``: what the preset parses to, what
it builds, and a one-epoch run.
"""
import argparse
import math
import os
import shlex
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import main_linprobe  # noqa: E402
import run_class_finetuning  # noqa: E402
import run_pretraining  # noqa: E402
from engine_for_pretraining import ema_momentum_at, normalized_pixel_target  # noqa: E402
from pretrained import parse_model_size  # noqa: E402
from target_encoders import build_target_encoder  # noqa: E402

# ------------------------------------------------------------------------------------------------------------
# the release's command lines, as written in its scripts (paths are placeholders; torch.distributed.launch
# appends --local_rank). Its pretraining scripts ran at the paper's batch of 4096: 16 GPUs for ViT-B, 32 for
# ViT-L; fine-tuning and linear probing on 8.

RELEASE = {
    "pretrain_base": ("pretrain", 16, """--data_path DATASET/imagenet/ --output_dir OUTPUT/pretrain --model bootmae_base
        --model_ema --model_ema_decay 0.999 --model_ema_dynamic --batch_size 256 --lr 1.5e-4 --min_lr 1e-4
        --epochs 801 --warmup_epochs 40 --update_freq 1 --mask_num 147 --feature_weight 1 --weight_mask
        --local_rank=0"""),
    "pretrain_large": ("pretrain", 32, """--data_path DATASET/imagenet/ --output_dir OUTPUT/pretrain
        --model bootmae_large --model_ema --model_ema_decay 0.999 --batch_size 128 --lr 1.5e-4
        --epochs 801 --warmup_epochs 40 --update_freq 1 --mask_num 147 --feature_weight 1 --weight_mask
        --local_rank=0"""),
    "finetune_base": ("finetune", 8, """--model bootmae_base_patch16_224 --data_path DATASET/imagenet
        --input_size 224 --finetune OUTPUT/checkpoint-799.pth --num_workers 8 --output_dir OUTPUT/finetune
        --batch_size 256 --lr 5e-3 --update_freq 1 --warmup_epochs 20 --epochs 100 --layer_decay 0.6
        --backbone_decay 1 --drop_path 0.1 --abs_pos_emb --disable_rel_pos_bias --weight_decay 0.05 --mixup 0.8
        --cutmix 1.0 --nb_classes 1000 --model_key model --enable_deepspeed --model_ema --model_ema_decay 0.9998
        --local_rank=0"""),
    "finetune_large": ("finetune", 8, """--model bootmae_large_patch16_224 --data_path DATASET/imagenet
        --input_size 224 --finetune OUTPUT/checkpoint-799.pth --num_workers 8 --output_dir OUTPUT/finetune
        --batch_size 128 --lr 1.5e-3 --update_freq 1 --warmup_epochs 5 --epochs 50 --layer_decay 0.75
        --backbone_decay 1 --drop_path 0.1 --weight_decay 0.05 --mixup 0.8 --cutmix 1.0 --nb_classes 1000
        --model_key model --enable_deepspeed --model_ema --model_ema_decay 0.9998 --local_rank=0"""),
    "linear_base": ("linear", 8, """--batch_size 1024 --accum_iter 2 --data_path DATASET/imagenet/
        --output_dir OUTPUT/linear --model base_patch16_224 --depth 10 --finetune OUTPUT/checkpoint-799.pth
        --global_pool --epochs 90 --blr 0.1 --weight_decay 0.0 --dist_eval --local_rank=0"""),
    "linear_large": ("linear", 8, """--batch_size 1024 --accum_iter 2 --data_path DATASET/imagenet/
        --output_dir OUTPUT/linear --model large_patch16_224 --depth 18 --finetune OUTPUT/checkpoint-799.pth
        --global_pool --epochs 50 --blr 0.07 --weight_decay 0.0 --dist_eval --local_rank=0"""),
}

# The defaults of the release's three parsers (run_pretraining.py, run_class_finetuning.py, main_linprobe.py)
# for every flag our parsers share with them. Paths and launcher flags are left out.
RELEASE_DEFAULTS = {
    "pretrain": dict(
        batch_size=128, epochs=800, update_freq=1, save_ckpt_freq=20, model="bootmae_base", num_mask_patches=120,
        max_mask_patches_per_block=60, min_mask_patches_per_block=16, input_size=224, drop_path=0.0,
        clip_grad=None, weight_decay=0.05, weight_decay_end=None, lr=5e-4, warmup_lr=1e-6, min_lr=1e-5,
        warmup_epochs=5, imagenet_default_mean_and_std=False, log_dir=None, seed=0, resume="", auto_resume=True,
        start_epoch=0, num_workers=10, pin_mem=True, local_rank=-1, feature_weight=0.0, mask_num=147,
        weight_mask=False, model_ema=False, model_ema_decay=0.999, model_ema_dynamic=False, min_crop_scale=0.2),
    "finetune": dict(
        batch_size=64, epochs=30, update_freq=1, save_ckpt_freq=5, model="deit_base_patch16_224", rel_pos_bias=True,
        abs_pos_emb=False, layer_scale_init_value=1e-5, input_size=224, drop=0.0, attn_drop_rate=0.0, drop_path=0.1,
        disable_eval_during_finetuning=False, model_ema=False, model_ema_decay=0.9999, model_ema_force_cpu=False,
        opt="adamw", opt_eps=1e-8, opt_betas=None, clip_grad=None, weight_decay=0.05, weight_decay_end=None, lr=5e-4,
        layer_decay=0.9, warmup_lr=1e-6, min_lr=1e-6, warmup_epochs=5, warmup_steps=-1, color_jitter=0.4,
        aa="rand-m9-mstd0.5-inc1", smoothing=0.1, train_interpolation="bicubic", crop_pct=None, reprob=0.25,
        remode="pixel", recount=1, resplit=False, mixup=0.0, cutmix=0.0, cutmix_minmax=None, mixup_prob=1.0,
        mixup_switch_prob=0.5, mixup_mode="batch", finetune="", model_key="model|module", init_scale=0.001,
        use_mean_pooling=True, nb_classes=0, imagenet_default_mean_and_std=False, data_set="IMNET", output_dir="",
        log_dir=None, seed=0, resume="", auto_resume=True, save_ckpt=True, start_epoch=0, eval=False,
        dist_eval=False, num_workers=10, pin_mem=True, local_rank=-1, enable_deepspeed=False, eval_all=False,
        backbone_decay=1.0),
    "linear": dict(
        batch_size=512, epochs=90, accum_iter=1, model="vit_large_patch16", weight_decay=0.0, lr=None, blr=0.1,
        min_lr=0.0, warmup_epochs=10, finetune="", global_pool=False, nb_classes=1000, output_dir="./output_dir",
        log_dir=None, seed=0, resume="", start_epoch=0, eval=False, dist_eval=False, num_workers=10, pin_mem=True,
        local_rank=-1, depth=12, model_key="model"),
}

# Our defaults that differ from the release's parser, each deliberately: a flag that every release command line
# of that entry point sets ("set by the release's lines": the default keeps the paper's recipe, so a bare
# command trains it), or one whose value the release never reads.
DELIBERATE = {
    "pretrain": {"batch_size": "set", "lr": "set", "warmup_epochs": "set", "feature_weight": "set", "model_ema": "set",
                 "warmup_lr": "unread: the release's warm-up starts at 0 whatever --warmup_lr says"},
    "finetune": {"model": "set",
                 "rel_pos_bias": "unread: the release's fine-tuning model has no relative position bias",
                 "layer_scale_init_value": "unread: the release's fine-tuning blocks have no layer scale",
                 "warmup_lr": "unread: the release's warm-up starts at 0 whatever --warmup_lr says",
                 "data_set": "alias: the release's IMNET is our image_folder"},
    "linear": {"model": "set", "depth": "set", "global_pool": "None = the cls token unless --eval reads a checkpoint",
               "nb_classes": "None = the data's classes (1000 for ImageNet)", "output_dir": "set",
               "model_key": "tries 'model' first, as the release reads"},
}

# The effective values of the release's runs: its command line plus its parser's defaults. Derived values:
# total batch (processes x batch x accumulation), absolute peak lr.
PRETRAIN_COMMON = dict(
    drop_path=0.0, lr=1.5e-4, warmup_lr=0.0, warmup_epochs=40, epochs=801, weight_decay=0.05, weight_decay_end=None,
    clip_grad=None, mask_type="release", mask_num=147, num_mask_patches=120, min_mask_patches_per_block=16,
    max_mask_patches_per_block=60, min_crop_scale=0.2, input_size=224, patch_size=None, seed=0, feature_weight=1.0,
    feature_ramp=0.25, pixel_weight=1.0, weight_mask=True, pixel_norm="channel", context="both", decoder_dim=None,
    decoder_depth=None, model_ema=True, model_ema_decay=0.999, model_ema_warmup_epochs=100,
    model_ema_dynamic_epochs=400, target_encoder="ema", target_fraction=1.0, imagenet_default_mean_and_std=False,
    total_batch=4096, abs_lr=2.4e-3)
FINETUNE_COMMON = dict(
    input_size=224, drop_path=0.1, drop=0.0, attn_drop_rate=0.0, min_lr=1e-6, warmup_lr=0.0, warmup_steps=-1,
    backbone_decay=1.0, weight_decay=0.05, weight_decay_end=None, opt_eps=1e-8, opt_betas=None, clip_grad=None,
    aa="rand-m9-mstd0.5-inc1", color_jitter=0.4, train_interpolation="bicubic", reprob=0.25, remode="pixel",
    recount=1, mixup=0.8, cutmix=1.0, cutmix_minmax=None, mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode="batch",
    smoothing=0.1, model_ema=True, model_ema_decay=0.9998, init_scale=0.001, use_mean_pooling=True,
    model_key="model", nb_classes=1000, crop_pct=None, seed=0, enable_deepspeed=True,
    imagenet_default_mean_and_std=False)
LINEAR_COMMON = dict(accum_iter=2, global_pool=True, lr=None, min_lr=0.0, warmup_epochs=10, weight_decay=0.0,
                     momentum=0.9, input_size=224, seed=0, dist_eval=True, model_key="model", total_batch=16384)
EXPECTED = {
    "pretrain_base": dict(PRETRAIN_COMMON, model="bootmae_base", min_lr=1e-4, model_ema_dynamic=True),
    "pretrain_large": dict(PRETRAIN_COMMON, model="bootmae_large", min_lr=1e-5, model_ema_dynamic=False),
    "finetune_base": dict(FINETUNE_COMMON, model="bootmae_base_patch16_224", lr=5e-3, warmup_epochs=20, epochs=100,
                          layer_decay=0.6, total_batch=2048),
    "finetune_large": dict(FINETUNE_COMMON, model="bootmae_large_patch16_224", lr=1.5e-3, warmup_epochs=5, epochs=50,
                           layer_decay=0.75, total_batch=1024),
    "linear_base": dict(LINEAR_COMMON, model="base", depth=10, epochs=90, blr=0.1, abs_lr=6.4),
    "linear_large": dict(LINEAR_COMMON, model="large", depth=18, epochs=50, blr=0.07, abs_lr=4.48),
}
# the release's momentum of the EMA encoder at these epochs: 0.999 -> 0.9999 over 100 epochs, then (ViT-B)
# -> 0.99999 over 300 more
EMA_EPOCHS = (0, 50, 100, 250, 400, 800)
EMA_MOMENTUM = {"pretrain_base": (0.999, 0.99945, 0.9999, 0.999945, 0.99999, 0.99999),
                "pretrain_large": (0.999, 0.99945, 0.9999, 0.9999, 0.9999, 0.9999)}

# our scripts for each job, and the launch shape that is that job (the release's process count)
SCRIPTS = {
    "pretrain_base": [("scripts/pretrain/bootmae_base_800ep.sh", {"NNODES": "2"}),
                      ("scripts/pretrain/bootmae_base_800ep.sbatch", {})],
    "pretrain_large": [("scripts/pretrain/bootmae_large_800ep.sh", {"NNODES": "4"}),
                       ("scripts/pretrain/bootmae_large_800ep.sbatch", {})],
    "finetune_base": [("scripts/finetune/bootmae_base_finetune.sh", {}),
                      ("scripts/finetune/bootmae_base_finetune.sbatch", {})],
    "finetune_large": [("scripts/finetune/bootmae_large_finetune.sh", {}),
                       ("scripts/finetune/bootmae_large_finetune.sbatch", {})],
    "linear_base": [("scripts/linear/bootmae_base_linprobe.sh", {}),
                    ("scripts/linear/bootmae_base_linprobe.sbatch", {})],
    "linear_large": [("scripts/linear/bootmae_large_linprobe.sh", {}),
                     ("scripts/linear/bootmae_large_linprobe.sbatch", {})],
}
ENTRY = {"pretrain": ("run_pretraining.py", run_pretraining),
         "finetune": ("run_class_finetuning.py", run_class_finetuning),
         "linear": ("main_linprobe.py", main_linprobe)}


def parse(kind, argv):
    return ENTRY[kind][1].get_args_parser().parse_args(argv)


def effective(kind, args, nproc):
    """The values of ``args`` that make the run, as ``EXPECTED`` lists them, plus the derived ones."""
    if kind == "pretrain":
        total = nproc * args.batch_size * args.update_freq
        values = dict(total_batch=total, abs_lr=args.lr * total / 256)
    elif kind == "finetune":
        values = dict(total_batch=nproc * args.batch_size * args.update_freq)   # the lr is absolute
    else:
        total = nproc * args.batch_size * args.accum_iter
        values = dict(total_batch=total, abs_lr=args.blr * total / 256)
    for key in EXPECTED[f"{kind}_base"]:
        if key not in values:
            values[key] = getattr(args, key)
    if kind == "linear":
        values["model"] = parse_model_size(args.model)
        values["model_key"] = args.model_key.split("|")[0]   # the entry read first
    return values


def assert_values(got, expected, what):
    wrong = {k: (got[k], v) for k, v in expected.items()
             if not (got[k] == v or (isinstance(v, float) and isinstance(got[k], float) and math.isclose(got[k], v)))}
    assert not wrong, f"{what}: (ours, release) {wrong}"


@pytest.mark.parametrize("job", sorted(RELEASE))
def test_release_command_line_means_the_release_run(job):
    kind, nproc, line = RELEASE[job]
    args = parse(kind, shlex.split(line))
    assert_values(effective(kind, args, nproc), EXPECTED[job], f"release line {job}")
    if kind == "pretrain":
        momentum = [ema_momentum_at(e, args.model_ema_decay, args.model_ema_dynamic, args.model_ema_warmup_epochs,
                                    args.model_ema_dynamic_epochs) for e in EMA_EPOCHS]
        assert momentum == pytest.approx(EMA_MOMENTUM[job], abs=1e-12)


@pytest.mark.parametrize("kind", sorted(RELEASE_DEFAULTS))
def test_defaults_are_the_release_parsers_unless_deliberate(kind):
    """Every flag we share with the release defaults to its parser's value, except the listed ones; a flag
    kept at the paper's value must be one every release command line of that entry point sets."""
    parser = ENTRY[kind][1].get_args_parser()
    dests = {a.dest for a in parser._actions}
    assert not [k for k in RELEASE_DEFAULTS[kind] if k not in dests]
    drift = {k: (parser.get_default(k), v) for k, v in RELEASE_DEFAULTS[kind].items()
             if parser.get_default(k) != v and k not in DELIBERATE[kind]}
    assert not drift, f"{kind}: defaults that differ from the release's parser (ours, release): {drift}"
    same = [k for k in DELIBERATE[kind] if parser.get_default(k) == RELEASE_DEFAULTS[kind][k]]
    assert not same, f"{kind}: listed as deliberate differences but equal to the release's: {same}"
    lines = [shlex.split(line) for k, _, line in RELEASE.values() if k == kind]
    for flag, why in DELIBERATE[kind].items():
        if why == "set":
            assert all(f"--{flag}" in line for line in lines), f"--{flag} is not set by every release line"


def test_pretraining_defaults():
    parser = run_pretraining.get_args_parser()
    assert parser.get_default("drop_path") == 0.0
    assert parser.get_default("min_lr") == 1e-5
    bare = parser.parse_args([])   # still BootMAE: feature loss and momentum encoder on
    assert bare.feature_weight == 1.0 and bare.model_ema and bare.target_encoder == "ema"
    # the release's name for the crop scale
    assert parser.parse_args(["--resize_scale", "0.35"]).min_crop_scale == 0.35


def script_argv(tmp_path, script, env):
    """(processes, the entry point's arguments) of ``script`` as bash expands it with ``env``: the python
    interpreter, srun and scontrol are stubs, so nothing runs but the script itself."""
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        (bin_dir / "python").write_text("#!/bin/sh\nfor a in \"$@\"; do printf '%s\\0' \"$a\"; done\n")
        (bin_dir / "srun").write_text("#!/bin/sh\nexec \"$@\"\n")
        (bin_dir / "scontrol").write_text("#!/bin/sh\necho node0\n")
        for f in bin_dir.iterdir():
            f.chmod(0o755)
    keep = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "TMPDIR")}
    full_env = {**keep, "PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHON": str(bin_dir / "python"),
                "DATA_PATH": "/data/imagenet", "FINETUNE": "/ckpt/checkpoint-799.pth", "SLURM_JOB_NODELIST": "node0",
                **env}
    out = subprocess.run(["bash", os.path.join(ROOT, script)], cwd=ROOT, env=full_env, capture_output=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    argv = out.stdout.decode().split("\0")[:-1]
    entry = next(i for i, a in enumerate(argv) if a.endswith(".py"))
    if script.endswith(".sbatch"):
        sbatch = dict(line[len("#SBATCH --"):].split("=", 1) for line in open(os.path.join(ROOT, script))
                      if line.startswith("#SBATCH --"))
        nproc = int(sbatch["nodes"]) * int(sbatch["ntasks-per-node"])
    else:
        launcher = dict(zip(argv[:entry], argv[1:entry]))
        nproc = int(launcher["--nnodes"]) * int(launcher["--nproc_per_node"])
    return nproc, argv[entry], argv[entry + 1:]


@pytest.mark.parametrize("job", sorted(SCRIPTS))
def test_shipped_scripts_run_the_release_job(tmp_path, job):
    kind = RELEASE[job][0]
    for script, env in SCRIPTS[job]:
        nproc, entry, argv = script_argv(tmp_path, script, env)
        assert entry == ENTRY[kind][0], script
        assert_values(effective(kind, parse(kind, argv), nproc), EXPECTED[job], script)


def test_pretraining_script_on_one_node_keeps_the_papers_batch(tmp_path):
    """On 8 GPUs the release's ViT-B line would train at 8 x 256 = 2048; ours accumulates to the paper's 4096."""
    nproc, _, argv = script_argv(tmp_path, "scripts/pretrain/bootmae_base_800ep.sh", {})
    args = parse("pretrain", argv)
    assert (nproc, args.batch_size, args.update_freq) == (8, 256, 2)
    assert_values(effective("pretrain", args, nproc), EXPECTED["pretrain_base"], "8 GPUs")


# ------------------------------------------------------------------------------------------------------------
# run_pretraining.py --mae

MAE_VALUES = dict(feature_weight=0.0, mask_type="random", context="none", decoder_depth=8, decoder_dim=512,
                  decoder_num_heads=16, pixel_norm="patch", weight_mask=False)
TINY = ["--model", "bootmae_tiny", "--input_size", "32", "--patch_size", "8", "--mask_num", "12",
        "--num_mask_patches", "10", "--data_set", "demo"]


def test_mae_preset_parses_to_the_mae_paper_settings():
    args = parse("pretrain", ["--mae"])
    assert {k: getattr(args, k) for k in MAE_VALUES} == MAE_VALUES
    # the same arguments as the run spelt with the flags: the preset itself is not stored
    spelt = parse("pretrain", [a for k, v in MAE_VALUES.items() if v is not False for a in (f"--{k}", str(v))])
    assert vars(args) == vars(spelt)


def test_flags_after_mae_override_it_and_earlier_ones_are_kept():
    args = parse("pretrain", ["--mae", "--decoder_depth", "4", "--pixel_norm", "channel", "--feature_weight", "1"])
    assert (args.decoder_depth, args.pixel_norm, args.feature_weight, args.mask_type) == (4, "channel", 1.0, "random")
    args = parse("pretrain", ["--mask_type", "block", "--decoder_dim", "256", "--mae"])
    assert (args.mask_type, args.decoder_dim, args.decoder_depth) == ("block", 256, 8)


def test_mae_builds_the_mae_model_masks_and_target():
    import pipelines
    import masking_generator
    args = parse("pretrain", TINY + ["--mae"])
    run_pretraining.check_args(args)
    model = run_pretraining.build_model(args, depth=1)   # one encoder block keeps the test small
    assert model.feature_decoder is None and build_target_encoder(args, model) is None
    assert not any("feature" in k for k in model.state_dict())
    dec = model.pixel_decoder
    assert (len(dec.blocks), dec.embed.out_features, dec.blocks[0].attn.num_heads) == (8, 512, 16)
    assert all(b.c_attn is None for b in dec.blocks)
    aug = pipelines.DataAugmentationForBootMAE(args)
    assert isinstance(aug.masked_position_generator, masking_generator.RandomMaskingGenerator)
    assert all(aug.masked_position_generator().sum() == 12 for _ in range(20))
    # the pixel target: each patch normalised over all its values (mean 0, std 1 per patch, not per channel)
    images = torch.rand(2, 3, 32, 32) * torch.tensor([1.0, 0.2, 3.0]).view(1, 3, 1, 1)
    target = normalized_pixel_target(images, 8, norm=args.pixel_norm)
    assert target.shape == (2, 16, 8 * 8 * 3)
    torch.testing.assert_close(target.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)
    # MAE's norm_pix_loss divides by the unbiased std, so the unbiased variance of each target patch is 1
    torch.testing.assert_close(target.var(-1, unbiased=True), torch.ones(2, 16), atol=1e-3, rtol=0)
    per_channel = target.reshape(2, 16, 64, 3).mean(2)
    assert per_channel.abs().max() > 0.1   # a per-channel normalisation would make these 0


def test_mae_one_epoch_trains(tmp_path):
    from shared_helpers import read_log
    from test_pretraining_e2e import COMMON, _load, _ok, run_cli
    out = str(tmp_path / "mae")
    # COMMON's small decoder (64 wide, 1 block) comes before --mae and is kept
    _ok(run_cli(COMMON + ["--mae", "--data_set", "demo", "--demo_size", "16", "--batch_size", "8", "--epochs", "1",
                          "--output_dir", out]))
    record, = read_log(out)
    assert math.isfinite(record["train_loss"]) and record["train_loss"] > 0 and record["train_feature_loss"] == 0
    ckpt = _load(os.path.join(out, "checkpoint-last.pth"))
    assert ckpt["epoch"] == 0 and "model_ema" not in ckpt and "target_encoder" not in ckpt
    assert isinstance(ckpt["args"], dict) and "mae" not in ckpt["args"]   # plain values, no preset flag
    args = argparse.Namespace(**ckpt["args"])
    assert (args.mask_type, args.pixel_norm, args.context, args.feature_weight) == ("random", "patch", "none", 0.0)
    assert (args.decoder_dim, args.decoder_depth, args.decoder_num_heads) == (64, 1, 16)
    assert not any(k.startswith("feature_decoder") for k in ckpt["model"])
