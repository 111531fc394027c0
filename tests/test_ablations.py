"""The ablations: every row of every table (scripts/ablations/tables.py) builds what it describes and trains;
nonsensical flag combinations are refused with one line; the table scripts cover every row. (How the target
encoders of MAE-K, EMA-MAE and MAE-new change, and their resume: tests/test_ablation_targets.py.)

Models are small (32 px images in 8 px patches: 16 patches, 12 masked; a 12-block, 32-wide encoder so that the
paper's block indices exist) and run in-process on the CPU.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts", "ablations"))

import checkpoints  # noqa: E402
import masking_generator  # noqa: E402
import modeling_bootmae as mb  # noqa: E402
import pretraining_state  # noqa: E402
import run_pretraining  # noqa: E402
import utils  # noqa: E402
from datasets import DataAugmentationForBootMAE  # noqa: E402
from engine_for_pretraining import train_one_epoch  # noqa: E402
from optim_factory import create_optimizer  # noqa: E402
from target_encoders import build_target_encoder  # noqa: E402
import tables  # noqa: E402
from shared_helpers import read_log  # noqa: E402

SMALL = ["--input_size", "32", "--patch_size", "8", "--encoder_dim", "32", "--encoder_depth", "12",
         "--encoder_heads", "2", "--mask_num", "12", "--num_mask_patches", "10", "--min_mask_patches_per_block", "2",
         "--max_mask_patches_per_block", "6", "--batch_size", "2", "--device", "cpu", "--data_set", "demo",
         "--num_workers", "0", "--drop_path", "0.0", "--print_freq", "100"]
# the decoders of the tables at a test-sized width (their depth and heads are kept): 512 -> 64, 768 -> 96
WIDTH = {256: 32, 384: 48, 512: 64, 768: 96}
DEPTH = 12


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread avoids the cost of synchronising threads on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def parse(flags):
    parser = argparse.ArgumentParser("test", parents=[run_pretraining.get_args_parser()])
    args = parser.parse_args([str(f) for f in flags])
    run_pretraining.check_args(args)
    return args


def small_overrides(args):
    """Constructor overrides that shrink the decoders' width (the flags' widths are checked separately)."""
    kw = pretraining_state.model_kwargs(args)
    out = {"decoder_dim": WIDTH[kw.get("decoder_dim") or 512]}
    if kw.get("feature_decoder_dim"):
        out["feature_decoder_dim"] = WIDTH[kw["feature_decoder_dim"]]
    return out


def batches(args, n, seed=0, batch=2):
    """n (images, mask) batches with masks from the run's own mask generator."""
    gen = DataAugmentationForBootMAE(args).masked_position_generator
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        images = torch.randn(batch, 3, 32, 32, generator=g)
        mask = torch.stack([torch.from_numpy(gen(rng)).flatten() for _ in range(batch)])
        out.append((images, mask))
    return out


def record_target_inputs(targets, log):
    """Wraps every target network's feature function to log how many patches it is fed per image."""
    def wrap(obj, net):
        fn = net.target_features

        def recorder(images, ids=None):
            log.append(16 if ids is None else ids.shape[1])
            return fn(images, ids)
        obj.target_fn = recorder
    if targets.kind == "ema":
        wrap(targets, targets.ema.module)
    elif targets.kind == "mae_new":
        wrap(targets.fast, targets.fast.net)
        wrap(targets.slow, targets.slow.net)
    else:
        wrap(targets, targets.net)


def schedules(args, steps):
    lr = utils.cosine_scheduler(1e-3, 1e-4, args.epochs, steps, 0)
    return lr, utils.cosine_scheduler(0.05, 0.05, args.epochs, steps)


@pytest.fixture(scope="module")
def mae_checkpoint(tmp_path_factory):
    """An encoder checkpoint in MAE's layout (full qkv bias, its own position table, decoder tensors)."""
    torch.manual_seed(7)
    enc = mb.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=DEPTH, num_heads=2)
    enc._init_encoder()
    state = {}
    for key, value in enc.state_dict().items():
        if key.endswith("attn.q_bias"):
            prefix = key[:-len("q_bias")]
            v = enc.state_dict()[prefix + "v_bias"]
            # q, k and v biases; the k part must not matter
            state[prefix + "qkv.bias"] = torch.cat([torch.randn_like(value), torch.randn_like(value),
                                                    torch.randn_like(v)])
        elif not key.endswith("attn.v_bias"):
            state[key] = value
    state["pos_embed"] = torch.randn(1, 17, 32)
    state["mask_token"] = torch.zeros(1, 1, 16)
    state["decoder_embed.weight"] = torch.zeros(16, 32)
    path = tmp_path_factory.mktemp("mae") / "mae_encoder.pth"
    torch.save({"model": state}, path)
    return str(path), state


