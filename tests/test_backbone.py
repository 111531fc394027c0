"""The dense-prediction backbone (backbone_vit.py) in plain PyTorch: pyramid shapes and strides, that it is the
repository's encoder (same block outputs, recomputed sin-cos table, padding), weight loading and conversion
from pretraining checkpoints (ours and the release's, online and momentum encoder), the layer-decay groups,
the release's fine-tuning layout, and weights-only loading of checkpoints with numpy objects."""
import argparse
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import backbone_vit
import convert_checkpoint
import modeling_bootmae
import utils
import vit_layers
from backbone_vit import ViTPyramid, default_out_indices
from openmmlab_glue import layer_decay_param_groups
from vit_layers import relative_position_index

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(embed_dim=96, depth=4, num_heads=3)


def perturbed(model, seed=0):
    """Random values in every parameter and buffer, so a copy that missed one shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def tiny_pyramid(**kw):
    return ViTPyramid(img_size=64, norm="BN", **{**TINY, **kw})


# ---------------------------------------------------------------------------------------------- structure

def test_feature_blocks_are_4_6_8_12_scaled():
    assert default_out_indices(12) == [3, 5, 7, 11]         # blocks 4, 6, 8, 12 (the release's out_indices)
    assert default_out_indices(24) == [7, 11, 15, 23]       # ViT-L: BEiT's large config
    assert default_out_indices(4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="too shallow"):
        default_out_indices(2)


@pytest.mark.parametrize("size", [(512, 512), (200, 137)])
def test_pyramid_shapes_and_strides(size):
    torch.manual_seed(0)
    model = ViTPyramid(img_size=512, norm="BN", **TINY).eval()
    H, W = size
    with torch.no_grad():
        outs = model(torch.randn(1, 3, H, W))
    gh, gw = math.ceil(H / 16), math.ceil(W / 16)   # inputs are padded up to a multiple of the patch size
    expected = [(gh * 4, gw * 4), (gh * 2, gw * 2), (gh, gw), (gh // 2, gw // 2)]
    assert [tuple(o.shape[-2:]) for o in outs] == expected
    assert all(o.shape[:2] == (1, 96) for o in outs)
    assert model.out_strides == (4, 8, 16, 32)
    if size == (512, 512):
        assert [512 // s for s in model.out_strides] == [e[0] for e in expected]


def test_pyramid_is_the_encoder_with_padding_and_recomputed_sincos():
    """fpn3 (x1) is block 8's token map and fpn4 block 12's max-pooled, exactly as the repository's
    VisionTransformer computes them on the zero-padded image with the sin-cos table of the padded grid."""
    torch.manual_seed(0)
    model = perturbed(tiny_pyramid(out_indices=[0, 1, 2, 3])).eval()
    x = torch.randn(2, 3, 40, 27)
    padded = F.pad(x, (0, 5, 0, 8))                              # 48 x 32: a 3 x 2 grid
    with torch.no_grad():
        outs = model(x)
        ref_outs = model(padded)
        _, blocks = modeling_bootmae.VisionTransformer.forward_features(model, padded, return_blocks=(2, 3))
    for a, b in zip(outs, ref_outs):
        torch.testing.assert_close(a, b)
    grid = lambda t: t[:, 1:].transpose(1, 2).reshape(2, 96, 3, 2)
    torch.testing.assert_close(outs[2], grid(blocks[2]))
    torch.testing.assert_close(outs[3], F.max_pool2d(grid(blocks[3]), 2))
    torch.testing.assert_close(model.get_pos_embed((3, 2)), modeling_bootmae.sincos_pos_embed_2d(96, 3, 2))
    assert isinstance(model.blocks[0], modeling_bootmae.Block)
    assert "pos_embed" not in model.state_dict()                 # a fixed table, not a weight


def test_drop_path_and_grad_checkpointing():
    model = ViTPyramid(img_size=64, norm="BN", drop_path_rate=0.1, with_cp=True, **TINY)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
    assert model.grad_checkpointing
    sum(o.sum() for o in model(torch.randn(2, 3, 64, 48))).backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


# ------------------------------------------------------------------------------------------------- weights

@pytest.fixture(scope="module")
def pretraining_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    online = perturbed(modeling_bootmae.BootMAE(img_size=32, decoder_dim=64, decoder_depth=1, **TINY), seed=1)
    ema = perturbed(modeling_bootmae.BootMAE(img_size=32, decoder_dim=64, decoder_depth=1, **TINY), seed=2)
    ours = root / "ours.pth"
    torch.save({"model": online.state_dict(), "model_ema": ema.state_dict(), "epoch": 3,
                "args": argparse.Namespace(model="bootmae_tiny")}, ours)
    release = root / "release.pth"
    torch.save({"model": modeling_bootmae.to_release_state_dict(online), "args": argparse.Namespace()}, release)
    return online, ema, ours, release


def encoder_tensors(model):
    return {k: v for k, v in model.state_dict().items() if k.startswith(("patch_embed.", "cls_token", "blocks."))}


@pytest.mark.parametrize("which", ["ours", "ours_ema", "release"])
def test_weights_from_pretraining_checkpoint_equal_the_encoder(pretraining_checkpoints, which, capsys):
    online, ema, ours, release = pretraining_checkpoints
    path, key, source = {"ours": (ours, "model", online), "ours_ema": (ours, "model_ema", ema),
                         "release": (release, "model", online)}[which]
    model = tiny_pyramid(pretrained=str(path), model_key=key)
    model.init_weights()
    expected = encoder_tensors(source)
    got = model.state_dict()
    assert len(expected) == 4 * 13 + 3   # 13 tensors per block, patch embedding (2), cls token
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)
    report = capsys.readouterr().out
    assert f"loaded {len(expected)} tensors" in report
    assert "newly initialised (not in the checkpoint): fpn1.0, fpn1.1, fpn1.3, fpn2.0" in report
    assert "not used: norm" in report                            # the final norm: the pyramid reads blocks


def test_converter_cli_writes_backbone_weights(pretraining_checkpoints, tmp_path, capsys):
    online, ema, ours, _ = pretraining_checkpoints
    out = tmp_path / "backbone.pth"
    assert convert_checkpoint.main(["convert", "--checkpoint", str(ours), "--model_key", "model_ema",
                                    "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "loaded 55 tensors" in text and "width 96, depth 4, patch 16" in text
    saved = torch.load(out, weights_only=True)
    assert set(saved["model"]) == set(encoder_tensors(ema)) and saved["meta"]["model_key"] == "model_ema"
    model = tiny_pyramid(pretrained=str(out))
    model.init_weights()
    for k, v in encoder_tensors(ema).items():
        assert torch.equal(model.state_dict()[k], v), k


def test_converter_errors_are_one_line(tmp_path, capsys):
    assert convert_checkpoint.main(["convert", "--checkpoint", str(tmp_path / "nope.pth"), "--output",
                                    str(tmp_path / "o.pth")]) == 2
    assert "does not exist" in capsys.readouterr().err
    torch.save({"model": {"head.weight": torch.zeros(2)}}, tmp_path / "bad.pth")
    assert convert_checkpoint.main(["convert", "--checkpoint", str(tmp_path / "bad.pth"), "--output",
                                    str(tmp_path / "o.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no encoder tensors" in err and len(err.strip().splitlines()) == 1


def test_backbone_vit_runs_the_converter_command_line(pretraining_checkpoints, tmp_path):
    """README's `python backbone_vit.py convert ...` writes what convert_checkpoint's command line writes."""
    _, _, ours, _ = pretraining_checkpoints
    proc = subprocess.run([sys.executable, "backbone_vit.py", "convert", "--checkpoint", str(ours), "--output",
                           str(tmp_path / "script.pth")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert convert_checkpoint.main(["convert", "--checkpoint", str(ours), "--output", str(tmp_path / "main.pth")]) == 0
    script, main = (torch.load(tmp_path / name, weights_only=True) for name in ("script.pth", "main.pth"))
    assert script["meta"] == main["meta"] and set(script["model"]) == set(main["model"])
    assert all(torch.equal(v, main["model"][k]) for k, v in script["model"].items())


def test_wrong_size_is_a_usage_error(pretraining_checkpoints):
    _, _, ours, _ = pretraining_checkpoints
    model = ViTPyramid(img_size=64, norm="BN", embed_dim=192, depth=4, num_heads=3, pretrained=str(ours))
    with pytest.raises(utils.UsageError, match="does not fit"):
        model.init_weights()


# --------------------------------------------------------------------------------------------- layer decay

class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = tiny_pyramid()
        self.neck = nn.Conv2d(96, 8, 1)
        self.head = nn.Linear(8, 2)


def test_layer_decay_scales_follow_the_rule():
    model = Detector()
    groups = layer_decay_param_groups(model, lr=4e-4, weight_decay=0.05, layer_decay=0.65)
    L = 4
    seen = {}
    for g in groups:
        for name in g["param_names"]:
            seen[name] = g
    assert set(seen) == {n for n, _ in model.named_parameters()}
    for name, g in seen.items():
        if name.startswith("backbone.blocks."):
            layer = int(name.split(".")[2]) + 1
        elif name.startswith(("backbone.patch_embed", "backbone.cls_token")):
            layer = 0
        else:                                                    # pyramid, neck, heads
            layer = L + 1
        assert g["layer_id"] == layer, name
        assert g["lr_scale"] == pytest.approx(0.65 ** (L + 1 - layer)), name
        assert g["lr"] == pytest.approx(4e-4 * 0.65 ** (L + 1 - layer)), name
        # the same rule as fine-tuning
        if name.startswith("backbone."):
            assert g["layer_id"] == modeling_bootmae.encoder_layer_id(name[len("backbone."):], L)
        no_decay = name.endswith(("bias", "norm1.weight", "norm2.weight", "cls_token", "fpn1.1.weight"))
        assert g["weight_decay"] == (0.0 if no_decay else 0.05), name
    # block 0 vs block 3 (last): one factor 0.65 per block
    s = {int(n.split(".")[2]): seen[n]["lr_scale"] for n in seen if n.endswith("attn.qkv.weight")}
    assert [s[b] / s[b + 1] for b in range(3)] == pytest.approx([0.65] * 3)


def test_layer_decay_release_layout_extras():
    model = Detector()
    model.backbone = tiny_pyramid(release_layout=True)
    groups = layer_decay_param_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.75)
    where = {n: g for g in groups for n in g["param_names"]}
    assert where["backbone.pos_embed"]["layer_id"] == 0 and where["backbone.pos_embed"]["weight_decay"] == 0
    assert where["backbone.blocks.2.gamma_1"]["layer_id"] == 3
    assert where["backbone.blocks.2.attn.relative_position_bias_table"]["layer_id"] == 3


# -------------------------------------------------------------------------------- the release's layout

def test_release_layout_at_start_equals_the_plain_encoder():
    """Zero relative bias, unit layer scale and the sin-cos table as the learned start: the same function."""
    plain = perturbed(tiny_pyramid()).eval()
    release = tiny_pyramid(release_layout=True).eval()
    result = release.load_state_dict(plain.state_dict(), strict=False)
    assert set(result.missing_keys) == {"pos_embed"} | {f"blocks.{i}.{n}" for i in range(4) for n in
                                                        ("gamma_1", "gamma_2", "attn.relative_position_bias_table")}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(plain(x), release(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_release_block_matches_beit_formula():
    """One block with a random relative bias and layer scale against BEiT's explicit computation."""
    torch.manual_seed(0)
    model = perturbed(tiny_pyramid(release_layout=True), seed=3).eval()
    blk, attn = model.blocks[1], model.blocks[1].attn
    x = torch.randn(2, 1 + 16, 96)
    with torch.no_grad():
        got = blk(x, (4, 4))
        h = blk.norm1(x)
        qkv = F.linear(h, attn.qkv.weight, torch.cat([attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias]))
        q, k, v = qkv.reshape(2, 17, 3, 3, 32).permute(2, 0, 3, 1, 4)
        logits = (q * 32 ** -0.5) @ k.transpose(-2, -1)
        index = relative_position_index(4, 4)
        logits = logits + attn.relative_position_bias_table[index.view(-1)].view(17, 17, 3).permute(2, 0, 1)
        a = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 17, 96))
        ref = x + blk.gamma_1 * a
        ref = ref + blk.gamma_2 * blk.mlp(blk.norm2(ref))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # the release layout runs the one Block / Attention forward, through attention() and both its kernels
    assert type(blk) is modeling_bootmae.Block and type(attn) is vit_layers.Attention
    with torch.no_grad(), modeling_bootmae.fused_attention(False):
        torch.testing.assert_close(blk(x, (4, 4)), ref, rtol=1e-4, atol=1e-5)


