"""Linear probe on frozen features (DINO Sec. 4.1 and the appendix's evaluation protocols; official
`eval_linear.py`).

A linear classifier is trained on the frozen teacher backbone with SGD (momentum 0.9, no weight decay,
learning rate given per 256 images and scaled by batch / 256, cosine-annealed to 0 per epoch), from the
official init (weights N(0, 0.01), zero bias); top-1 and top-5 are read on the validation folder's
centre crops. Features (`FEATURE_MODES`):
- `cls4`: the normed class tokens of the last 4 blocks, concatenated: (B, 4*D) (the paper's ViT-S rule);
- `cls_avgpool`: the last class token and the mean of the last block's normed patch tokens, interleaved
  per channel as the official code orders them (so its released linear weights fit): (B, 2*D) (ViT-B);
- `pooled`: the backbone's own output, (B, D): a convnet's globally pooled features (official `eval_linear.py`
  on a ResNet: `fc` replaced by an identity), a ViT's last class token;
- `auto`: `cls4` below width 768, `cls_avgpool` from 768 up, as the official recipe does for ViT-S / ViT-B;
  `pooled` for a convnet (torchvision, timm), where `cls4` / `cls_avgpool` are refused.

Two ways to feed it (`PROBE_MODES`):
- `augment`, the paper's protocol: every epoch re-reads the images through random-resized-crop + flip
  and the backbone;
- `cached`, the fast path users take on small budgets: the backbone runs once over centre crops (no
  augmentation) and every epoch reuses those features.
Either way several learning rates are swept in one pass: one linear layer per rate, all from the same
init and trained on the same batches, so a sweep costs one backbone pass, not one per rate.

An unreadable image is skipped and counted, never replaced by another: a batch is a slice of the epoch's
shuffled order over all files, minus the unreadable ones, in both modes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fastdino.data.files import DECODE_ERRORS, DataError, ImageIndex, UnreadableImages, decode_rgb, item_seed
from fastdino.data.multicrop import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from fastdino.data.shards import index_images, index_in_classes_of
from fastdino.errors import UserError
from fastdino.models.backbones import feature_dim as backbone_dim
from fastdino.models.vit import VisionTransformer
from fastdino.schedules import cosine_schedule

FEATURE_MODES = ("auto", "cls4", "cls_avgpool", "pooled")
PROBE_MODES = ("cached", "augment")
DEFAULT_LRS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)

Batches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]
"""epoch -> that epoch's (features (b, F) float32, labels (b,) int64) batches."""


# ---- features -------------------------------------------------------------------------------------------


def resolve_feature_mode(mode: str, embed_dim: int) -> str:
    """`auto` -> `cls4` for widths below 768 (ViT-T, ViT-S), `cls_avgpool` otherwise (ViT-B)."""
    if mode not in FEATURE_MODES:
        raise ValueError(f"feature mode must be one of {FEATURE_MODES}, got {mode!r}")
    if mode == "auto":
        return "cls4" if embed_dim < 768 else "cls_avgpool"
    return mode


def backbone_feature_mode(mode: str, backbone: nn.Module) -> str:
    """`resolve_feature_mode` for this backbone: `pooled` for a convnet (auto), whose class tokens do not exist
    (UserError naming --features for cls4 / cls_avgpool)."""
    if isinstance(backbone, VisionTransformer):
        return resolve_feature_mode(mode, backbone.embed_dim)
    if mode not in ("auto", "pooled"):
        raise UserError(f"--features {mode} reads a ViT's class tokens; this checkpoint's backbone is a convnet: use "
                        "--features pooled (or auto)")
    return "pooled"


def feature_dim(backbone: nn.Module, mode: str) -> int:
    """Width of `probe_features`: 4*D (or depth*D for fewer than 4 blocks) for cls4, 2*D for cls_avgpool, D for
    pooled."""
    mode = backbone_feature_mode(mode, backbone)
    if mode == "pooled":
        return backbone_dim(backbone)
    return backbone.embed_dim * (min(4, len(backbone.blocks)) if mode == "cls4" else 2)


