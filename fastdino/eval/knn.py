"""Weighted k-NN classification on frozen features (Wu et al. 2018; DINO Sec. 4.1 and `eval_knn.py`).

Features are L2-normalised class tokens; each test image takes its k nearest training features by
cosine similarity, and each neighbour votes for its label with weight exp(similarity / T).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from fastdino.config import EvalConfig
from fastdino.data.files import ImageFileDataset, collate_views, index_image_folder
from fastdino.data.multicrop import eval_transform


@torch.no_grad()
def extract_features(model: nn.Module, loader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) L2-normalised float32 features and (N,) labels, on the CPU."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for views, target, _ in loader:
        out = model(views[0].to(device, non_blocking=True)).float()
        feats.append(nn.functional.normalize(out, dim=1).cpu())
        labels.append(target)
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_top1(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 256,
) -> float:
    """Top-1 accuracy in percent. Features must be L2-normalised; k is capped at the training set size."""
    if train_features.shape[0] == 0 or test_features.shape[0] == 0:
        raise ValueError("k-NN needs at least one training and one test feature")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, train_features.shape[0])
    correct = 0
    for start in range(0, test_features.shape[0], chunk):
        sim = test_features[start : start + chunk] @ train_features.T  # (n, N_train)
        top_sim, top_idx = sim.topk(k, dim=1)  # (n, k)
        votes = torch.zeros(sim.shape[0], num_classes, dtype=sim.dtype)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        correct += (votes.argmax(1) == test_labels[start : start + chunk]).sum().item()
    return 100.0 * correct / test_features.shape[0]


def knn_evaluate(
    backbone: nn.Module, train_dir: str | Path, val_dir: str | Path, image_size: int, cfg: EvalConfig,
    device: torch.device, num_workers: int = 0,
) -> float:
    """k-NN top-1 (%) of `backbone` with train_dir as the memory bank and val_dir as the queries."""
    train_index = index_image_folder(train_dir)
    val_index = index_image_folder(val_dir, classes=train_index.classes)
    transform = eval_transform(image_size)
    features = []
    for index in (train_index, val_index):
        loader = DataLoader(
            ImageFileDataset(index, transform), batch_size=cfg.batch_size, num_workers=num_workers,
            collate_fn=collate_views, pin_memory=device.type == "cuda",
        )
        features.append(extract_features(backbone, loader, device))
    (train_f, train_l), (val_f, val_l) = features
    return knn_top1(train_f, train_l, val_f, val_l, cfg.knn_k, cfg.knn_temperature)
