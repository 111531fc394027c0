# The release's UperNet checkpoint with multi-scale + flip testing (its reported 50.0 mIoU); see
# upernet_bootmae_base_release_layout_512_160k_ade20k.py for the conversion.
_base_ = ["./upernet_bootmae_base_release_layout_512_160k_ade20k.py"]
test_time_aug = True