@torch.no_grad()
def probe_features(backbone: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """x: (B, 3, H, W) normalised images -> (B, feature_dim) float32 features of the frozen backbone."""
    mode = backbone_feature_mode(mode, backbone)
    if mode == "pooled":
        return backbone(x).float()  # (B, D)
    if mode == "cls4":
        return torch.cat(backbone.get_intermediate_class_tokens(x, 4), dim=1).float()  # (B, 4*D)
    tokens = backbone.prepare_tokens(x)
    for block in backbone.blocks:
        tokens = block(tokens)
    tokens = backbone.norm(tokens)  # (B, N+1, D)
    return torch.stack((tokens[:, 0], tokens[:, 1:].mean(dim=1)), dim=2).flatten(1).float()  # (B, 2*D)


# ---- images ---------------------------------------------------------------------------------------------


class ProbeImages(Dataset):
    """Items `(image (3, S, S) float32 or None, label, index, reason)`; None marks an unreadable file, `reason`
    (else "") says why. It does not log: the main process warns once per file (`UnreadableImages`), however
    many epochs and worker processes read it.

    Augmentations run under `item_seed(seed, epoch, index)`, so the views do not depend on the workers.
    Unlike data/files.py's `ImageFileDataset` (views lists, bad-path reports for the trainer), items carry
    their dataset index: the cached and augmented probes match batches by it.
    """

    def __init__(self, index: ImageIndex, transform: Callable, seed: int = 0) -> None:
        self.index, self.transform, self.seed, self.epoch = index, transform, seed, 0

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, int, str]:
        i = int(i)
        try:
            img = decode_rgb(self.index.open(i))  # upright (EXIF), 16-bit scaled: as training and k-NN see it
        except DECODE_ERRORS as err:
            return None, self.index.labels[i], i, f"{type(err).__name__}: {err}"
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(item_seed(self.seed, self.epoch, i))
            return self.transform(img), self.index.labels[i], i, ""


def collate_readable(batch: Sequence[tuple[torch.Tensor | None, int, int, str]]):
    """Stack the readable items: images (b, 3, S, S) or None when there are none, their labels (b,) int64 and
    dataset indices (b,) int64, and the unreadable items' `(index, reason)` pairs."""
    good = [item for item in batch if item[0] is not None]
    images = torch.stack([item[0] for item in good]) if good else None
    labels = torch.tensor([item[1] for item in good], dtype=torch.int64)
    indices = torch.tensor([item[2] for item in good], dtype=torch.int64)
    return images, labels, indices, [(item[2], item[3]) for item in batch if item[0] is None]


def _record(dataset: ProbeImages, bad: list[tuple[int, str]], warned: UnreadableImages) -> list[int]:
    """The indices of `bad`, whose files go to `warned` (each warned about when first met)."""
    warned.add((dataset.index.paths[i], reason) for i, reason in bad)
    return [i for i, _ in bad]


def train_transform(size: int):
    """The official probe's training view: random-resized-crop (scale 0.08-1) to `size`, flip, normalise."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        v2.ToPureTensor(),
    ])


def epoch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's batches of dataset indices: a seeded permutation of range(n), cut every batch_size."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, 1]).generate_state(1)[0]))
    order = torch.randperm(n, generator=g).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


class _EpochBatches:
    """A batch sampler over `epoch_order`; `set_epoch` before each epoch's loader."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, 0

    def __iter__(self) -> Iterator[list[int]]:
        return iter(epoch_order(self.n, self.batch_size, self.seed, self.epoch))

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)


