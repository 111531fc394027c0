"""Smoke mode of the shipped launch scripts (scripts/pretrain, scripts/finetune, scripts/linear and the downstream
launchers of semantic_segmentation/ and detection/): a script that breaks, or whose arguments drift from the
documented values, fails here.

Two checks per script:

* arguments: the script runs with ``PYTHON`` pointing at a stand-in that records its command line instead of
  starting Python (``srun`` likewise for the .sbatch files). The entry point's own parser reads what the script
  would have launched, and every argument must equal the documented value: the release's effective values for
  the paper's scripts (its published command lines plus the parser defaults those lines rely on, written below
  as literals because they must match the release exactly), the recipe in the header of the other scripts.
  The entry point's checks (``check_args``) accept it. Each .sbatch launches exactly what its .sh launches for
  the same nodes, processes and batch.
* a real run: one script of each entry point (the ViT-B ones) runs through torchrun on the CPU with the
  script's own arguments and only size overrides appended (``"$@"`` comes last, so argparse's last value wins):
  a tiny model, a generated 4-image data set, batch 2, one epoch. The arguments the run recorded in its
  checkpoint must equal the documented ones except those sizes. The pretraining run's checkpoint feeds the
  fine-tuning and linear-probe runs. The downstream launchers run for real only where OpenMMLab is installed.
"""
import argparse
import copy
import math
import os
import re
import stat
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from torch.distributed.run import parse_args as parse_torchrun_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import checkpoints  # noqa: E402
import main_linprobe  # noqa: E402
import run_class_finetuning  # noqa: E402
import run_pretraining  # noqa: E402
import utils  # noqa: E402
from tiny_coco import write_tiny_ade20k, write_tiny_coco  # noqa: E402
from shared_helpers import clean_env, read_log  # noqa: E402

ENTRY_POINTS = {"run_pretraining.py": run_pretraining, "run_class_finetuning.py": run_class_finetuning,
                "main_linprobe.py": main_linprobe}
TIMEOUT = 600

# ---------------------------------------------------------------------------------------------------------
# documented values (literals: they must match the release's runs exactly)

# the release's pretraining parser defaults that its ViT-B/L command lines rely on (they do not set them), and
# the behaviour of its code behind flags that are ours (mask mode, pixel target, feature-weight ramp, momentum
# schedule, the BootMAE configuration of the ablation flags)
PRETRAIN_RELEASE_DEFAULTS = dict(
    drop_path=0.0, weight_decay=0.05, weight_decay_end=None, clip_grad=None, warmup_lr=0.0, input_size=224,
    patch_size=None, num_mask_patches=120, min_mask_patches_per_block=16, max_mask_patches_per_block=60,
    min_crop_scale=0.2, seed=0, imagenet_default_mean_and_std=False, mask_type="release", pixel_norm="channel",
    feature_ramp=0.25, model_ema_warmup_epochs=100, model_ema_dynamic_epochs=400, pixel_weight=1.0,
    target_encoder="ema", target_fraction=1.0, context="both", context_blocks=[0, -1], pixel_warmup_epochs=0,
    decoder_dim=None, decoder_depth=None, save_ckpt_freq=20)
# the release's scripts/pretrain command lines; ViT-L passes no --min_lr and so runs with its parser's 1e-5
PRETRAIN_RELEASE = dict(model_ema=True, model_ema_decay=0.999, lr=1.5e-4, warmup_epochs=40, epochs=801, mask_num=147,
                        feature_weight=1.0, weight_mask=True)
