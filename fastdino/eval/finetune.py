"""End-to-end fine-tuning of a pretrained backbone with a linear head, top-1 on a labelled folder.

SiT reports its results after fine-tuning (Atito et al. 2021, Sec. 4; SPEC "Published fine-tuning results"),
and so can any checkpoint here: the backbone (the one k-NN evaluates) plus a linear layer on its class token
are trained together with cross-entropy, AdamW (no weight decay on biases and 1-D parameters), a linear
warm-up over the first epoch then a cosine decay per iteration, on random-resized crops (scale 0.08-1) with
horizontal flips, the usual supervised augmentation; validation takes the k-NN evaluation crop. The
reference code's DeiT recipe (RandAugment, mixup, cutmix, label smoothing, layer decay) is not reproduced.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from fastdino.data.batch import build_loader, steps_per_epoch
from fastdino.data.files import DataError, ImageFileDataset, ImageIndex, UnreadableImages, collate_views
from fastdino.data.multicrop import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from fastdino.data.shards import index_images, index_in_classes_of
from fastdino.models.backbones import feature_dim
from fastdino.schedules import cosine_schedule

log = logging.getLogger("fastdino")


def finetune_transform(size: int) -> v2.Compose:
    """Training view: random-resized crop (scale 0.08-1, bicubic), horizontal flip, ImageNet normalisation."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(p=0.5),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        v2.ToPureTensor(),
    ])


class Classifier(nn.Module):
    """backbone (images -> class token (B, D)) + a linear layer to the classes: (B, 3, H, W) -> (B, n_classes)."""

    def __init__(self, backbone: nn.Module, dim: int, n_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(dim, n_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def per_class_subset(index: ImageIndex, n: int, seed: int) -> ImageIndex:
    """At most n images of each class of `index` (a class with fewer keeps all), picked by a permutation
    seeded with `seed`, in index order: the low-label regime, where pretraining is expected to matter most."""
    order = torch.randperm(len(index), generator=torch.Generator().manual_seed(seed)).tolist()
    taken: dict[int, int] = {}
    keep = []
    for i in order:
        label = index.labels[i]
        if taken.get(label, 0) < n:
            taken[label] = taken.get(label, 0) + 1
            keep.append(i)
    keep.sort()
    return index.subset(keep)


@dataclass
class FinetuneResult:
    top1: float
    """Validation top-1 (%) after the last epoch, over the readable validation images."""
    skipped_val: int = 0
    """Unreadable validation images, skipped (not scored; as k-NN does)."""
    history: list[dict] = field(default_factory=list)
    """Per epoch: epoch, train loss (mean over its iterations), validation top-1 (%)."""
    classes: list[str] = field(default_factory=list)
    """The class names, in label order."""
    model: nn.Module | None = None
    """The fine-tuned classifier (backbone + head)."""


@torch.no_grad()
def top1_accuracy(model: nn.Module, loader: DataLoader, device: torch.device,
                  unreadable: UnreadableImages | None = None) -> float:
    """Top-1 (%) of `model` over every item of `loader` (eval mode); the unreadable files a skipping dataset reports
    go to `unreadable`. Raises DataError when no item could be read."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for views, labels, bad in loader:
        if unreadable is not None:
            unreadable.add(bad)
        if labels.numel() == 0:  # every image of the batch was skipped
            continue
        pred = model(views[0].to(device, non_blocking=True)).argmax(1).cpu()
        correct += int((pred == labels).sum())
        total += labels.numel()
    model.train(was_training)
    if total == 0:
        raise DataError("no readable validation image to score: check the --val folder's files")
    return 100.0 * correct / total


def finetune(
    backbone: nn.Module, train_dir: str | Path, val_dir: str | Path, image_size: int, device: torch.device, *,
    epochs: int = 10, lr: float = 5e-4, batch_size: int = 64, weight_decay: float = 0.05, num_workers: int = 4,
    seed: int = 0, per_class: int = 0, report: Callable[[str], None] | None = None,
) -> FinetuneResult:
    """Fine-tune a copy of `backbone` (the argument is untouched; `models.backbones.feature_dim` gives the width of its
    features: a ViT's class token, a convnet's pooled features)
    with a new linear head on train_dir's classes, on `device`, evaluating on val_dir after each epoch
    (the last, ragged batch of an epoch is kept; one host sync per epoch, for the log). lr is the peak
    learning rate for this batch size; per_class > 0 trains on at most that many images of each class
    (`per_class_subset`). Raises DataError for a missing folder, fewer than 2 classes, or validation classes
    that training lacks."""
    train_index = index_images(train_dir)
    if len(train_index.classes) < 2:
        raise DataError(f"fine-tuning needs class sub-folders in {train_dir} (found {len(train_index.classes)} class)")
    if per_class:
        train_index = per_class_subset(train_index, per_class, seed)
    val_index = index_in_classes_of(val_dir, train_dir, train_index)
    torch.manual_seed(seed)
    model = Classifier(copy.deepcopy(backbone), feature_dim(backbone), len(train_index.classes)).to(device)
    model.requires_grad_(True)  # a teacher backbone comes frozen
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(".bias")]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    train_set = ImageFileDataset(train_index, finetune_transform(image_size), seed=seed)
    # an unreadable validation image is skipped, not replaced by the next one under its own label (as k-NN does)
    val_loader = DataLoader(ImageFileDataset(val_index, eval_transform(image_size), on_unreadable="skip"),
                            batch_size=batch_size,
                            num_workers=num_workers, collate_fn=collate_views, pin_memory=device.type == "cuda")
    per_epoch = steps_per_epoch(len(train_index), batch_size, drop_last=False)
    total, step = epochs * per_epoch, 0
    result = FinetuneResult(top1=0.0, classes=list(train_index.classes))
    unreadable = UnreadableImages()  # warns once per file
    train_unreadable = UnreadableImages()  # substituted in training (as pre-training does), warned once per file
    model.train()
    for epoch in range(epochs):
        loader = build_loader(train_set, batch_size, num_workers, seed=seed, epoch=epoch, drop_last=False)
        losses = []
        for views, labels, bad in loader:
            train_unreadable.add(bad)
            for group in optimizer.param_groups:
                group["lr"] = cosine_schedule(step, total, lr, 1e-6, warmup_steps=per_epoch)
            logits = model(views[0].to(device, non_blocking=True))  # (B, n_classes)
            loss = F.cross_entropy(logits, labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            step += 1
        top1 = top1_accuracy(model, val_loader, device, unreadable)
        mean_loss = float(torch.stack(losses).mean())  # one host sync per epoch
        result.history.append({"epoch": epoch, "loss": mean_loss, "top1": top1})
        if report is not None:
            report(f"fine-tune epoch {epoch + 1}/{epochs}: train loss {mean_loss:.4f}, val top-1 {top1:.2f}%")
    result.top1, result.model, result.skipped_val = result.history[-1]["top1"], model, len(unreadable)
    return result
