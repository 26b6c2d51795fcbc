"""Evaluation on frozen features and fine-tuning: k-NN (knn.py), linear probe (linear.py), attention maps
(attention.py, ViT only), full fine-tuning (finetune.py)."""
