"""Registers the BootMAE backbone with mmdetection 3.x (``type='BootMAEViT'``) and the layer-decay
optimizer-wrapper constructor with mmengine. The configs load this module through ``custom_imports``."""
import os
import sys

# the configs name this module 'detection.bootmae_det'; the backbone lives at the repository root
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from mmdet.registry import MODELS  # noqa: E402

import backbone_vit  # noqa: E402

MODELS.register_module(name="BootMAEViT", module=backbone_vit.ViTPyramid, force=True)
backbone_vit.register_mmengine()