# the release's fine-tuning parser defaults its command lines rely on (RandAugment, random erasing, label
# smoothing, the final lr, ...); its warm-up starts at 0
FINETUNE_RELEASE_DEFAULTS = dict(
    input_size=224, patch_size=None, drop=0.0, attn_drop_rate=0.0, init_scale=0.001, use_mean_pooling=True,
    rel_pos_bias=False, opt="adamw", opt_eps=1e-8, opt_betas=None, clip_grad=None, weight_decay_end=None,
    warmup_lr=0.0, min_lr=1e-6, warmup_steps=-1, color_jitter=0.4, aa="rand-m9-mstd0.5-inc1", smoothing=0.1,
    train_interpolation="bicubic", crop_pct=None, reprob=0.25, remode="pixel", recount=1, mixup_prob=1.0,
    mixup_switch_prob=0.5, mixup_mode="batch", cutmix_minmax=None, imagenet_default_mean_and_std=False, seed=0,
    zero_stage=0, model_ema_force_cpu=False)
# the release's scripts/finetune command lines, ViT-B and what ViT-L changes
FINETUNE_RELEASE_B = dict(model="bootmae_base_patch16_224", model_key="model", lr=5e-3, warmup_epochs=20, epochs=100,
                          layer_decay=0.6, backbone_decay=1.0, drop_path=0.1, weight_decay=0.05, mixup=0.8,
                          cutmix=1.0, nb_classes=1000, enable_deepspeed=True, model_ema=True,
                          model_ema_decay=0.9998)
FINETUNE_RELEASE_L = dict(FINETUNE_RELEASE_B, model="bootmae_large_patch16_224", lr=1.5e-3, warmup_epochs=5,
                          epochs=50, layer_decay=0.75)
# the release's linear-probe parser defaults (MAE's) and its scripts/linear command lines
LINPROBE_RELEASE_DEFAULTS = dict(input_size=224, patch_size=None, min_lr=0.0, warmup_epochs=10, momentum=0.9, lr=None,
                                 seed=0, crop_pct=None, imagenet_default_mean_and_std=False)
LINPROBE_RELEASE_B = dict(model="base_patch16_224", depth=10, global_pool=True, blr=0.1, weight_decay=0.0, epochs=90,
                          dist_eval=True)
LINPROBE_RELEASE_L = dict(LINPROBE_RELEASE_B, model="large_patch16_224", depth=18, blr=0.07, epochs=50)