def image_batches(
    backbone: VisionTransformer, dataset: ProbeImages, mode: str, batch_size: int, seed: int,
    device: torch.device, num_workers: int = 0, unreadable: set[int] | None = None,
    warned: UnreadableImages | None = None,
) -> Batches:
    """Uncached feed: each epoch reads `dataset` in `epoch_order` (its transform sets the augmentation) and
    runs the backbone; indices of unreadable files are added to `unreadable`, the files to `warned` (a new
    record when None: each file is warned about once, not once per epoch)."""
    sampler = _EpochBatches(len(dataset), batch_size, seed)
    unreadable = set() if unreadable is None else unreadable
    warned = UnreadableImages() if warned is None else warned

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        dataset.epoch = sampler.epoch = epoch
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_readable,
                            pin_memory=device.type == "cuda")
        for images, labels, _, bad in loader:
            unreadable.update(_record(dataset, bad, warned))
            if images is not None:
                yield probe_features(backbone, images.to(device, non_blocking=True), mode), labels.to(device)

    return batches


@torch.no_grad()
def extract_features(
    backbone: VisionTransformer, dataset: ProbeImages, mode: str, batch_size: int, device: torch.device,
    num_workers: int = 0, warned: UnreadableImages | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass in file order: features (N, F) float32 (zeros for unreadable files), labels (N,) int64 and a
    readable mask (N,) bool, all on `device`; unreadable files go to `warned` (a new record when None), which
    warns once per file."""
    warned = UnreadableImages() if warned is None else warned
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_readable,
                        pin_memory=device.type == "cuda")
    feats = torch.zeros(len(dataset), feature_dim(backbone, mode), device=device)
    labels = torch.tensor(dataset.index.labels, dtype=torch.int64, device=device)
    readable = torch.zeros(len(dataset), dtype=torch.bool, device=device)
    for images, _, indices, bad in loader:
        _record(dataset, bad, warned)
        if images is not None:
            indices = indices.to(device)
            feats[indices] = probe_features(backbone, images.to(device, non_blocking=True), mode)
            readable[indices] = True
    return feats, labels, readable


def cached_batches(features: torch.Tensor, labels: torch.Tensor, readable: torch.Tensor, batch_size: int,
                   seed: int) -> Batches:
    """Cached feed: the same `epoch_order` batches as `image_batches`, cut from precomputed features (kept
    where they are: on a GPU, ImageNet's 1.28 M ViT-S cls4 features take 7.9 GB of its memory)."""

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in epoch_order(features.shape[0], batch_size, seed, epoch):
            idx = torch.tensor(idx, device=features.device)
            idx = idx[readable[idx]]
            if idx.numel():
                yield features[idx], labels[idx]

    return batches


# ---- the classifiers ------------------------------------------------------------------------------------


class LinearProbes(nn.Module):
    """One linear layer per learning rate over the same features: (B, F) -> (n_lrs, B, n_classes).

    Every layer starts from the same draw (official init: weights N(0, 0.01), bias 0) seeded by `seed`.
    """

    def __init__(self, dim: int, num_classes: int, n: int, seed: int = 0) -> None:
        super().__init__()
        weight = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(seed)) * 0.01
        self.layers = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(n))
        with torch.no_grad():
            for layer in self.layers:
                layer.weight.copy_(weight)
                layer.bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.stack([layer(features) for layer in self.layers])


