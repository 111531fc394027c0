# BootMAE ViT-B/16 + UperNet (+ FCN auxiliary head) on ADE20K, 512x512 crops, 160k iterations, batch 16
# (8 GPUs x 2). The paper's recipe (49.1 mIoU single scale after 800 pretraining epochs): AdamW lr 4e-4,
# weight decay 0.05, layer decay 0.65, 1500 linear warm-up iterations then linear decay to 0, drop path 0.1,
# features after blocks 4, 6, 8, 12 resized x4 / x2 / x1 / x0.5. Everything else is the release's config
# (mmsegmentation 0.11) in mmsegmentation 1.x form: the heads, the 0.5/0.5 input normalisation the encoder
# was pretrained with, gradient clipping at 3, slide inference with 512 crops and stride 341.
#
#   python semantic_segmentation/train.py semantic_segmentation/configs/upernet_bootmae_base_512_160k_ade20k.py \
#       --pretrained output/bootmae_base_800ep/checkpoint-799.pth
custom_imports = dict(imports=["semantic_segmentation.bootmae_seg"], allow_failed_imports=False)
default_scope = "mmseg"

# ------------------------------------------------------------------------------------------------- model
crop_size = (512, 512)
num_layers = 12
norm_cfg = dict(type="SyncBN", requires_grad=True)
data_preprocessor = dict(
    type="SegDataPreProcessor",
    mean=[127.5, 127.5, 127.5],
    std=[127.5, 127.5, 127.5],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=crop_size)
model = dict(
    type="EncoderDecoder",
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        type="BootMAEViT",
        img_size=512,
        patch_size=16,
        embed_dim=768,
        depth=num_layers,
        num_heads=12,
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_path_rate=0.1,
        out_indices=[3, 5, 7, 11],   # after blocks 4, 6, 8, 12
        norm="SyncBN",
        # a pretraining checkpoint (ours or the release's) or `python backbone_vit.py convert` output;
        # train.py --pretrained sets it
        pretrained=None,
        model_key="model|module"),
    decode_head=dict(
        type="UPerHead",
        in_channels=[768, 768, 768, 768],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=768,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type="FCNHead",
        in_channels=768,
        in_index=2,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode="slide", crop_size=crop_size, stride=(341, 341)))

# -------------------------------------------------------------------------------------------------- data
dataset_type = "ADE20KDataset"
# ADE20K_ROOT=/path/to/ADEChallengeData2016 overrides the default (mmengine substitutes it when reading)
data_root = "{{$ADE20K_ROOT:data/ade/ADEChallengeData2016}}"
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", reduce_zero_label=True),
    dict(type="RandomResize", scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type="RandomCrop", crop_size=crop_size, cat_max_ratio=0.75),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PhotoMetricDistortion"),
    dict(type="PackSegInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(2048, 512), keep_ratio=True),
    # annotations after the resize: the metric compares at the original size
    dict(type="LoadAnnotations", reduce_zero_label=True),
    dict(type="PackSegInputs"),
]
train_dataloader = dict(
    batch_size=2,   # per GPU: 8 GPUs x 2 = 16
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type="InfiniteSampler", shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path="images/training", seg_map_path="annotations/training"),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path="images/validation", seg_map_path="annotations/validation"),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type="IoUMetric", iou_metrics=["mIoU"])
test_evaluator = val_evaluator

# multi-scale + flip testing (semantic_segmentation/test.py --tta; the release's *_ms_test config):
# its SETR_Resize sets the short side to max(512, 512 * ratio), so ratios 0.5 / 0.75 / 1.0 all give 512
img_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
tta_model = dict(type="SegTTAModel")
tta_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(
        type="TestTimeAug",
        transforms=[
            [dict(type="ResizeShortestEdge", scale=int(512 * max(r, 1.0)), max_size=1 << 20) for r in img_ratios],
            [dict(type="RandomFlip", prob=0.0, direction="horizontal"),
             dict(type="RandomFlip", prob=1.0, direction="horizontal")],
            [dict(type="LoadAnnotations", reduce_zero_label=True)],
            [dict(type="PackSegInputs")],
        ]),
]

# ------------------------------------------------------------------------------------------- optimisation
optim_wrapper = dict(
    type="OptimWrapper",   # train.py --amp: fp16 with a dynamic loss scale, as the release trained
    optimizer=dict(type="AdamW", lr=4e-4, betas=(0.9, 0.999), weight_decay=0.05),
    constructor="LayerDecayOptimWrapperConstructor",
    paramwise_cfg=dict(num_layers=num_layers, layer_decay_rate=0.65),
    clip_grad=dict(max_norm=3.0, norm_type=2))
max_iters = 160000
warmup_iters = 1500
# the release's mmcv schedule (poly, power 1, min_lr 0, linear warm-up from 1e-6) exactly: at iteration i,
# lr = 4e-4 * (1 - i / 160000) * (1e-6 + (1 - 1e-6) * min(i / 1500, 1)). mmengine multiplies schedulers that
# overlap, and its linear and poly schedulers reach their end value at iteration end - 1, hence the + 1
param_scheduler = [
    dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=warmup_iters + 1),
    dict(type="PolyLR", power=1.0, eta_min=0.0, by_epoch=False, begin=0, end=max_iters + 1),
]
train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=16000)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")

# ----------------------------------------------------------------------------------------------- runtime
default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=16000, max_keep_ckpts=2, save_best="mIoU"),
    sampler_seed=dict(type="DistSamplerSeedHook"),
    visualization=dict(type="SegVisualizationHook"))
env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
    dist_cfg=dict(backend="nccl"))
vis_backends = [dict(type="LocalVisBackend")]
visualizer = dict(type="SegLocalVisualizer", vis_backends=vis_backends, name="visualizer")
log_processor = dict(by_epoch=False)
log_level = "INFO"
load_from = None
resume = False
# the total batch the lr above is set for (8 GPUs x 2); mmengine scales the lr only with --cfg-options
# auto_scale_lr.enable=True
auto_scale_lr = dict(enable=False, base_batch_size=16)