# ------------------------------------------------------------------------------------ 1. every row of every table

ROWS = [(t.key, r.key) for t in tables.TABLES.values() for r in t.rows]


def _row_args(table, row, mae_path):
    flags = tables.command_flags(table, row, lambda *dep: mae_path) + SMALL
    return parse(flags)


def _assert_row_structure(args, exp, depth, model, targets):
    """The row's decoders (context injection, depth, heads, trainable tensors), target encoder and masks."""
    assert (model.pixel_decoder is not None) == exp["pixel"]
    assert (model.feature_decoder is not None) == exp["feature"]
    decoders = ((model.pixel_decoder, exp["pixel_context"], 0), (model.feature_decoder, exp["feature_context"], 1))
    for dec, ctx, i in decoders:
        if dec is None:
            continue
        assert dec.has_context == (ctx is not None)
        assert all((blk.c_attn is not None) == (ctx is not None) for blk in dec.blocks)
        if ctx is not None:
            assert model.context_blocks[i] == ctx
        assert len(dec.blocks) == depth
        if len(exp["decoder"]) > 2:
            assert dec.blocks[0].attn.num_heads == exp["decoder"][2]
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("pixel_decoder.") for n in names) == exp["pixel"]
    assert any(n.startswith("feature_decoder.") for n in names) == exp["feature"]
    assert (targets.kind if targets is not None else None) == exp["target"]
    both = exp["target"] == "mae_new"
    if "k" in exp:
        assert (targets.slow if both else targets).k == exp["k"]
    if "tau" in exp:
        assert (targets.fast if both else targets).tau == exp["tau"]
    if "slow_weight" in exp:
        assert targets.slow_weight == exp["slow_weight"]
    gen = DataAugmentationForBootMAE(args).masked_position_generator
    if exp["mask"] == "random":
        assert isinstance(gen, masking_generator.RandomMaskingGenerator)
    else:
        assert isinstance(gen, masking_generator.ReleaseMaskingGenerator)
        assert (gen.max_swap, gen.num_block_patches) == ((0, 12) if exp["mask"] == "block" else (3, 10))


@pytest.mark.parametrize("table_key, row_key", ROWS, ids=[f"{t}/{r}" for t, r in ROWS])
def test_row_builds_what_it_describes_and_trains(table_key, row_key, mae_checkpoint):
    table = tables.TABLES[table_key]
    row = table.row(row_key)
    exp = row.expect
    if row.flags is None:   # no pretraining: nothing to build; the runner evaluates a fresh encoder
        assert exp == {"pretrain": False}
        return
    args = _row_args(table, row, mae_checkpoint[0])

    # the flags' decoder shape, before the test shrinks the widths
    kw = pretraining_state.model_kwargs(args)
    depth, width = exp["decoder"][:2]
    assert (kw.get("decoder_depth") or 2, kw.get("decoder_dim") or 512) == (depth, width)
    if len(exp["decoder"]) > 2:
        assert kw["decoder_num_heads"] == exp["decoder"][2]
    assert kw.get("feature_decoder_dim") == exp.get("feature_width")   # None: the encoder's width
    assert args.pixel_norm == exp.get("pixel_norm", "channel")

    torch.manual_seed(0)
    model = run_pretraining.build_model(args, **small_overrides(args))
    fixed = run_pretraining.load_fixed_target(args, model) if args.target_encoder == "fixed" else None
    targets = build_target_encoder(args, model, fixed)

    # structure: decoders, context injection, target encoder
    _assert_row_structure(args, exp, depth, model, targets)

    # two training steps (after a pixel-only warm-up epoch where the row has one)
    optimizer = create_optimizer(args, model)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    fed = []
    if targets is not None:
        record_target_inputs(targets, fed)
    lr, wd = schedules(args, 2)
    scaler = utils.LossScaler("cpu", fp16=False)
    warmup = exp.get("pixel_warmup", 0)
    if warmup:
        stats = train_one_epoch(model, targets, batches(args, 2, seed=1), optimizer, scaler, torch.device("cpu"), 0,
                                lr, wd, args)
        assert stats["feature_loss"] == 0 and stats["pixel_loss"] > 0 and fed == []
        assert not targets.fast.ready if targets.kind == "mae_new" else not targets.ready
    stats = train_one_epoch(model, targets, batches(args, 2), optimizer, scaler, torch.device("cpu"), warmup,
                            lr, wd, args)
    pixel_trains = exp["pixel"] and not warmup   # the tables' warm-up rows train features only afterwards
    assert (stats["pixel_loss"] > 0) == pixel_trains and (stats["pixel_weight"] > 0) == pixel_trains
    assert (stats["feature_loss"] > 0) == exp["feature"]
    # every trainable parameter of the branches in use got gradients: nothing unused under DDP
    steps = {n: int(optimizer.state[p]["step"]) if p in optimizer.state else 0 for n, p in model.named_parameters()}
    for name, count in steps.items():
        if warmup and name.startswith("pixel_decoder."):
            assert count == 2, name                       # trained in the warm-up epoch only
        elif warmup and name.startswith("feature_decoder."):
            assert count == 2, name                       # trained after the warm-up only
        else:
            assert count == 2 * (1 + bool(warmup)), name
    # the momentum encoder's input: the full image, or the fraction of the patches, drawn from the masked ones
    if exp["feature"]:
        fraction = exp.get("fraction", 1.0)
        per_step = 2 if exp["target"] == "mae_new" else 1
        assert fed == [16 if fraction == 1 else round(fraction * 16)] * (2 * per_step)
        assert stats["target_patches"] == (16 if fraction == 1 else round(fraction * 16))


