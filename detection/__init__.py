"""COCO object detection / instance segmentation with the BootMAE backbone on mmdetection 3.x (see README)."""