def test_relative_position_index_layout():
    idx = relative_position_index(2, 3)
    num = 3 * 5 + 3
    assert idx.shape == (7, 7) and idx.max() == num - 1
    assert idx[0, 0] == num - 1 and (idx[0, 1:] == num - 3).all() and (idx[1:, 0] == num - 2).all()
    # patch (r, c) to itself: the centre offset (h-1, w-1) -> (h-1)*(2w-1) + (w-1)
    assert (idx[1:, 1:].diagonal() == 1 * 5 + 2).all()


def test_release_upernet_conversion(tmp_path, capsys):
    """A checkpoint laid out as the release's UperNet (mmseg 0.x: state_dict with backbone.*, the BEiT
    backbone's relative_position_index buffers, heads, meta, optimizer) -> model tensors only."""
    backbone = perturbed(ViTPyramid(img_size=64, norm="BN", release_layout=True, **TINY))
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    for i in range(4):
        state[f"backbone.blocks.{i}.attn.relative_position_index"] = relative_position_index(4, 4)
    state["decode_head.conv_seg.weight"] = torch.randn(150, 16, 1, 1)
    state["auxiliary_head.conv_seg.weight"] = torch.randn(150, 8, 1, 1)
    src = tmp_path / "upernet.pth"
    torch.save({"meta": {"iter": 160000, "CLASSES": ("wall",), "PALETTE": [[1, 2, 3]]}, "state_dict": state,
                "optimizer": {"state": {}}}, src)
    out = tmp_path / "converted.pth"
    assert convert_checkpoint.main(["convert-release-upernet", "--checkpoint", str(src), "--output", str(out)]) == 0
    assert "heads: auxiliary_head, decode_head" in capsys.readouterr().out
    saved = torch.load(out, weights_only=True)
    assert not any(k.endswith("relative_position_index") for k in saved["state_dict"])
    fresh = ViTPyramid(img_size=64, norm="BN", release_layout=True, **TINY)
    fresh.load_pretrained(str(out), verbose=False)
    for k, v in backbone.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    x = torch.randn(1, 3, 64, 48)   # another grid than the tables': the resized relative bias and positions
    with torch.no_grad():
        for a, b in zip(fresh.eval()(x), backbone.eval()(x)):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------- safe loading

