"""Registers the BootMAE backbone with mmsegmentation 1.x (``type='BootMAEViT'``) and the layer-decay
optimizer-wrapper constructor with mmengine (scripts/downstream.py). The configs load this module through
``custom_imports``."""
import os
import runpy

runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "scripts", "downstream.py"),
               init_globals={"REGISTRY": "mmseg.registry"})
