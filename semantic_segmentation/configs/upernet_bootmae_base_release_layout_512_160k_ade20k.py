# The release's fine-tuning architecture (BEiT's backbone as its mmsegmentation 0.11 config builds it): the
# same encoder plus a learned position table, a relative position bias per block and a learnable layer scale
# started at 1. Use it to evaluate the release's UperNet checkpoint after
#   python backbone_vit.py convert-release-upernet --checkpoint BootMAE_Base_800_UperNet.pth --output release_upernet.pth
#   python semantic_segmentation/test.py semantic_segmentation/configs/upernet_bootmae_base_release_layout_512_160k_ade20k.py release_upernet.pth
# (or to train that architecture: everything else is the main config's).
_base_ = ["./upernet_bootmae_base_512_160k_ade20k.py"]
model = dict(backbone=dict(release_layout=True, layer_scale_init=1.0))
