"""Train a BootMAE Mask R-CNN on COCO with mmdetection 3.x (mmengine's Runner); the command line is
scripts/downstream.py's."""
import os
import runpy

runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "scripts", "downstream.py"),
               run_name="__main__", init_globals={"SCRIPT": __file__})
