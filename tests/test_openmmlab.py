"""Integration with OpenMMLab: the shipped UperNet (mmsegmentation 1.x) and Mask R-CNN (mmdetection 3.x) configs
built with a tiny backbone, one training step and one inference each on CPU with random data, the layer-decay
constructor and the lr schedule inside mmengine, the release's multi-scale test pipeline, and a short run of
the segmentation entry points whose checkpoint (with mmengine's non-tensor objects) is loaded weights-only.

Needs mmcv with its compiled ops, mmsegmentation and mmdetection: `bash setup_openmmlab.sh`."""
import copy
import os

import numpy as np
import pytest
import torch

try:
    import mmcv.ops  # noqa: F401  (RoIAlign / NMS of Mask R-CNN must be compiled)
    import mmdet  # noqa: F401
    import mmseg  # noqa: F401
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmengine.structures import InstanceData, PixelData
except ImportError as e:
    pytest.skip(f"OpenMMLab (mmcv with ops, mmsegmentation, mmdetection) is not installed ({e}); "
                f"enable with: bash setup_openmmlab.sh", allow_module_level=True)

import backbone_vit
from tiny_coco import write_tiny_ade20k, write_tiny_coco

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEG_CFG = os.path.join(ROOT, "semantic_segmentation/configs/upernet_bootmae_base_512_160k_ade20k.py")
SEG_MS_CFG = os.path.join(ROOT, "semantic_segmentation/configs/upernet_bootmae_base_512_160k_ade20k_ms_test.py")
SEG_RELEASE_CFG = os.path.join(ROOT, "semantic_segmentation/configs/upernet_bootmae_base_release_layout_512_160k_ade20k.py")
DET_CFG = os.path.join(ROOT, "detection/configs/mask_rcnn_bootmae_base_fpn_1x_coco.py")
TINY = dict(embed_dim=96, depth=4, num_heads=3, out_indices=[0, 1, 2, 3], img_size=64)


def tiny_seg_cfg(path=SEG_CFG):
    cfg = Config.fromfile(path)
    cfg.model.backbone.update(TINY)
    cfg.model.decode_head.update(in_channels=[96] * 4, channels=32)
    cfg.model.auxiliary_head.update(in_channels=96, channels=16)
    cfg.model.data_preprocessor.size = (64, 64)
    cfg.model.test_cfg = dict(mode="slide", crop_size=(64, 64), stride=(43, 43))
    cfg.optim_wrapper.paramwise_cfg.num_layers = 4
    return cfg


def tiny_det_cfg():
    cfg = Config.fromfile(DET_CFG)
    cfg.model.backbone.update(TINY)
    cfg.model.neck.update(in_channels=[96] * 4, out_channels=32)
    cfg.model.rpn_head.update(in_channels=32, feat_channels=32)
    roi = cfg.model.roi_head
    roi.bbox_roi_extractor.out_channels = 32
    roi.mask_roi_extractor.out_channels = 32
    roi.bbox_head.update(in_channels=32, fc_out_channels=64)
    roi.mask_head.update(in_channels=32, conv_out_channels=32)
    # random weights score low: keep every detection so the output format is exercised
    cfg.model.test_cfg.rcnn.score_thr = 0.0
    cfg.optim_wrapper.paramwise_cfg.num_layers = 4
    return cfg


def build(cfg, scope):
    with DefaultScope.overwrite_default_scope(scope):
        if scope == "mmseg":
            from mmseg.registry import MODELS
        else:
            from mmdet.registry import MODELS
        model = MODELS.build(cfg.model)
        model.init_weights()
        from mmengine.optim import build_optim_wrapper
        optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    return model, optim_wrapper


def build_from_seed(cfg, scope):
    """``build`` after seeding torch with 0; the model's backbone is this repository's."""
    torch.manual_seed(0)
    model, optim_wrapper = build(cfg, scope)
    assert type(model.backbone) is backbone_vit.ViTPyramid
    return model, optim_wrapper


