"""The embedded demo data set: procedurally drawn shapes, generated on first use (no download possible).

Each class is one shape (circle, cross, ring, square, star, triangle) at a random size, position and
rotation, light and nearly grey over a dark, nearly grey textured background (gradient, stripes, blobs or
checks, plus pixel noise). Brightness and tint are drawn independently of the class and each shape is
scaled to about the same area, so neither colour nor the amount of foreground gives the class: only the
shape does, which is what self-supervised features must pick up to beat a random network on k-NN.
Colours are kept nearly grey on purpose: with a random vivid colour per image, DINO (whose two views of
an image share its colours) learned colour instead of shape and stayed at chance on k-NN.
Every image has its own generator seeded from (seed, split, class, i), so the files are byte-identical
across runs and growing a count keeps the existing images.
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
BACKGROUND_CONTRAST = 40.0  # largest per-channel offset of a texture colour from the base colour
BACKGROUND_MAX = 100.0  # backgrounds are dark and shapes light (nearly grey, TINT apart per channel): a colour
FOREGROUND_MIN = 160.0  # of its own per image is a shortcut DINO takes instead of the shape (seen: k-NN at chance)
TINT = 20.0
_VERSION = 3  # bump when the drawing changes, so old folders are regenerated
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
    """(size, size) float alpha in [0, 1] of one randomly placed, sized and rotated shape."""
    big = size * _SUPERSAMPLE
    r = rng.uniform(0.20, 0.34) * big * _AREA_SCALE[name]
    cx, cy = rng.uniform(r, big - r, size=2)  # r < big / 2 always: the shape fits in the image
    angle = rng.uniform(0, 2 * math.pi)
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


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size, 3) float textured background in [0, 255].

    Texture colours stay within BACKGROUND_CONTRAST of a base colour: textured enough that raw pixels
    classify poorly, soft enough that a small ViT learns the shapes in a few CPU minutes.
    """
    base = rng.uniform(0, BACKGROUND_MAX, size=1) + rng.uniform(-TINT, TINT, size=3)  # dark, nearly grey
    palette = np.stack([base, np.clip(base + rng.uniform(-1, 1, size=3) * BACKGROUND_CONTRAST, 0, 255)])
    kind = rng.integers(4)
    if kind == 2:  # colour blobs: a coarse grid of random colours, bicubic-upsampled
        cells = int(rng.integers(2, 6))
        grid = np.clip(base + rng.uniform(-1, 1, size=(cells, cells, 3)) * BACKGROUND_CONTRAST, 0, 255)
        img = Image.fromarray(grid.astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(img, dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    theta = rng.uniform(0, 2 * math.pi)
    u = xx * math.cos(theta) + yy * math.sin(theta)  # coordinate along a random direction
    if kind == 0:  # linear gradient
        t = (u - u.min()) / (u.max() - u.min())
    elif kind == 1:  # soft stripes, 3 to 8 periods across
        t = 0.5 + 0.5 * np.sin(2 * math.pi * rng.uniform(3, 8) * u + rng.uniform(0, 2 * math.pi))
    else:  # checks, 3 to 6 cells across, rotated
        v = -xx * math.sin(theta) + yy * math.cos(theta)
        n = rng.uniform(3, 6)
        t = ((np.floor(u * n) + np.floor(v * n)) % 2).astype(np.float32)
    return palette[0] * (1 - t[..., None]) + palette[1] * t[..., None]


def _foreground_colour(rng: np.random.Generator) -> np.ndarray:
    """A light, nearly grey colour: brighter than any background, so the shape always stands out."""
    return np.clip(rng.uniform(FOREGROUND_MIN, 255, size=1) + rng.uniform(-TINT, TINT, size=3), 0, 255)


def draw_demo_image(name: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of shape class `name`."""
    background = _background(size, rng)
    alpha = _shape_mask(name, size, rng)[..., None]
    colour = _foreground_colour(rng)
    img = background * (1 - alpha) + colour * alpha
    img += rng.normal(0, rng.uniform(3, 12), size=img.shape)
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
