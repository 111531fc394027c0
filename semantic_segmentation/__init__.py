"""ADE20K semantic segmentation with the BootMAE backbone on mmsegmentation 1.x (see README)."""