def group_lr(optim_wrapper, model, name):
    param = dict(model.named_parameters())[name]
    return next(g["lr"] for g in optim_wrapper.optimizer.param_groups if any(p is param for p in g["params"]))


def changed(before, model):
    return [n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())]


# ------------------------------------------------------------------------------------------- segmentation

def seg_batch(sizes, seed=0):
    from mmseg.structures import SegDataSample
    g = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for h, w in sizes:
        inputs.append(torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8))
        label = torch.randint(0, 150, (1, h, w), generator=g)
        label[:, : h // 8] = 255   # ignored pixels, as the padding
        s = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w)))
        s.gt_sem_seg = PixelData(data=label)
        samples.append(s)
    return dict(inputs=inputs, data_samples=samples)


def test_upernet_from_config_trains_and_predicts():
    model, optim_wrapper = build_from_seed(tiny_seg_cfg(), "mmseg")
    # layer decay inside mmengine: block b gets 0.65 ** (L + 1 - (b + 1)), heads the base lr
    base = 4e-4
    assert group_lr(optim_wrapper, model, "backbone.blocks.0.attn.qkv.weight") == pytest.approx(base * 0.65 ** 4)
    assert group_lr(optim_wrapper, model, "backbone.blocks.3.attn.qkv.weight") == pytest.approx(base * 0.65)
    assert group_lr(optim_wrapper, model, "backbone.cls_token") == pytest.approx(base * 0.65 ** 5)
    assert group_lr(optim_wrapper, model, "decode_head.conv_seg.weight") == pytest.approx(base)
    assert group_lr(optim_wrapper, model, "backbone.fpn1.0.weight") == pytest.approx(base)
    assert optim_wrapper.clip_grad_kwargs == dict(max_norm=3.0, norm_type=2)

    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with DefaultScope.overwrite_default_scope("mmseg"):
        log_vars = model.train_step(seg_batch([(64, 64), (48, 64)]), optim_wrapper)
    assert {"loss", "decode.loss_ce", "aux.loss_ce", "decode.acc_seg"} <= set(log_vars)
    assert torch.isfinite(log_vars["loss"])
    moved = changed(before, model)
    assert any(n.startswith("backbone.blocks.0.") for n in moved) and any(n.startswith("decode_head.") for n in moved)

    model.eval()
    with DefaultScope.overwrite_default_scope("mmseg"), torch.no_grad():
        # a non-square size that is no multiple of 16 (nor of the 64 crop): slide windows + backbone padding
        out = model.test_step(seg_batch([(70, 50)], seed=1))
    assert len(out) == 1
    pred, logits = out[0].pred_sem_seg.data, out[0].seg_logits.data
    assert pred.shape == (1, 70, 50) and logits.shape == (150, 70, 50)
    assert pred.dtype == torch.int64 and 0 <= int(pred.min()) and int(pred.max()) < 150


def test_release_layout_upernet_builds_and_predicts():
    model, _ = build(tiny_seg_cfg(SEG_RELEASE_CFG), "mmseg")
    assert model.backbone.release_layout and "backbone.blocks.0.gamma_1" in dict(model.named_parameters())
    model.eval()
    with DefaultScope.overwrite_default_scope("mmseg"), torch.no_grad():
        out = model.test_step(seg_batch([(64, 64)]))
    assert out[0].pred_sem_seg.data.shape == (1, 64, 64)


def test_seg_schedule_is_the_releases_poly_with_warmup():
    """LinearLR over the first iterations and PolyLR over all of them, multiplied: the release's mmcv
    'poly' policy with linear warm-up, lr(i) = lr (1 - i/T) (r + (1 - r) min(i/W, 1))."""
    from mmengine.registry import PARAM_SCHEDULERS
    cfg = Config.fromfile(SEG_CFG)
    T, W = 200, 15   # the config's schedule, shortened
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=4e-4)
    scheds = []
    for s in copy.deepcopy(cfg.param_scheduler):
        # the config's ends are warm-up + 1 and max_iters + 1
        s["end"] = (W if s["type"] == "LinearLR" else T) + 1
        scheds.append(PARAM_SCHEDULERS.build(dict(s, optimizer=opt)))
    r = cfg.param_scheduler[0]["start_factor"]
    for i in range(T):
        expected = 4e-4 * (1 - i / T) * (r + (1 - r) * min(i / W, 1.0))
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-6, abs=1e-12), i
        for s in scheds:
            s.step()