class NotAllowed:
    pass


def test_weights_only_loading_of_numpy_objects(tmp_path):
    """OpenMMLab's checkpoints carry numpy values in their meta / message hub: torch >= 2.6's default
    weights-only load rejects them; load_openmmlab_checkpoint allows exactly those types."""
    path = tmp_path / "mm.pth"
    torch.save({"state_dict": {"backbone.cls_token": torch.zeros(1, 1, 4)},
                "meta": {"best": np.float64(0.5), "hist": np.arange(3, dtype=np.float32)}}, path)
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)
    ckpt = backbone_vit.load_openmmlab_checkpoint(str(path))
    assert ckpt["meta"]["best"] == 0.5 and ckpt["meta"]["hist"].tolist() == [0, 1, 2]
    # safe loading is still on outside and inside: another class is refused and named
    bad = tmp_path / "bad.pth"
    torch.save({"x": NotAllowed()}, bad)
    with pytest.raises(utils.UsageError, match="NotAllowed"):
        backbone_vit.load_openmmlab_checkpoint(str(bad))
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)


# ----------------------------------------------------------------------------------------- shipped configs

def read_config(rel):
    """A shipped config without OpenMMLab: the top-level configs are plain Python dicts."""
    import runpy
    import os
    return runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), rel))


def backbone_from(cfg):
    kw = {k: v for k, v in cfg["model"]["backbone"].items() if k != "type"}
    return ViTPyramid(**{**kw, "depth": 12, "norm": "BN"})


