"""Image folders on disk: the index, a dataset that decodes and augments deterministically, the collate.

Each item is augmented under its own seed drawn from (seed, epoch, index), so a run's views do not depend
on the worker count, on which worker got the item, or on where a resumed run restarted. A bad file is
skipped (a long run should not die on one corrupt JPEG) by substituting the next index, so batches keep
their size; the substitutions are counted so the trainer can report them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fastdino.errors import UserError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
FLAT_CLASS = "."  # the one class of a folder without class sub-folders
MAX_SUBSTITUTIONS = 32  # bad files in a row before an item gives up: more means a broken data set, not bad luck

# PIL raises OSError for unreadable/truncated files (UnidentifiedImageError is one), SyntaxError from some
# plugins for malformed headers, ValueError for bad modes, DecompressionBombError for absurd sizes.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

log = logging.getLogger("fastdino.data")


class DataError(UserError, ValueError):
    """The data on disk cannot be used (missing folder, no images, too many unreadable files)."""


@dataclass
class ImageIndex:
    """Image paths in a deterministic order, their integer labels, and the class names the labels index."""

    paths: list[str]
    labels: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def _is_hidden(name: str) -> bool:
    # Skips `.ipynb_checkpoints`, `.git` and macOS `._x.jpg` resource forks (garbage with an image suffix).
    return name.startswith(".")


def _images_under(folder: Path, recursive: bool) -> list[str]:
    """Sorted image paths in `folder` (and below it when `recursive`), hidden entries skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d)) if recursive else []
        found += [
            os.path.join(dirpath, f)
            for f in filenames
            if not _is_hidden(f) and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
        ]
    return sorted(found)


def index_image_folder(root: str | Path, classes: Sequence[str] | None = None) -> ImageIndex:
    """Index `root`: each non-hidden sub-folder holding images is a class (sorted names, searched recursively).

    Without such sub-folders the images directly in `root` form the single class `FLAT_CLASS` (label 0).
    Pass the training index's `classes` when indexing a validation folder so both share one label space
    (a class missing from validation then keeps its label; a sub-folder not in `classes` is an error).
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"image folder {root} is not a folder")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not _is_hidden(p.name))
    per_class = {d.name: _images_under(d, recursive=True) for d in subdirs}
    per_class = {name: paths for name, paths in per_class.items() if paths}
    top_level = _images_under(root, recursive=False)
    if per_class and top_level:
        log.warning("%s: ignoring %d image(s) beside the class sub-folders", root, len(top_level))
    if not per_class:
        if not top_level:
            raise DataError(f"image folder {root} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        per_class = {FLAT_CLASS: top_level}

    if classes is None:
        classes = sorted(per_class)
    unknown = sorted(set(per_class) - set(classes))
    if unknown:
        raise DataError(f"image folder {root} has classes {unknown} that are not in the given classes")
    label_of = {name: label for label, name in enumerate(classes)}
    paths, labels = [], []
    for name in sorted(per_class, key=label_of.__getitem__):
        paths += per_class[name]
        labels += [label_of[name]] * len(per_class[name])
    return ImageIndex(paths=paths, labels=labels, classes=list(classes))


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 64-bit seed for one item of one epoch (nearby triples give unrelated streams)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0])


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator and `random` for one item, then give the caller its own states back.

    With num_workers=0 the dataset runs in the training process: its RNG (dropout, drop path) must not
    depend on data loading. Only the CPU default generator is touched: `torch.manual_seed` would also
    reseed CUDA generators.
    """
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)


def _decode_rgb(path: str) -> Image.Image:
    """Fully decode `path` to RGB: PIL decodes lazily, so only `load()` exposes a truncated file."""
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


class ImageFileDataset(Dataset):
    """Decodes indexed images and augments each one under `item_seed(seed, epoch, i)`.

    Items are `(views, label, n_skipped)`: `views` is the transform's list of tensors (a single tensor
    becomes a list of one), `n_skipped` the number of unreadable files substituted to fill this item.
    Unreadable files are reported once per process (each loader worker is a process of its own).
    """

    def __init__(self, index: ImageIndex, transform: Callable, seed: int = 0) -> None:
        if len(index) == 0:
            raise DataError("the image index is empty")
        self.index = index
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self._bad_paths: set[str] = set()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's augmentations; call before building the epoch's loader (workers copy it)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def _load(self, i: int) -> tuple[Image.Image, int, int]:
        """Image, label and skip count of slot `i`, substituting i+1, i+2, ... for unreadable files."""
        n = len(self.index)
        for n_skipped in range(min(n, MAX_SUBSTITUTIONS + 1)):
            j = (i + n_skipped) % n
            path = self.index.paths[j]
            if path in self._bad_paths:
                continue
            try:
                return _decode_rgb(path), self.index.labels[j], n_skipped
            except _DECODE_ERRORS as err:
                self._bad_paths.add(path)
                log.warning("skipping unreadable image %s: %s", path, err)
        raise DataError(f"no readable image among {n_skipped + 1} files from {self.index.paths[i]}")

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], int, int]:
        i = int(i)
        img, label, n_skipped = self._load(i)
        # The slot's seed, not the substitute's: slots i and i+1 then draw different views of one image.
        with _seeded(item_seed(self.seed, self.epoch, i)):
            views = self.transform(img)
        if isinstance(views, torch.Tensor):
            views = [views]
        return views, label, n_skipped


def collate_views(
    batch: Sequence[tuple[Sequence[torch.Tensor], int, int]],
) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """Stack items crop by crop: views[j] is (B, 3, H_j, W_j), labels (B,) int64, plus the batch's skip count."""
    views = [torch.stack(crops) for crops in zip(*(item[0] for item in batch), strict=True)]
    labels = torch.tensor([item[1] for item in batch], dtype=torch.int64)
    return views, labels, sum(item[2] for item in batch)
