"""Train a BootMAE Mask R-CNN on COCO with mmdetection 3.x (mmengine's Runner).

    python detection/train.py CONFIG [--work-dir DIR] [--cfg-options k=v ...]
    torchrun --nproc_per_node 8 detection/train.py CONFIG --launcher pytorch
    (slurm: detection/slurm_train.sbatch)
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import backbone_vit  # noqa: E402

if __name__ == "__main__":
    sys.exit(backbone_vit.openmmlab_main("train"))
