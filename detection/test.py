"""Test a BootMAE Mask R-CNN on COCO with mmdetection 3.x (mmengine's Runner).

    python detection/test.py CONFIG CHECKPOINT [--work-dir DIR] [--cfg-options k=v ...]
    torchrun --nproc_per_node 8 detection/test.py CONFIG CHECKPOINT --launcher pytorch
    (slurm: detection/slurm_test.sbatch)
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import backbone_vit  # noqa: E402

if __name__ == "__main__":
    sys.exit(backbone_vit.openmmlab_main("test"))
