"""fastdino: throughput-first self-supervised ViT pretraining (DINO)."""
