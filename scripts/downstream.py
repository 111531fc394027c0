"""The Python side of the downstream tasks, detection/ (mmdetection 3.x, COCO Mask R-CNN) and
semantic_segmentation/ (mmsegmentation 1.x, ADE20K UperNet); their shims run this file:

    python TASK/train.py CONFIG [--pretrained CKPT] [--work-dir DIR] [--cfg-options k=v ...]
    python TASK/test.py CONFIG CHECKPOINT [--work-dir DIR] [--cfg-options k=v ...]
    torchrun --nproc_per_node 8 TASK/train.py CONFIG --launcher pytorch    (TASK/dist_train.sh, dist_test.sh)
    srun ... TASK/train.py CONFIG --launcher slurm                          (TASK/slurm_train.sbatch, slurm_test)

train.py and test.py run it as ``__main__`` with ``SCRIPT``, their own path (its name is the job: train or test).
bootmae_det.py and bootmae_seg.py, which the configs load through ``custom_imports``, run it with ``REGISTRY``,
the OpenMMLab registry module that gets the backbone (``type='BootMAEViT'``); the layer-decay optimizer-wrapper
constructor is registered with mmengine.
"""
import importlib
import os
import sys

# the backbone lives at the repository root
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import backbone_vit  # noqa: E402
import openmmlab_glue  # noqa: E402

if __name__ == "__main__":
    script = globals()["SCRIPT"]
    sys.argv[0] = script   # runpy names this file there; the usage line names the shim
    sys.exit(openmmlab_glue.openmmlab_main(os.path.splitext(os.path.basename(script))[0]))
else:
    registry = importlib.import_module(globals()["REGISTRY"])
    registry.MODELS.register_module(name="BootMAEViT", module=backbone_vit.ViTPyramid, force=True)
    openmmlab_glue.register_mmengine()
