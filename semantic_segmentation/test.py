"""Test a BootMAE UperNet on ADE20K with mmsegmentation 1.x (mmengine's Runner).

    python semantic_segmentation/test.py CONFIG CHECKPOINT [--work-dir DIR] [--cfg-options k=v ...]
    torchrun --nproc_per_node 8 semantic_segmentation/test.py CONFIG CHECKPOINT --launcher pytorch
    (slurm: semantic_segmentation/slurm_test.sbatch)
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import backbone_vit  # noqa: E402

if __name__ == "__main__":
    sys.exit(backbone_vit.openmmlab_main("test"))