def test_release_multiscale_flip_pipeline(tmp_path):
    """The ms-test config: 6 scales x 2 flips; the short side is max(512, 512 x ratio) (SETR_Resize)."""
    import cv2
    from mmcv.transforms import Compose
    from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    cfg = Config.fromfile(SEG_MS_CFG)
    assert cfg.test_time_aug and cfg.tta_model.type == "SegTTAModel"
    img = tmp_path / "a.jpg"
    seg = tmp_path / "a.png"
    cv2.imwrite(str(img), np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    cv2.imwrite(str(seg), np.ones((300, 400), dtype=np.uint8))
    with DefaultScope.overwrite_default_scope("mmseg"):
        pipeline = Compose(cfg.tta_pipeline)
        out = pipeline(dict(img_path=str(img), seg_map_path=str(seg), reduce_zero_label=True, seg_fields=[]))
    shapes = [tuple(x.shape[-2:]) for x in out["inputs"]]
    flips = [s.metainfo["flip"] for s in out["data_samples"]]
    assert len(shapes) == 12 and flips.count(True) == 6
    assert sorted({min(s) for s in shapes}) == [512, 640, 768, 896]
    assert [min(s) for s in shapes].count(512) == 6   # ratios 0.5, 0.75, 1.0, each plain and flipped


def test_seg_entry_points_train_resume_and_test(tmp_path, capsys):
    """train.py for 2 iterations on a 2-image ADE20K-shaped folder, from a pretraining checkpoint; test.py on
    the checkpoint it wrote, which holds mmengine's message hub (HistoryBuffer, numpy) and loads weights-only."""
    import argparse
    import modeling_bootmae
    root = tmp_path / "ade"
    write_tiny_ade20k(root)
    pre = tmp_path / "pre.pth"
    enc = modeling_bootmae.BootMAE(img_size=32, decoder_dim=32, decoder_depth=1, embed_dim=96, depth=4, num_heads=3)
    torch.save({"model": enc.state_dict(), "args": argparse.Namespace()}, pre)
    work = tmp_path / "work"
    small = ["model.backbone.embed_dim=96", "model.backbone.depth=4", "model.backbone.num_heads=3",
             "model.backbone.out_indices=[0,1,2,3]", "model.backbone.img_size=64",
             "model.decode_head.in_channels=[96,96,96,96]", "model.decode_head.channels=32",
             "model.auxiliary_head.in_channels=96", "model.auxiliary_head.channels=16",
             "model.data_preprocessor.size=(64,64)", "optim_wrapper.paramwise_cfg.num_layers=4",
             "model.test_cfg.crop_size=(64,64)", "model.test_cfg.stride=(43,43)",
             "train_dataloader.batch_size=2", "train_dataloader.num_workers=0",
             "train_dataloader.persistent_workers=False", "val_dataloader.num_workers=0",
             "val_dataloader.persistent_workers=False", "test_dataloader.num_workers=0",
             "test_dataloader.persistent_workers=False",
             f"train_dataloader.dataset.data_root={root}", f"val_dataloader.dataset.data_root={root}",
             f"test_dataloader.dataset.data_root={root}",
             "train_dataloader.dataset.pipeline.3.crop_size=(64,64)",
             "train_cfg.max_iters=2", "train_cfg.val_interval=3", "param_scheduler.0.end=1",
             "param_scheduler.1.end=2", "default_hooks.checkpoint.interval=2",
             "default_hooks.logger.interval=1",
             # small images keep it fast: train rescale around 128x64, test resize to 128x64
             "train_dataloader.dataset.pipeline.2.scale=(128,64)", "val_dataloader.dataset.pipeline.1.scale=(128,64)",
             "test_dataloader.dataset.pipeline.1.scale=(128,64)"]
    rc = backbone_vit.openmmlab_main("train", [SEG_CFG, "--work-dir", str(work), "--pretrained", str(pre),
                                              "--cfg-options", *small])
    assert rc == 0
    out = capsys.readouterr().out
    assert "backbone: loaded 55 tensors" in out
    ckpt = work / "iter_2.pth"
    assert ckpt.is_file()
    # the checkpoint holds mmengine objects that plain weights-only loading refuses ...
    with pytest.raises(Exception):
        torch.load(ckpt, weights_only=True)
    # ... and that the entry points load with exactly those allowed
    rc = backbone_vit.openmmlab_main("test", [SEG_CFG, str(ckpt), "--work-dir", str(tmp_path / "test"),
                                             "--cfg-options", *[s for s in small if not s.startswith("train")]])
    assert rc == 0
    assert "mIoU" in capsys.readouterr().out
    # its backbone initialises another model (e.g. a detector) through the same loader
    other = backbone_vit.ViTPyramid(img_size=64, embed_dim=96, depth=4, num_heads=3, norm="BN")
    loaded, missing, _ = other.load_pretrained(str(ckpt), verbose=False)
    assert not missing and any(k.startswith("fpn1.") for k in loaded)


class Sneaky:
    """Unpickles to getattr(target, name): what an attacker would put in a checkpoint."""

    def __init__(self, target, name):
        self.target, self.name = target, name

    def __reduce__(self):
        return getattr, (self.target, self.name)


def test_safe_loading_allows_history_buffer_methods_only(tmp_path):
    from mmengine.logging.history_buffer import HistoryBuffer
    buf = HistoryBuffer()
    buf.update(1.5)
    ok = tmp_path / "ok.pth"
    torch.save({"message_hub": {"log_scalars": {"loss": buf}}, "meta": {"best": np.float64(2.0)}}, ok)
    with backbone_vit.openmmlab_safe_loading():
        back = torch.load(ok, weights_only=True)
    assert back["message_hub"]["log_scalars"]["loss"].mean() == 1.5
    for target, name in [(HistoryBuffer, "__init__"), (np.ndarray, "tofile"), (HistoryBuffer, "__class__")]:
        bad = tmp_path / "bad.pth"
        torch.save({"x": Sneaky(target, name)}, bad)
        with backbone_vit.openmmlab_safe_loading(), pytest.raises(Exception, match="not allowed|Unsupported"):
            torch.load(bad, weights_only=True)


# ------------------------------------------------------------------------------------------------ detection

def det_batch(h=128, w=96, seed=0):
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    s = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1.0, 1.0)))
    boxes = torch.tensor([[10.0, 12.0, 60.0, 80.0], [30.0, 40.0, 90.0, 120.0]])
    masks = np.zeros((2, h, w), dtype=np.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
        masks[i, y1:y2, x1:x2] = 1
    s.gt_instances = InstanceData(bboxes=boxes, labels=torch.tensor([3, 17]), masks=BitmapMasks(masks, h, w))
    return dict(inputs=[img], data_samples=[s])


def test_mask_rcnn_from_config_trains_and_predicts():
    model, optim_wrapper = build_from_seed(tiny_det_cfg(), "mmdet")
    base = 4e-4
    assert group_lr(optim_wrapper, model, "backbone.blocks.0.attn.qkv.weight") == pytest.approx(base * 0.75 ** 4)
    assert group_lr(optim_wrapper, model, "backbone.patch_embed.proj.weight") == pytest.approx(base * 0.75 ** 5)
    assert group_lr(optim_wrapper, model, "neck.lateral_convs.0.conv.weight") == pytest.approx(base)

    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with DefaultScope.overwrite_default_scope("mmdet"):
        log_vars = model.train_step(det_batch(), optim_wrapper)
    assert {"loss", "loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask"} <= set(log_vars)
    assert torch.isfinite(log_vars["loss"])
    moved = changed(before, model)
    assert any(n.startswith("backbone.blocks.") for n in moved) and any(n.startswith("roi_head.mask_head") for n in moved)

    model.eval()
    with DefaultScope.overwrite_default_scope("mmdet"), torch.no_grad():
        out = model.test_step(det_batch(100, 75, seed=1))   # no multiple of 16 or 32
    inst = out[0].pred_instances
    n = len(inst)
    assert 0 < n <= 100
    assert inst.bboxes.shape == (n, 4) and inst.scores.shape == (n,) and inst.labels.shape == (n,)
    assert inst.masks.shape == (n, 100, 75) and inst.masks.dtype == torch.bool
    assert int(inst.labels.max()) < 80
    assert float(inst.bboxes[:, 2].max()) <= 75 + 1e-3 and float(inst.bboxes[:, 3].max()) <= 100 + 1e-3


def test_det_entry_points_train_and_test(tmp_path, capsys):
    """detection/train.py for one epoch on a 2-image COCO-format set (CocoDataset, CocoMetric), then test.py
    on its checkpoint (loaded weights-only) with the raw results dumped."""
    root = tmp_path / "coco"
    write_tiny_coco(root, boxes=((10, 10, 50, 40), (60, 30, 50, 50)))
    small = ["model.backbone.embed_dim=96", "model.backbone.depth=4", "model.backbone.num_heads=3",
             "model.backbone.out_indices=[0,1,2,3]", "model.backbone.img_size=64",
             "model.neck.in_channels=[96,96,96,96]", "model.neck.out_channels=32", "model.rpn_head.in_channels=32",
             "model.rpn_head.feat_channels=32", "model.roi_head.bbox_roi_extractor.out_channels=32",
             "model.roi_head.mask_roi_extractor.out_channels=32", "model.roi_head.bbox_head.in_channels=32",
             "model.roi_head.bbox_head.fc_out_channels=64", "model.roi_head.mask_head.in_channels=32",
             "model.roi_head.mask_head.conv_out_channels=32",
             # random weights score low: keep every detection so the metric has something to match
             "model.test_cfg.rcnn.score_thr=0.0", "optim_wrapper.paramwise_cfg.num_layers=4",
             "train_dataloader.num_workers=0", "train_dataloader.persistent_workers=False",
             "val_dataloader.num_workers=0", "val_dataloader.persistent_workers=False",
             "test_dataloader.num_workers=0", "test_dataloader.persistent_workers=False",
             f"train_dataloader.dataset.data_root={root}/", f"val_dataloader.dataset.data_root={root}/",
             f"test_dataloader.dataset.data_root={root}/",
             f"val_evaluator.ann_file={root}/annotations/instances_val2017.json",
             f"test_evaluator.ann_file={root}/annotations/instances_val2017.json",
             "train_dataloader.dataset.pipeline.2.scale=(160,128)", "val_dataloader.dataset.pipeline.1.scale=(160,128)",
             "test_dataloader.dataset.pipeline.1.scale=(160,128)", "train_cfg.max_epochs=1",
             "train_cfg.val_interval=2",   # test.py evaluates below
             "default_hooks.logger.interval=1"]
    work = tmp_path / "work"
    assert backbone_vit.openmmlab_main("train", [DET_CFG, "--work-dir", str(work), "--cfg-options", *small]) == 0
    assert (work / "epoch_1.pth").is_file()
    out = tmp_path / "results.pkl"
    assert backbone_vit.openmmlab_main("test", [DET_CFG, str(work / "epoch_1.pth"), "--out", str(out),
                                                "--work-dir", str(tmp_path / "test"), "--cfg-options", *small]) == 0
    text = capsys.readouterr().out
    assert "coco/bbox_mAP" in text and "coco/segm_mAP" in text and out.is_file()
