"""Evaluation protocols on frozen features: k-NN (linear probe and attention maps later)."""
