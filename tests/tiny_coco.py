"""2-image-per-split data sets for the downstream tests (tests/test_openmmlab.py, tests/test_scripts_smoke.py): a
COCO-format set for detection and an ADE20K-shaped folder for segmentation. Imports OpenMMLab and OpenCV only when
called, so importing this module never needs them."""
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


def write_tiny_ade20k(root):
    """Writes ``root``/images/{training,validation}/img{0,1}.jpg (72x96 noise) and their label maps
    ``root``/annotations/.../img{0,1}.png (random labels 0..150), ADEChallengeData2016's layout."""
    import cv2
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(2):
            rng = np.random.default_rng(i)
            cv2.imwrite(str(root / "images" / split / f"img{i}.jpg"),
                        rng.integers(0, 255, (72, 96, 3), dtype=np.uint8))
            cv2.imwrite(str(root / "annotations" / split / f"img{i}.png"),
                        rng.integers(0, 151, (72, 96), dtype=np.uint8))