# per script: the entry point, the documented total batch (per-process batch x accumulation x processes, at the
# script's default process count) and every argument it must give
SCRIPTS = {
    "scripts/pretrain/bootmae_base_800ep.sh": ("run_pretraining.py", 4096, dict(
        PRETRAIN_RELEASE_DEFAULTS, **PRETRAIN_RELEASE, model="bootmae_base", model_ema_dynamic=True, min_lr=1e-4,
        batch_size=256, num_workers=10, output_dir="output/bootmae_base_800ep")),
    "scripts/pretrain/bootmae_large_800ep.sh": ("run_pretraining.py", 4096, dict(
        PRETRAIN_RELEASE_DEFAULTS, **PRETRAIN_RELEASE, model="bootmae_large", model_ema_dynamic=False, min_lr=1e-5,
        batch_size=128, num_workers=10, output_dir="output/bootmae_large_800ep")),
    # the CIFAR-10 report's setting (header of the script)
    "scripts/pretrain/bootmae_tiny_cifar10.sh": ("run_pretraining.py", 512, dict(
        PRETRAIN_RELEASE_DEFAULTS, model="bootmae_tiny", data_set="cifar10", input_size=32, patch_size=4,
        mask_num=48, num_mask_patches=39, min_mask_patches_per_block=4, max_mask_patches_per_block=16,
        batch_size=512, epochs=200, warmup_epochs=10, lr=1.5e-4, min_lr=1e-6, feature_weight=1.0, weight_mask=True,
        model_ema=True, model_ema_decay=0.999, model_ema_warmup_epochs=25, model_ema_dynamic=True,
        model_ema_dynamic_epochs=100, num_workers=8, save_ckpt_freq=50, output_dir="output/bootmae_tiny_cifar10")),
    # the CPU demo: 112 px, 37 of 49 patches masked, block budget 30 (header of the script)
    "scripts/pretrain/demo_cpu.sh": ("run_pretraining.py", 32, dict(
        PRETRAIN_RELEASE_DEFAULTS, model="bootmae_tiny", data_set="demo", demo_size=384, input_size=112,
        mask_num=37, num_mask_patches=30, min_mask_patches_per_block=4, max_mask_patches_per_block=16,
        batch_size=32, epochs=6, warmup_epochs=1, lr=1.5e-3, min_lr=1e-5, feature_weight=1.0, weight_mask=True,
        model_ema=True, model_ema_decay=0.999, model_ema_dynamic=False, num_workers=2, device="cpu",
        save_ckpt_freq=3, print_freq=4, output_dir="output/demo")),
    "scripts/finetune/bootmae_base_finetune.sh": ("run_class_finetuning.py", 2048, dict(
        FINETUNE_RELEASE_DEFAULTS, **FINETUNE_RELEASE_B, batch_size=256, num_workers=8, dist_eval=True,
        output_dir="output/bootmae_base_finetune")),
    "scripts/finetune/bootmae_large_finetune.sh": ("run_class_finetuning.py", 1024, dict(
        FINETUNE_RELEASE_DEFAULTS, **FINETUNE_RELEASE_L, batch_size=128, num_workers=8, dist_eval=True,
        output_dir="output/bootmae_large_finetune")),
    **{f"scripts/finetune/bootmae_tiny_{name}.sh": ("run_class_finetuning.py", 256, dict(
        FINETUNE_RELEASE_DEFAULTS, model="bootmae_tiny_patch16_224", data_set=name, input_size=32, patch_size=4,
        model_key="model", batch_size=256, lr=1e-3, min_lr=1e-6, warmup_epochs=5, epochs=100, layer_decay=0.75,
        drop_path=0.1, weight_decay=0.05, mixup=0.8, cutmix=1.0, nb_classes=classes, model_ema=True,
        model_ema_decay=0.9998, num_workers=8, save_ckpt_freq=0, output_dir=f"output/bootmae_tiny_{name}_finetune"))
       for name, classes in (("cifar10", 10), ("cifar100", 100))},
    "scripts/linear/bootmae_base_linprobe.sh": ("main_linprobe.py", 16384, dict(
        LINPROBE_RELEASE_DEFAULTS, **LINPROBE_RELEASE_B, batch_size=1024, num_workers=10,
        output_dir="output/bootmae_base_linprobe")),
    "scripts/linear/bootmae_large_linprobe.sh": ("main_linprobe.py", 16384, dict(
        LINPROBE_RELEASE_DEFAULTS, **LINPROBE_RELEASE_L, batch_size=1024, num_workers=10,
        output_dir="output/bootmae_large_linprobe")),
    # the ImageNet recipe at CIFAR scale, all 12 blocks, whole 32 px image in evaluation (header of the script)
    **{f"scripts/linear/bootmae_tiny_{name}_linprobe.sh": ("main_linprobe.py", 1024, dict(
        LINPROBE_RELEASE_DEFAULTS, model="bootmae_tiny", data_set=name, input_size=32, patch_size=4, crop_pct=1.0,
        global_pool=True, depth=None, batch_size=1024, blr=0.1, weight_decay=0.0, epochs=100, warmup_epochs=10,
        dist_eval=True, num_workers=8, output_dir=f"output/bootmae_tiny_{name}_linprobe"))
       for name in ("cifar10", "cifar100")},
}
# what the environment chooses rather than the script (checked against the environment given)
FROM_ENV = ("data_path", "finetune")
# fine-tuning flags of the release's command lines that are accepted and change nothing here (its ViT-B line
# passes --abs_pos_emb --disable_rel_pos_bias, its ViT-L line does not; rel_pos_bias is checked)
NO_EFFECT = ("abs_pos_emb", "layer_scale_init_value", "eval_all", "resplit")
# per-step batch arguments: checked through the total batch
BATCH_KEYS = ("batch_size", "update_freq", "accum_iter")


