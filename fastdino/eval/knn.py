"""Weighted k-NN classification on frozen features (Wu et al. 2018; DINO Sec. 4.1 and `eval_knn.py`).

Features are L2-normalised class tokens; each test image takes its k nearest training features by
cosine similarity, and each neighbour votes for its label with weight exp(similarity / T). An unreadable
image (memory bank or query) is skipped and counted, never replaced by another image: a substitute would be
scored under the label of the slot it fills.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from fastdino.config import EvalConfig
from fastdino.data.files import DataError, ImageFileDataset, ImageIndex, UnreadableImages, collate_views
from fastdino.data.multicrop import eval_transform
from fastdino.data.shards import index_images, index_in_classes_of


@dataclass
class KnnResult:
    top1: float
    """Top-1 accuracy in percent of the `n_val` queries scored."""
    n_train: int
    """Memory-bank images used."""
    n_val: int
    """Query images scored."""
    skipped_images: int
    """Distinct unreadable files skipped, in both sets."""


@torch.no_grad()
def extract_features(
    model: nn.Module, loader, device: torch.device, unreadable: UnreadableImages | None = None,
    skipped: set[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) L2-normalised float32 features and (N,) labels, on the CPU, for the images the loader's
    `collate_views` batches hold; their unreadable files go to `unreadable` (which warns once per file) and
    their paths to `skipped`."""
    was_training = model.training
    model.eval()
    feats, labels = [], [torch.zeros(0, dtype=torch.int64)]
    for views, target, bad in loader:
        if unreadable is not None:
            unreadable.add(bad)
        if skipped is not None:
            skipped.update(path for path, _ in bad)
        if target.numel() == 0:  # every image of the batch was skipped
            continue
        out = model(views[0].to(device, non_blocking=True)).float()
        feats.append(nn.functional.normalize(out, dim=1).cpu())
        labels.append(target)
    model.train(was_training)
    return (torch.cat(feats) if feats else torch.zeros(0, 0)), torch.cat(labels)


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
    device: torch.device, num_workers: int = 0, *, unreadable: UnreadableImages | None = None,
    indexes: tuple[ImageIndex, ImageIndex] | None = None,
) -> KnnResult:
    """k-NN of `backbone` with train_dir as the memory bank and val_dir as the queries.

    Unreadable images in either set are skipped (not substituted) and counted in `KnnResult.skipped_images`;
    each is warned about once by `unreadable`, the record they go to: a new one when None (once per
    evaluation), the run's during training (once per run, however many passes). Either set may be a folder or
    a tar-shard set (`data.shards.index_images`); `indexes` are the two already indexed (val in train's
    classes), so that a pass during training neither indexes again nor repeats what indexing warned about.
    Raises DataError naming the set when it has no readable image, when the memory bank is not labelled (one
    class: no class folders, or shards without class members), or when val has classes train lacks.
    """
    if indexes is None:
        train_index = index_images(train_dir)
        if len(train_index.classes) < 2:
            raise DataError(f"{train_dir} is not labelled (k-NN needs at least 2 classes: class sub-folders, or "
                            ".cls, .txt or .json members in shards)")
        indexes = train_index, index_in_classes_of(val_dir, train_dir, train_index)
    transform = eval_transform(image_size)
    unreadable = UnreadableImages() if unreadable is None else unreadable
    skipped: set[str] = set()
    features = []
    for index, folder in zip(indexes, (train_dir, val_dir), strict=True):
        loader = DataLoader(
            ImageFileDataset(index, transform, on_unreadable="skip"), batch_size=cfg.batch_size,
            num_workers=num_workers, collate_fn=collate_views, pin_memory=device.type == "cuda",
        )
        features.append(extract_features(backbone, loader, device, unreadable, skipped))
        if features[-1][1].numel() == 0:
            raise DataError(f"{folder} has no readable image to evaluate on: check its files")
    (train_f, train_l), (val_f, val_l) = features
    top1 = knn_top1(train_f, train_l, val_f, val_l, cfg.knn_k, cfg.knn_temperature)
    return KnnResult(top1, len(train_l), len(val_l), len(skipped))
