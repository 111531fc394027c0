"""A 2-image-per-split COCO-format set for the detection tests (tests/test_openmmlab.py, tests/test_scripts_smoke.py).
Imports OpenMMLab only when called, so importing this module never needs it."""
import json

import numpy as np


def write_tiny_coco(root, boxes=((10, 10, 50, 40),)):
    """Writes ``root``/{train2017,val2017}/{0,1}.jpg (96x128 noise) and their instances_*.json: in each image one
    box per ``boxes`` entry (x, y, w, h), the j-th of category 3 + j, with a rectangular polygon."""
    import cv2
    from mmdet.datasets import CocoDataset
    (root / "annotations").mkdir(parents=True)
    cats = [{"id": k + 1, "name": n} for k, n in enumerate(CocoDataset.METAINFO["classes"])]
    for split in ("train2017", "val2017"):
        (root / split).mkdir()
        images, anns = [], []
        for i in range(2):
            cv2.imwrite(str(root / split / f"{i}.jpg"),
                        np.random.default_rng(i).integers(0, 255, (96, 128, 3), dtype=np.uint8))
            images.append({"id": i + 1, "file_name": f"{i}.jpg", "height": 96, "width": 128})
            for j, (x, y, w, h) in enumerate(boxes):
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 3 + j, "bbox": [x, y, w, h],
                             "area": w * h, "iscrowd": 0, "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats}))