def shipped(folder, ext):
    return sorted(f"{folder}/{n}" for n in os.listdir(os.path.join(ROOT, folder)) if n.endswith(ext))


SH_SCRIPTS = shipped("scripts/pretrain", ".sh") + shipped("scripts/finetune", ".sh") + shipped("scripts/linear", ".sh")
SBATCH_SCRIPTS = (shipped("scripts/pretrain", ".sbatch") + shipped("scripts/finetune", ".sbatch")
                  + shipped("scripts/linear", ".sbatch"))


# ---------------------------------------------------------------------------------------------------------
# helpers

def _env(**extra):
    """The caller's environment without launcher and script variables, so that a run inside a SLURM job, a
    torchrun or a shell that sets GPUS or BATCH sees only what a test gives it."""
    return clean_env(("NNODES", "NODE_RANK", "GPUS", "NPROC", "BATCH", "DATA_PATH", "OUTPUT_DIR", "FINETUNE", "PYTHON",
                      "CONFIG", "CHECKPOINT", "PRETRAINED"), **extra)


def _executable(path, text):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """A folder with ``python`` and ``srun`` that write their command line (NUL-separated) to $SMOKE_ARGV instead
    of running anything, and ``scontrol`` that names one host; plus an existing file for --finetune."""
    folder = tmp_path_factory.mktemp("stand_ins")
    record = "#!/bin/sh\nprintf '%s\\0' \"$@\" > \"$SMOKE_ARGV\"\n"
    _executable(folder / "python", record)
    _executable(folder / "srun", record)
    _executable(folder / "scontrol", "#!/bin/sh\necho node0\n")
    (folder / "encoder.pth").write_bytes(b"")
    return folder


