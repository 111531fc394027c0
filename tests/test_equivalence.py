"""Equivalence with the authors' released implementation.

``data/official_small_reference.pt`` holds, for a small configuration (32 px images, 4 px patches, width 96,
4 blocks, 6 heads, pixel decoder width 64, context from blocks 0 and 3), the release's weights in its own
key names (an online model and a second model used as momentum encoder), inputs, a mask, and the outputs
and losses the release computed from them in float32.
"""
import os

import pytest
import timm
import torch

import modeling_bootmae as mb
from engine_for_pretraining import bootmae_loss, normalized_pixel_target, unpatchify

REF = os.path.join(os.path.dirname(__file__), "data", "official_small_reference.pt")
TOL = 1e-5


@pytest.fixture(scope="module")
def ref():
    return torch.load(REF, weights_only=True)


@pytest.fixture(scope="module")
def outputs(ref):
    student = mb.from_release(ref["config"], ref["student_state_dict"]).eval()
    teacher = mb.from_release(ref["config"], ref["teacher_state_dict"]).eval()
    with torch.no_grad():
        pixel_pred, feature_pred = student(ref["images"], ref["mask"])
        targets = teacher.target_features(ref["images"])
    return student, pixel_pred, feature_pred, targets


def test_pixel_predictions(ref, outputs):
    _, pixel_pred, _, _ = outputs
    P = ref["config"]["patch_size"]
    grid = (ref["images"].shape[-2] // P, ref["images"].shape[-1] // P)
    assert pixel_pred.shape == (4, 64, P * P * 3)
    torch.testing.assert_close(unpatchify(pixel_pred, P, grid), ref["pixel_pred"], atol=TOL, rtol=0)


def test_feature_predictions_and_targets(ref, outputs):
    _, _, feature_pred, targets = outputs
    torch.testing.assert_close(feature_pred, ref["feature_pred"], atol=TOL, rtol=0)
    torch.testing.assert_close(targets, ref["teacher_features"], atol=TOL, rtol=0)


def test_pixel_target(ref):
    P = ref["config"]["patch_size"]
    target = unpatchify(normalized_pixel_target(ref["images"], P), P, (8, 8))
    torch.testing.assert_close(target, ref["pixel_target"], atol=TOL, rtol=0)


@pytest.mark.parametrize("weighted", [False, True])
def test_losses(ref, outputs, weighted):
    _, pixel_pred, feature_pred, targets = outputs
    pixel, feature = bootmae_loss(pixel_pred, feature_pred, targets, ref["images"], ref["mask"],
                                  ref["config"]["patch_size"], weight_mask=weighted)
    suffix = "_weighted" if weighted else ""
    assert abs(pixel.item() - ref["loss_pixel" + suffix].item()) < TOL
    assert abs(feature.item() - ref["loss_feature" + suffix].item()) < TOL


def test_fixed_position_tables_match_release(ref, outputs):
    student = outputs[0]
    torch.testing.assert_close(student.pos_embed, ref["student_state_dict"]["pos_embed"], atol=1e-6, rtol=0)
    torch.testing.assert_close(student.decoder_pos_embed, ref["student_state_dict"]["de_pos_embed"],
                               atol=1e-6, rtol=0)


def test_release_round_trip(ref, outputs):
    student = outputs[0]
    back = mb.to_release_state_dict(student)
    original = ref["student_state_dict"]
    assert set(back) == set(original)
    for key, value in original.items():
        assert back[key].shape == value.shape, key
        torch.testing.assert_close(back[key], value, atol=1e-6, rtol=0)
    assert mb.release_config(student) == {**ref["config"], "mlp_ratio": 4.0}


def test_release_pixel_decoder_inner_width(ref):
    # 64 // 6 = 10 per head: the pixel decoder's attention is 60 wide, as in the release
    model = mb.from_release(ref["config"], ref["student_state_dict"])
    assert model.pixel_decoder.blocks[0].attn.qkv.weight.shape == (180, 64)
    assert model.pixel_decoder.blocks[0].c_attn.kv.weight.shape == (120, 96)


@pytest.mark.parametrize("name,count", [("bootmae_base", 115_373_251), ("bootmae_large", 349_149_187)])
def test_trainable_parameter_counts(name, count):
    model = timm.create_model(name)
    assert mb.count_trainable(model) == count
