"""Networks: ViT backbones (registry), attention kernels, the DINO head. No training logic here."""
