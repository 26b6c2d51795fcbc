"""The embedded demo data set: procedurally drawn periodic patterns, generated on first use (no download).

Six classes of two-level grey pattern (checkerboard, diamonds, dots, grid, horizontal and vertical
stripes), each image at its own period (7-14 px on 64 px) and phase, light grey on dark grey with faint
pixel noise. Why patterns and not single shapes: DINO bootstraps from what two augmented views of one
image share. A random-init ViT's class token of a lone shape depends mostly on where the shape falls on
the patch grid, which random crops change, so the shared part is small and not the class; the student
then learns a constant output and the teacher collapses to uniform within a few hundred iterations (the
v4 shapes set did, docs/demo.md). Every crop of a pattern shows the class, so the shared part is large and
mostly the class. Held constant on purpose: the grey levels (a per-image brightness is shared by both
views and DINO learns it instead of the pattern) and the noise level. The period is the one nuisance
left: random crops rescale it, so it is only partly shared. The pattern level is solarisation-safe (160
-> 95 against 30). Every image has its own generator seeded from (seed, split, class, i), so the files
are byte-identical across runs and growing a count keeps the existing images.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from fastdino.data.files import DataError

DEMO_CLASSES = ("checkerboard", "diamonds", "dots", "grid", "hstripes", "vstripes")
SPLITS = ("train", "val")
MANIFEST = "demo_manifest.json"
JPEG_QUALITY = 90
BACKGROUND_GREY = (27.0, 33.0)  # range of the per-image background level
FOREGROUND_GREY = (155.0, 165.0)  # per-image pattern level; solarised (255 - v) it stays above the background
NOISE_SIGMA = 5.0  # pixel noise, the same for every image: a per-image noise level would be a shortcut
PERIOD = (7.0, 14.0)  # pattern period in pixels of a 64 px image (scaled with the image size)
_VERSION = 5  # bump when the drawing changes, so old folders are regenerated
_SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges

log = logging.getLogger("fastdino.data")


def _pattern(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean foreground of class `name` from the two phase fields u, v (radians, one period = 2 pi).

    Every class is symmetric under a horizontal flip, so DINO's random flip keeps the class.
    """
    if name == "checkerboard":
        return np.cos(u) * np.cos(v) > 0
    if name == "diamonds":  # a checkerboard turned by 45 degrees
        return np.cos((u + v) / 1.4) * np.cos((u - v) / 1.4) > 0
    if name == "dots":
        return np.cos(u) + np.cos(v) > 1.0
    if name == "grid":  # thin lines both ways
        return (np.cos(u) > 0.8) | (np.cos(v) > 0.8)
    if name == "hstripes":
        return np.cos(v) > 0
    if name == "vstripes":
        return np.cos(u) > 0
    raise ValueError(f"unknown demo class {name!r}; expected one of {DEMO_CLASSES}")


def draw_demo_image(name: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of pattern class `name`: random period and phase, grey levels, pixel noise."""
    big = size * _SUPERSAMPLE
    period = rng.uniform(*PERIOD) * size / 64 * _SUPERSAMPLE
    phase = rng.uniform(0, 2 * np.pi, size=2)
    y, x = np.mgrid[0:big, 0:big].astype(np.float32)
    fg = _pattern(name, 2 * np.pi * x / period + phase[0], 2 * np.pi * y / period + phase[1]).astype(np.float32)
    alpha = fg.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))[..., None]
    background, foreground = rng.uniform(*BACKGROUND_GREY), rng.uniform(*FOREGROUND_GREY)
    img = background * (1 - alpha) + foreground * alpha
    img = np.broadcast_to(img, (size, size, 3)) + rng.normal(0, NOISE_SIGMA, size=(size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8))


def _expected_files(root: Path, params: dict) -> list[tuple[Path, str, str, int]]:
    """(path, split, class, i) of every image the parameters ask for."""
    files = []
    for split in SPLITS:
        n = params[f"n_{split}_per_class"]
        width = max(4, len(str(n - 1)))
        for name in DEMO_CLASSES:
            files += [(root / split / name / f"{i:0{width}d}.jpg", split, name, i) for i in range(n)]
    return files


def make_demo_dataset(
    root: str | Path, n_train_per_class: int = 300, n_val_per_class: int = 100, size: int = 64, seed: int = 0
) -> Path:
    """Write root/{train,val}/<class>/NNNN.jpg unless a matching manifest and all files are already there.

    Returns root. Raises DataError when root holds anything but a demo data set (no manifest): the user's own
    images are never overwritten. Regenerates from scratch when the parameters (or the generator version) differ or a
    file is missing; the manifest is written last, so an interrupted generation is redone. Not safe to
    run from several processes at once: call it on one rank, then barrier.
    """
    if n_train_per_class < 1 or n_val_per_class < 1 or size < 16:
        raise ValueError(
            f"need >= 1 image per class and size >= 16, got {n_train_per_class}, {n_val_per_class}, {size}"
        )
    root = Path(root)
    params = {
        "version": _VERSION,
        "classes": list(DEMO_CLASSES),
        "n_train_per_class": n_train_per_class,
        "n_val_per_class": n_val_per_class,
        "size": size,
        "seed": seed,
        "jpeg_quality": JPEG_QUALITY,
    }
    files = _expected_files(root, params)
    manifest = root / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()) == params and all(p.is_file() for p, *_ in files):
        return root

    if not manifest.is_file() and root.is_dir() and any(root.iterdir()):
        raise DataError(
            f"data.path {root} holds files that are not the demo data set: the demo writes its own images and "
            "would replace its train/ and val/; point data.path at a new or empty folder (default runs/demo/data), "
            "and train on your own images with `fastdino train`"
        )
    log.info("generating the demo data set in %s (%d images of %d px)", root, len(files), size)
    manifest.unlink(missing_ok=True)
    for split in SPLITS:
        shutil.rmtree(root / split, ignore_errors=True)
    for split in SPLITS:
        for name in DEMO_CLASSES:
            (root / split / name).mkdir(parents=True)
    for path, split, name, i in files:
        rng = np.random.default_rng([seed, SPLITS.index(split), DEMO_CLASSES.index(name), i])
        draw_demo_image(name, size, rng).save(path, quality=JPEG_QUALITY)
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps(params, indent=1))
    os.replace(tmp, manifest)
    return root