def test_mae_baseline_has_no_feature_branch_at_full_size():
    """The MAE rows at full size: no feature-branch tensor anywhere, MAE's decoder (8 x 512, 16 heads, no
    cross-attention) and nothing that is not trained."""
    args = parse(list(tables.IMAGENET_BASE) + list(tables.MAE) + ["--data_set", "demo"])
    model = run_pretraining.build_model(args, depth=1)   # one encoder block keeps the test small
    assert model.feature_decoder is None and build_target_encoder(args, model) is None
    assert not any("feature" in k for k in model.state_dict())
    dec = model.pixel_decoder
    assert (len(dec.blocks), dec.embed.out_features, dec.blocks[0].attn.num_heads) == (8, 512, 16)
    assert all(b.c_attn is None for b in dec.blocks) and dec.blocks[0].attn.qkv.weight.shape == (1536, 512)


def test_default_flags_build_the_release_model():
    """No ablation flag: the release's BootMAE, tensor for tensor, initialised identically."""
    args = parse(["--model", "bootmae_tiny", "--input_size", "32", "--patch_size", "8", "--mask_num", "12",
                  "--num_mask_patches", "10", "--data_set", "demo"])
    assert pretraining_state.model_kwargs(args) == dict(img_size=32, patch_size=8, drop_path_rate=0.0,
                                                      decoder_dim=None, decoder_depth=None)
    torch.manual_seed(0)
    ours = run_pretraining.build_model(args).state_dict()
    torch.manual_seed(0)
    plain = mb.bootmae_tiny(img_size=32, patch_size=8, drop_path_rate=0.0).state_dict()
    assert ours.keys() == plain.keys()
    assert all(torch.equal(ours[k], plain[k]) for k in ours)


def test_no_pretraining_rows_are_in_the_report_tables():
    rows = [(t.key, r.key) for t in tables.TABLES.values() for r in t.rows if r.flags is None]
    assert rows == [("report_mae", "none")]


# ------------------------------------------------------------------------------------ 2. nonsense is refused