def test_segmentation_config_is_the_papers():
    cfg = read_config("semantic_segmentation/configs/upernet_bootmae_base_512_160k_ade20k.py")
    m = cfg["model"]
    assert m["type"] == "EncoderDecoder" and m["decode_head"]["type"] == "UPerHead"
    assert m["auxiliary_head"]["type"] == "FCNHead" and m["auxiliary_head"]["loss_decode"]["loss_weight"] == 0.4
    assert m["decode_head"]["num_classes"] == 150 and m["decode_head"]["in_channels"] == [768] * 4
    b = m["backbone"]
    assert b["type"] == "BootMAEViT" and (b["embed_dim"], b["depth"], b["num_heads"], b["patch_size"]) == (768, 12, 12, 16)
    assert b["out_indices"] == [3, 5, 7, 11] == default_out_indices(12)     # blocks 4, 6, 8, 12
    assert b["drop_path_rate"] == 0.1 and not b.get("release_layout", False)
    assert cfg["crop_size"] == (512, 512) and m["test_cfg"]["mode"] == "slide"
    opt = cfg["optim_wrapper"]
    assert opt["optimizer"]["type"] == "AdamW" and opt["optimizer"]["lr"] == 4e-4
    assert opt["optimizer"]["weight_decay"] == 0.05
    assert opt["constructor"] == "LayerDecayOptimWrapperConstructor"
    assert opt["paramwise_cfg"] == dict(num_layers=12, layer_decay_rate=0.65)
    # batch 16 = 8 GPUs x 2, 160k iterations, 1500 warm-up iterations then linear (poly, power 1) decay to 0
    assert cfg["train_dataloader"]["batch_size"] * 8 == 16 == cfg["auto_scale_lr"]["base_batch_size"]
    assert cfg["train_cfg"]["max_iters"] == 160000
    warm, decay = cfg["param_scheduler"]
    # (mmengine's linear/poly schedulers reach their end value at iteration end - 1)
    assert warm["type"] == "LinearLR" and (warm["begin"], warm["end"] - 1) == (0, 1500) and not warm["by_epoch"]
    assert warm["start_factor"] == 1e-6
    assert decay["type"] == "PolyLR" and decay["power"] == 1.0 and decay["eta_min"] == 0.0
    assert (decay["begin"], decay["end"] - 1) == (0, 160000) and not decay["by_epoch"]
    # the default mmseg ADE20K augmentation: rescale 0.5-2.0, 512 crop, flip, photometric distortion
    steps = {t["type"]: t for t in cfg["train_pipeline"]}
    assert steps["RandomResize"]["ratio_range"] == (0.5, 2.0) and steps["RandomResize"]["scale"] == (2048, 512)
    assert steps["RandomCrop"]["crop_size"] == (512, 512) and steps["RandomFlip"]["prob"] == 0.5
    assert "PhotoMetricDistortion" in steps and steps["LoadAnnotations"]["reduce_zero_label"]
    # the release's 0.5 / 0.5 normalisation (the pretraining default)
    assert m["data_preprocessor"]["mean"] == [127.5] * 3 and m["data_preprocessor"]["std"] == [127.5] * 3
    model = backbone_from(cfg)
    assert model.out_indices == [3, 5, 7, 11] and model.blocks[-1].drop_path.drop_prob == pytest.approx(0.1)


