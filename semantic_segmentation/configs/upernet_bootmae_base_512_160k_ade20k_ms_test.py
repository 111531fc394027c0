# Multi-scale + flip testing of the ADE20K UperNet, as the release's BootMAE_Base_800_PT_ms_test.py (which
# reports 50.0 mIoU for its checkpoint; single scale 49.12): short side max(512, 512 x ratio) for ratios
# 0.5 ... 1.75, each also flipped, slide inference on each, the 12 predictions averaged.
#
#   python semantic_segmentation/test.py semantic_segmentation/configs/upernet_bootmae_base_512_160k_ade20k_ms_test.py CKPT
_base_ = ["./upernet_bootmae_base_512_160k_ade20k.py"]
# test.py swaps in tta_model / tta_pipeline (defined in the base config) when this is set, as --tta does
test_time_aug = True
