"""The embedded demo data set: procedurally drawn shapes, generated on first use (no download possible).

Each class is one upright shape (circle, cross, ring, square, star, triangle) at a random position and a
slightly random size, light grey on a dark grey background with faint pixel noise. Everything but the
shape is nearly constant on purpose: DINO's two views of an image share every per-image property the
augmentations do not overwrite, and on earlier versions of this set (random colours, textured
backgrounds, random brightness, noise level and rotation) a 2-core, few-hundred-iteration run learned
those instead of the shape and ended below the random-init teacher on k-NN. The shape level is chosen so
that solarising (v -> 255 - v above 128) keeps it above the background (160 -> 95 against 30): a
solarised view still shows the shape. Every image has its own generator seeded from (seed, split, class, i), so the files are
byte-identical across runs and growing a count keeps the existing images.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DEMO_CLASSES = ("circle", "cross", "ring", "square", "star", "triangle")
SPLITS = ("train", "val")
MANIFEST = "demo_manifest.json"
JPEG_QUALITY = 90
BACKGROUND_GREY = (27.0, 33.0)  # range of the per-image background level
FOREGROUND_GREY = (155.0, 165.0)  # range of the per-image shape level; solarised (255 - v) it stays above the background
NOISE_SIGMA = 5.0  # pixel noise, the same for every image: a per-image noise level would be a shortcut
RADIUS = (0.25, 0.32)  # circumradius as a fraction of the image side, before the equal-area factor
_VERSION = 4  # bump when the drawing changes, so old folders are regenerated
_SUPERSAMPLE = 4  # draw the mask at 4x and box-filter it down: anti-aliased edges
# Circumradius factors that give every shape about the area of a square (2 r^2) of the drawn radius.
_AREA_SCALE = {"circle": 0.80, "cross": 0.99, "ring": 0.95, "square": 1.0, "star": 1.23, "triangle": 1.24}

log = logging.getLogger("fastdino.data")


def _polygon(cx: float, cy: float, radii: list[float], angle: float) -> list[tuple[float, float]]:
    """Vertices at evenly spaced angles from `angle`, the k-th at distance radii[k] from the centre."""
    n = len(radii)
    return [
        (cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n))
        for k, r in enumerate(radii)
    ]


def _bar(cx: float, cy: float, half_length: float, half_width: float, angle: float) -> list[tuple[float, float]]:
    """A rectangle centred on (cx, cy), long along `angle`; a cross is two of them at right angles."""
    c, s = math.cos(angle), math.sin(angle)
    hl, hw = half_length, half_width
    corners = ((-hl, -hw), (hl, -hw), (hl, hw), (-hl, hw))
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners]


def _shape_mask(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) float alpha in [0, 1] of one upright shape at a random position and size."""
    big = size * _SUPERSAMPLE
    r = rng.uniform(*RADIUS) * big * _AREA_SCALE[name]
    cx, cy = rng.uniform(r, big - r, size=2)  # r < big / 2 always: the shape fits in the image
    angle = -math.pi / 2  # upright: a random rotation is shared by both views, so DINO would learn it
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if name in ("circle", "ring"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        if name == "ring":
            inner = r * rng.uniform(0.45, 0.65)
            draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif name == "cross":
        for arm in (angle, angle + math.pi / 2):  # arms of half-width 0.3 r
            draw.polygon(_bar(cx, cy, r, 0.3 * r, arm), fill=255)
    else:
        radii = {"square": [r] * 4, "triangle": [r] * 3, "star": [r, 0.45 * r] * 5}[name]
        draw.polygon(_polygon(cx, cy, radii, angle), fill=255)
    return np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


def draw_demo_image(name: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of shape class `name`: grey shape, grey background, pixel noise."""
    background = rng.uniform(*BACKGROUND_GREY)
    alpha = _shape_mask(name, size, rng)[..., None]
    img = background * (1 - alpha) + rng.uniform(*FOREGROUND_GREY) * alpha
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

    Returns root. Regenerates from scratch when the parameters (or the generator version) differ or a
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