def test_detection_config_is_the_papers():
    cfg = read_config("detection/configs/mask_rcnn_bootmae_base_fpn_1x_coco.py")
    m = cfg["model"]
    assert m["type"] == "MaskRCNN" and m["neck"]["type"] == "FPN" and m["neck"]["in_channels"] == [768] * 4
    assert m["roi_head"]["bbox_head"]["num_classes"] == 80 and m["roi_head"]["mask_head"]["num_classes"] == 80
    b = m["backbone"]
    assert b["type"] == "BootMAEViT" and b["out_indices"] == [3, 5, 7, 11] and b["drop_path_rate"] == 0.1
    opt = cfg["optim_wrapper"]
    assert opt["optimizer"]["type"] == "AdamW" and opt["optimizer"]["lr"] == 4e-4
    assert opt["optimizer"]["weight_decay"] == 0.05
    assert opt["paramwise_cfg"] == dict(num_layers=12, layer_decay_rate=0.75)
    assert cfg["train_dataloader"]["batch_size"] * 8 == 16 == cfg["auto_scale_lr"]["base_batch_size"]
    assert cfg["train_cfg"]["max_epochs"] == 12
    step = cfg["param_scheduler"][-1]
    assert step["type"] == "MultiStepLR" and step["milestones"] == [8, 11] and step["gamma"] == 0.1
    for pipeline in (cfg["train_pipeline"], cfg["test_pipeline"]):
        resize = next(t for t in pipeline if t["type"] == "Resize")
        assert resize["scale"] == (1333, 800) and resize["keep_ratio"]      # short 800, long <= 1333
    # the pyramid's strides are the FPN's and the RoI extractors'
    model = backbone_from(cfg)
    assert list(model.out_strides) == m["roi_head"]["bbox_roi_extractor"]["featmap_strides"]
    assert list(model.out_strides) == m["rpn_head"]["anchor_generator"]["strides"][:4]
