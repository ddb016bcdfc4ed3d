"""Floor 2: backbones (HF folders, timm, the hub, the small MAE ViT), the detector network, its model file."""