def _recorded_launch(stand_ins, script, *extra, **env):
    """Runs ``script`` with the stand-ins; returns the command line it launched (without the Python or srun)."""
    argv_file = stand_ins / "argv"
    if argv_file.exists():
        argv_file.unlink()
    env = _env(PATH=f"{stand_ins}:{os.environ['PATH']}", PYTHON=stand_ins / "python", SMOKE_ARGV=argv_file,
               SLURM_JOB_NODELIST="node0", SLURM_SUBMIT_DIR=ROOT, **env)
    proc = subprocess.run(["bash", os.path.join(ROOT, script), *extra], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and argv_file.exists(), f"{script}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
    argv = argv_file.read_bytes().decode().split("\0")[:-1]
    return argv[1:] if argv and os.path.basename(argv[0]).startswith("python") else argv


def _entry_and_processes(argv):
    """(entry point file, its arguments, number of processes) of a recorded launch: ``-m torch.distributed.run``
    with its own flags, or the entry point directly (one process)."""
    if argv[:2] == ["-m", "torch.distributed.run"]:
        launch = parse_torchrun_args(argv[2:])
        nodes = int(str(launch.nnodes).split(":")[-1])
        return os.path.basename(launch.training_script), launch.training_script_args, nodes * int(
            launch.nproc_per_node)
    return os.path.basename(argv[0]), argv[1:], 1


def _parse(entry, args):
    """The entry point's parser as its command line builds it (utils.run_cli)."""
    return argparse.ArgumentParser(parents=[ENTRY_POINTS[entry].get_args_parser()]).parse_args(args)


def _accumulation(args):
    return getattr(args, "update_freq", None) or getattr(args, "accum_iter", 1)


def _mismatches(args, expected, skip=()):
    return {k: (getattr(args, k, "<missing>"), v) for k, v in expected.items()
            if k not in skip and getattr(args, k, "<missing>") != v}


# ---------------------------------------------------------------------------------------------------------
# arguments of every script

def test_every_shipped_script_has_documented_values():
    assert sorted(SCRIPTS) == sorted(SH_SCRIPTS), \
        "a script in scripts/{pretrain,finetune,linear} without its documented values here (or one listed that is gone)"


@pytest.mark.parametrize("script", SH_SCRIPTS)
def test_script_launches_the_documented_arguments(script, stand_ins):
    entry, total_batch, documented = SCRIPTS[script]
    env = dict(DATA_PATH="/data/set", FINETUNE=stand_ins / "encoder.pth")
    argv = _recorded_launch(stand_ins, script, **env)
    launched, args, processes = _entry_and_processes(argv)
    assert launched == entry
    parsed = _parse(entry, args)
    text = open(os.path.join(ROOT, script)).read()
    assert parsed.data_path == ("/data/set" if "DATA_PATH" in text else None)
    if "FINETUNE" in text:
        assert parsed.finetune == str(stand_ins / "encoder.pth")
    # every argument: the parser's defaults with the documented values, nothing else changed
    expected = {**vars(_parse(entry, [])), **documented}
    assert _mismatches(parsed, expected, skip=FROM_ENV + BATCH_KEYS + NO_EFFECT) == {}
    assert set(vars(parsed)) == set(expected)
    assert parsed.batch_size * _accumulation(parsed) * processes == total_batch
    # the entry point's own checks accept them
    ENTRY_POINTS[entry].check_args(copy.deepcopy(parsed))


# the recipes that accumulate to a documented total batch (scripts/launch.sh's total_batch TOTAL BATCH)
BATCH_SCRIPTS = [s for s in SH_SCRIPTS if re.search(r"^total_batch \d+", open(os.path.join(ROOT, s)).read(), re.M)]


def test_the_paper_recipes_accumulate_to_their_total_batch():
    assert len(BATCH_SCRIPTS) == 6, BATCH_SCRIPTS   # pretraining, fine-tuning and linear probing, ViT-B and ViT-L


@pytest.mark.parametrize("script", BATCH_SCRIPTS)
def test_total_batch_holds_for_other_shapes(script, stand_ins):
    """NNODES x GPUS x BATCH with the accumulation the script computes keeps the documented total batch (for
    shapes that can reach it), and never accumulates less than one step."""
    entry, total_batch, documented = SCRIPTS[script]
    for nodes, gpus, batch in ((1, 8, 128), (2, 8, 64), (4, 8, 32), (1, 4, 16), (4, 8, 1024)):
        env = dict(NNODES=nodes, GPUS=gpus, BATCH=batch, DATA_PATH="/data", FINETUNE=stand_ins / "encoder.pth")
        _, args, processes = _entry_and_processes(_recorded_launch(stand_ins, script, **env))
        parsed = _parse(entry, args)
        assert processes == nodes * gpus and parsed.batch_size == batch
        assert parsed.batch_size * _accumulation(parsed) * processes == max(total_batch, nodes * gpus * batch)


def _sbatch_shape(path):
    text = open(os.path.join(ROOT, path)).read()
    nodes = int(re.search(r"#SBATCH --nodes=(\d+)", text).group(1))
    tasks = int(re.search(r"#SBATCH --ntasks-per-node=(\d+)", text).group(1))
    return nodes, tasks


@pytest.mark.parametrize("sbatch", SBATCH_SCRIPTS)
def test_sbatch_launches_what_its_script_launches(sbatch, stand_ins):
    script = sbatch[:-len(".sbatch")] + ".sh"
    assert script in SCRIPTS
    entry = SCRIPTS[script][0]
    nodes, tasks = _sbatch_shape(sbatch)
    env = dict(DATA_PATH="/data/set", FINETUNE=stand_ins / "encoder.pth")
    argv = _recorded_launch(stand_ins, sbatch, **env)
    assert os.path.basename(argv[0]) == entry  # one task per GPU, started by srun
    from_sbatch = _parse(entry, argv[1:])
    _, args, processes = _entry_and_processes(_recorded_launch(
        stand_ins, script, NNODES=nodes, GPUS=tasks, BATCH=from_sbatch.batch_size, **env))
    assert processes == nodes * tasks
    assert vars(from_sbatch) == vars(_parse(entry, args))
    assert from_sbatch.batch_size * _accumulation(from_sbatch) * processes == SCRIPTS[script][1]


# ---------------------------------------------------------------------------------------------------------
# real runs: the ViT-B scripts through torchrun on the CPU, sizes overridden

# appended to the script's arguments: nothing but sizes (and the CPU)
SIZE_OVERRIDES = {
    "run_pretraining.py": ["--model", "bootmae_tiny", "--update_freq", "1"],
    "run_class_finetuning.py": ["--model", "bootmae_tiny_patch16_224", "--update_freq", "1"],
    "main_linprobe.py": ["--model", "tiny_patch16_224", "--accum_iter", "1"],
}
COMMON_OVERRIDES = ["--epochs", "1", "--num_workers", "0", "--device", "cpu"]
SIZE_KEYS = ("model", "batch_size", "update_freq", "accum_iter", "epochs", "num_workers", "device", "output_dir")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """An ImageNet-layout folder: train/ and val/, 2 classes of 2 images each (48x40 px, random pixels)."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("n01", "n02"):
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def _run_script(script, out, **env):
    """The real script: GPUS=1, batch 2, one epoch on the CPU; returns the output folder's checkpoint args."""
    entry = SCRIPTS[script][0]
    extra = SIZE_OVERRIDES[entry] + COMMON_OVERRIDES
    env = _env(PYTHON=sys.executable, GPUS=1, BATCH=2, MASTER_PORT=utils.free_port(), OUTPUT_DIR=out, **env)
    # DeepSpeed builds its communication extension once; kept beside the virtual environment as test_finetune does
    if os.access(sys.prefix, os.W_OK):
        env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    proc = subprocess.run(["bash", os.path.join(ROOT, script), *extra], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"{script}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0]
    assert math.isfinite(log[0]["train_loss"])
    ckpt = checkpoints.load_checkpoint(os.path.join(out, "checkpoint-last.pth"))
    assert ckpt["epoch"] == 0
    return checkpoints.checkpoint_args(ckpt), proc.stdout


def _assert_recorded(script, recorded, **env_values):
    """The run's recorded arguments: the documented ones, except the sizes and what the entry point fills in
    from them (the model's patch size, the linear probe's lr from --blr), and the environment's."""
    documented = SCRIPTS[script][2]
    assert _mismatches(recorded, documented, skip=SIZE_KEYS + ("patch_size", "lr" if "blr" in documented else "")) == {}
    assert recorded.epochs == 1 and recorded.batch_size == 2 and _accumulation(recorded) == 1
    for key, value in env_values.items():
        assert getattr(recorded, key) == str(value)


@pytest.fixture(scope="module")
def pretrained(image_folder, tmp_path_factory):
    script = "scripts/pretrain/bootmae_base_800ep.sh"
    out = tmp_path_factory.mktemp("pretrain")
    recorded, stdout = _run_script(script, out, DATA_PATH=image_folder)
    return script, out, recorded, stdout


def test_pretraining_script_runs(pretrained, image_folder):
    script, out, recorded, stdout = pretrained
    _assert_recorded(script, recorded, data_path=image_folder)
    assert recorded.model == "bootmae_tiny" and recorded.patch_size == 16
    assert "distributed: 1 processes, backend gloo" in stdout
    assert {"checkpoint-0.pth", "reconstruction.png"} <= set(os.listdir(out))


def test_finetuning_script_runs(pretrained, image_folder, tmp_path):
    script = "scripts/finetune/bootmae_base_finetune.sh"
    encoder = pretrained[1] / "checkpoint-last.pth"
    recorded, stdout = _run_script(script, tmp_path, DATA_PATH=image_folder, FINETUNE=encoder)
    _assert_recorded(script, recorded, data_path=image_folder, finetune=encoder)
    assert "DeepSpeed: ZeRO stage 0" in stdout and (tmp_path / "deepspeed_config.json").is_file()
    assert "loaded" in stdout and "encoder tensors" in stdout


def test_linear_probe_script_runs(pretrained, image_folder, tmp_path):
    script = "scripts/linear/bootmae_base_linprobe.sh"
    encoder = pretrained[1] / "checkpoint-last.pth"
    recorded, stdout = _run_script(script, tmp_path, DATA_PATH=image_folder, FINETUNE=encoder)
    _assert_recorded(script, recorded, data_path=image_folder, finetune=encoder)
    # lr = blr x total batch / 256 with the run's total batch of 2
    assert recorded.lr == pytest.approx(0.1 * 2 / 256)


# ---------------------------------------------------------------------------------------------------------
# downstream launchers (semantic_segmentation/, detection/)

DOWNSTREAM = {"semantic_segmentation": "semantic_segmentation/configs/upernet_bootmae_base_512_160k_ade20k.py",
              "detection": "detection/configs/mask_rcnn_bootmae_base_fpn_1x_coco.py"}


@pytest.mark.parametrize("task", sorted(DOWNSTREAM))
def test_downstream_launchers_arguments(task, stand_ins):
    """dist_train.sh / dist_test.sh start train.py / test.py through torchrun with the config, the checkpoint,
    the pytorch launcher and the extra flags; the slurm files start them through srun with the shipped config."""
    config, extra = DOWNSTREAM[task], ["--work-dir", "w", "--amp"]
    argv = _recorded_launch(stand_ins, f"{task}/dist_train.sh", config, "4", *extra, NNODES=2)
    script, args, processes = _entry_and_processes(argv)
    assert (script, args, processes) == ("train.py", [config, "--launcher", "pytorch", *extra], 8)
    argv = _recorded_launch(stand_ins, f"{task}/dist_test.sh", config, "ckpt.pth", "2", *extra)
    script, args, processes = _entry_and_processes(argv)
    assert (script, args, processes) == ("test.py", [config, "ckpt.pth", "--launcher", "pytorch", *extra], 2)
    assert os.path.isfile(os.path.join(ROOT, config))
    argv = _recorded_launch(stand_ins, f"{task}/slurm_train.sbatch", *extra, PRETRAINED="pre.pth")
    assert argv == ["-u", f"{task}/train.py", config, "--pretrained", "pre.pth", "--launcher", "slurm", "--resume",
                    *extra]
    argv = _recorded_launch(stand_ins, f"{task}/slurm_test.sbatch", *extra, CHECKPOINT="ckpt.pth")
    assert argv == ["-u", f"{task}/test.py", config, "ckpt.pth", "--launcher", "slurm", *extra]
    assert _sbatch_shape(f"{task}/slurm_train.sbatch") == (1, 8)  # batch 16 = 8 GPUs x 2 images (the paper's)


@pytest.fixture(scope="module")
def openmmlab():
    """Skips where OpenMMLab is absent (before the module's other fixtures are built)."""
    try:
        import mmcv.ops  # noqa: F401  (compiled ops: RoIAlign / NMS)
        import mmdet  # noqa: F401
        import mmseg  # noqa: F401
    except ImportError as e:
        pytest.skip(f"OpenMMLab (mmcv with ops, mmsegmentation, mmdetection) is not installed ({e}); "
                    f"enable with: bash setup_openmmlab.sh")


# the launchers' --launcher pytorch gives every process a CUDA device in mmengine, so the CPU runs take one
# process without it (--launcher none, appended: the last value wins)
# a 4-block, 96-wide backbone at 64 px (as tests/test_openmmlab.py)
TINY_BACKBONE = ["model.backbone.embed_dim=96", "model.backbone.depth=4", "model.backbone.num_heads=3",
                 "model.backbone.out_indices=[0,1,2,3]", "model.backbone.img_size=64",
                 "optim_wrapper.paramwise_cfg.num_layers=4"]
NO_WORKERS = [f"{split}_dataloader.{key}" for split in ("train", "val", "test")
              for key in ("num_workers=0", "persistent_workers=False")]


def _run_launcher(script, *args):
    env = _env(PYTHON=sys.executable, MASTER_PORT=utils.free_port(), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", os.path.join(ROOT, script), *args, "--launcher", "none"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"{script}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def test_segmentation_launchers_run(openmmlab, pretrained, tmp_path):
    root = tmp_path / "ade"
    write_tiny_ade20k(root)
    # the pretraining script's bootmae_tiny encoder (192 wide, 12 blocks, 3 heads) at 64 px
    tiny = NO_WORKERS + [
        "model.backbone.embed_dim=192", "model.backbone.num_heads=3", "model.backbone.img_size=64",
        "model.decode_head.in_channels=[192,192,192,192]", "model.decode_head.channels=32",
        "model.auxiliary_head.in_channels=192", "model.auxiliary_head.channels=16",
        "model.data_preprocessor.size=(64,64)", "model.test_cfg.crop_size=(64,64)", "model.test_cfg.stride=(43,43)",
        *[f"{split}_dataloader.dataset.data_root={root}" for split in ("train", "val", "test")],
        "train_dataloader.batch_size=2", "train_dataloader.dataset.pipeline.3.crop_size=(64,64)",
        "train_dataloader.dataset.pipeline.2.scale=(128,64)", "val_dataloader.dataset.pipeline.1.scale=(128,64)",
        "test_dataloader.dataset.pipeline.1.scale=(128,64)", "train_cfg.max_iters=2", "train_cfg.val_interval=3",
        "param_scheduler.0.end=1", "param_scheduler.1.end=2", "default_hooks.checkpoint.interval=2"]
    config, work = DOWNSTREAM["semantic_segmentation"], tmp_path / "work"
    out = _run_launcher("semantic_segmentation/dist_train.sh", config, "1", "--work-dir", str(work), "--pretrained",
                        str(pretrained[1] / "checkpoint-last.pth"), "--cfg-options", *tiny)
    assert "backbone: loaded" in out and (work / "iter_2.pth").is_file()
    out = _run_launcher("semantic_segmentation/dist_test.sh", config, str(work / "iter_2.pth"), "1", "--work-dir",
                        str(tmp_path / "test"), "--cfg-options", *[s for s in tiny if not s.startswith("train")])
    assert "mIoU" in out


def test_detection_launcher_runs(openmmlab, tmp_path):
    root = tmp_path / "coco"
    write_tiny_coco(root)
    small = TINY_BACKBONE + NO_WORKERS + [
        "model.neck.in_channels=[96,96,96,96]", "model.neck.out_channels=32", "model.rpn_head.in_channels=32",
        "model.rpn_head.feat_channels=32", "model.roi_head.bbox_roi_extractor.out_channels=32",
        "model.roi_head.mask_roi_extractor.out_channels=32", "model.roi_head.bbox_head.in_channels=32",
        "model.roi_head.bbox_head.fc_out_channels=64", "model.roi_head.mask_head.in_channels=32",
        "model.roi_head.mask_head.conv_out_channels=32",
        *[f"{split}_dataloader.dataset.data_root={root}/" for split in ("train", "val", "test")],
        f"val_evaluator.ann_file={root}/annotations/instances_val2017.json",
        f"test_evaluator.ann_file={root}/annotations/instances_val2017.json",
        "train_dataloader.dataset.pipeline.2.scale=(160,128)", "train_cfg.max_epochs=1", "train_cfg.val_interval=2"]
    work = tmp_path / "work"
    _run_launcher("detection/dist_train.sh", DOWNSTREAM["detection"], "1", "--work-dir", str(work),
                  "--cfg-options", *small)
    assert (work / "epoch_1.pth").is_file()