def train_linear_probes(
    batches: Batches, dim: int, num_classes: int, lrs: Sequence[float], epochs: int, batch_size: int, seed: int = 0,
    device: torch.device | None = None,
) -> LinearProbes:
    """SGD (momentum 0.9, no weight decay) of one layer per rate in `lrs` (per 256 images, scaled by
    batch_size / 256), cosine-annealed per epoch to 0 (torch's CosineAnnealingLR(T_max=epochs) in closed
    form). The layers' losses are summed into one backward: each layer's gradient is its own."""
    probes = LinearProbes(dim, num_classes, len(lrs), seed).to(device or torch.device("cpu"))
    base = [lr * batch_size / 256 for lr in lrs]
    groups = [{"params": layer.parameters(), "lr": lr} for layer, lr in zip(probes.layers, base)]
    optimizer = torch.optim.SGD(groups, lr=base[0], momentum=0.9, weight_decay=0.0)
    for epoch in range(epochs):
        for group, lr in zip(optimizer.param_groups, base):
            group["lr"] = cosine_schedule(epoch, epochs, lr, 0.0)
        for features, labels in batches(epoch):
            logits = probes(features)  # (n_lrs, b, C)
            loss = sum(F.cross_entropy(out, labels) for out in logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return probes


@torch.no_grad()
def evaluate_probes(probes: LinearProbes, features: torch.Tensor, labels: torch.Tensor
                    ) -> tuple[list[float], list[float | None]]:
    """Top-1 and top-5 accuracy (%) of each layer; top-5 is None with fewer than 5 classes (as official)."""
    logits = probes(features)  # (n_lrs, N, C)
    ranked = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (n_lrs, N, k)
    hits = ranked == labels[None, :, None]
    top1 = (hits[..., 0].float().mean(dim=1) * 100).tolist()
    top5 = (hits.any(dim=-1).float().mean(dim=1) * 100).tolist() if logits.shape[-1] >= 5 else [None] * len(top1)
    return top1, top5


# ---- the command ----------------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    """Per learning rate (per 256 images) top-1 / top-5 (%) on the validation folder, and what was fed."""

    lrs: list[float]
    top1: list[float]
    top5: list[float | None]
    feature_mode: str
    feature_dim: int
    mode: str
    n_train: int
    n_val: int
    skipped_train: int
    skipped_val: int

    @property
    def best(self) -> int:
        """Index of the rate with the best top-1 (the first on ties)."""
        return max(range(len(self.lrs)), key=lambda i: (self.top1[i], -i))


def linear_probe(
    backbone: nn.Module, train_dir: str | Path, val_dir: str | Path, *, image_size: int,
    features: str = "auto", mode: str = "cached", lrs: Sequence[float] = DEFAULT_LRS, epochs: int = 100,
    batch_size: int = 256, device: torch.device | None = None, num_workers: int = 0, seed: int = 0,
) -> ProbeResult:
    """Train the probes on `train_dir` and read their accuracy on `val_dir` (class sub-folders, one label
    space). Raises DataError for a missing or empty folder, or one with no readable image."""
    if mode not in PROBE_MODES:
        raise ValueError(f"probe mode must be one of {PROBE_MODES}, got {mode!r}")
    device = device or torch.device("cpu")
    backbone = backbone.eval().requires_grad_(False)
    feat_mode = backbone_feature_mode(features, backbone)
    train_index = index_images(train_dir)
    val_index = index_in_classes_of(val_dir, train_dir, train_index)
    num_classes = len(train_index.classes)
    dim = feature_dim(backbone, feat_mode)
    view = eval_transform(image_size)
    warned = UnreadableImages()  # each unreadable file is warned about once, however many epochs read it

    val_f, val_l, val_ok = extract_features(
        backbone, ProbeImages(val_index, view, seed), feat_mode, batch_size, device, num_workers, warned)
    if not val_ok.any():
        raise DataError(f"none of the {len(val_index)} images under {val_dir} is readable")
    unreadable: set[int] = set()
    if mode == "cached":
        train_f, train_l, train_ok = extract_features(
            backbone, ProbeImages(train_index, view, seed), feat_mode, batch_size, device, num_workers, warned)
        unreadable.update(torch.nonzero(~train_ok).flatten().tolist())
        batches = cached_batches(train_f, train_l, train_ok, batch_size, seed)
    else:
        batches = image_batches(backbone, ProbeImages(train_index, train_transform(image_size), seed), feat_mode,
                                batch_size, seed, device, num_workers, unreadable=unreadable, warned=warned)
    probes = train_linear_probes(batches, dim, num_classes, lrs, epochs, batch_size, seed, device)
    if len(unreadable) == len(train_index):
        raise DataError(f"none of the {len(train_index)} images under {train_dir} is readable")
    top1, top5 = evaluate_probes(probes, val_f[val_ok], val_l[val_ok])
    return ProbeResult(list(lrs), top1, top5, feat_mode, dim, mode, len(train_index), len(val_index),
                       len(unreadable), int((~val_ok).sum()))