@pytest.mark.parametrize("flags, fragment", [
    (["--feature_weight", "0", "--target_encoder", "fixed", "--target_checkpoint", "{ckpt}"],
     "--target_encoder sets up the feature targets but --feature_weight 0"),
    (["--feature_weight", "0", "--target_fraction", "0.5"], "--target_fraction sets up the feature targets"),
    (["--feature_weight", "0", "--pixel_warmup_epochs", "1"], "--pixel_warmup_epochs sets up the feature targets"),
    (["--feature_weight", "0", "--context", "feature"], "--context feature sets up the feature targets"),
    (["--pixel_weight", "0", "--context", "pixel"], "--context pixel injects context into the pixel regressor, but"),
    (["--target_fraction", "0"], "--target_fraction 0.0 is outside (0, 1]"),
    (["--target_fraction", "1.5"], "--target_fraction 1.5 is outside (0, 1]"),
    (["--target_fraction", "0.9"], "drawn from the 12 masked ones; use at most 0.75"),
    (["--context_blocks", "0", "12"], "the feature block 12 is beyond the encoder's 12 blocks"),
    (["--context_blocks", "-13", "-1"], "the pixel block -13 is beyond the encoder's 12 blocks"),
    (["--pixel_weight", "0", "--feature_weight", "0"], "leave nothing to learn"),
    (["--target_encoder", "fixed"], "--target_encoder fixed needs --target_checkpoint"),
    (["--target_checkpoint", "{ckpt}"], "--target_checkpoint is only read by --target_encoder fixed"),
    (["--target_encoder", "fixed", "--target_checkpoint", "/nonexistent.pth"], "does not exist"),
    (["--target_encoder", "k_epoch", "--target_k", "0"], "--target_k 0 must be at least 1"),
    (["--target_encoder", "epoch_ema", "--target_tau", "0"], "--target_tau 0.0 is outside (0, 1]"),
    (["--target_tau", "1.5"], "--target_tau 1.5 is outside (0, 1]"),
    (["--pixel_warmup_epochs", "3", "--epochs", "3"], "--pixel_warmup_epochs 3 must be in 0..2"),
    (["--target_encoder", "k_epoch", "--no_model_ema"], "drop --no_model_ema"),
    (["--context", "none", "--context_blocks", "1", "2"], "--context_blocks has no effect with --context none"),
    (["--feature_ramp", "2"], "--feature_ramp 2.0 is outside [0, 1]"),
    (["--pixel_weight", "-1"], "must be >= 0"),
    (["--decoder_dim", "30"], "--decoder_dim 30 must be a positive multiple of 4"),
])
def test_nonsense_is_refused_with_one_line(flags, fragment, mae_checkpoint):
    flags = [mae_checkpoint[0] if f == "{ckpt}" else f for f in flags]
    with pytest.raises(utils.UsageError) as info:
        parse(["--model", "bootmae_tiny"] + SMALL + flags)
    msg = utils.one_line_error(info.value)
    assert "\n" not in str(info.value) and fragment in msg, msg


def test_cli_run_with_a_warmup_and_an_epoch_ema_target(tmp_path):
    """run_pretraining.py end to end: EMA-MAE with a one-epoch pixel warm-up. The log shows the pixel-only
    epoch, the checkpoint holds the target under ``target_encoder`` (no ``model_ema``), and --metrics_json
    has the last record and the seconds per step."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "run_pretraining.py", "--model", "bootmae_tiny", *SMALL,
                           "--encoder_depth", "2", "--decoder_dim", "16", "--decoder_depth", "1", "--demo_size", "8",
                           "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "0", "--pixel_weight", "0",
                           "--target_encoder", "epoch_ema", "--pixel_warmup_epochs", "1", "--feature_ramp", "0",
                           "--mask_type", "random",
                           "--output_dir", str(out), "--metrics_json", str(out / "metrics.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "target encoder: epoch_ema, 16 patches per image fed to it" in proc.stdout
    log = read_log(out)
    assert [(r["train_pixel_weight"], r["train_feature_weight"]) for r in log] == [(1.0, 0.0), (0.0, 1.0)]
    assert log[0]["train_feature_loss"] == 0 and log[1]["train_pixel_loss"] == 0 and log[1]["train_feature_loss"] > 0
    ckpt = checkpoints.load_checkpoint(str(out / "checkpoint-last.pth"))
    assert "model_ema" not in ckpt and ckpt["target_encoder"]["kind"] == "epoch_ema"
    encoder_keys = {k for k in ckpt["model"] if k.startswith(mb.ENCODER_PREFIXES)}
    assert ckpt["target_encoder"]["state"]["target"].keys() == encoder_keys
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epoch"] == 1 and metrics["s_per_step"] > 0 and metrics["trainable_parameters"] > 0


def test_cli_refuses_nonsense_with_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "run_pretraining.py", "--model", "bootmae_tiny", *SMALL,
                           "--target_fraction", "2", "--output_dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --target_fraction 2.0 is outside (0, 1]; give the fraction of the image fed to the momentum "
        "encoder, e.g. 0.25 or 1"]
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------ 3. the table scripts

def test_gather_renders_published_and_measured_numbers(tmp_path):
    table = tables.TABLES["paper_t5"]
    for i, row in enumerate(table.rows):
        d = tmp_path / table.key / row.key
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"finetune_top1": 80.0 + i, "pretrain": {"s_per_step": 0.1 * i}}))
    proc = subprocess.run([sys.executable, "scripts/ablations/gather.py", "paper_t5", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "### Paper Table 5: fraction of the image fed to the momentum encoder"
    assert lines[2] == ("| row | flags | fine-tune (published) | iter time (s) (published) | fine-tune (ours) | "
                        "s/step (ours) |")
    assert ("| BootMAE, 25 % (sampled from the masked patches) | BootMAE + `--target_fraction 0.25` | 83.8 | 0.407 | "
            "81.00 | 0.100 |") in proc.stdout
