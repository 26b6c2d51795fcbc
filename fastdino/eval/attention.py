"""Class-token self-attention maps of the last block (the DINO paper's attention and segmentation figures;
official `visualize_attention.py`).

For each head h of the last block, the map is the class token's attention row over the patch tokens,
A[h, 0, 1:], renormalised to sum to 1 over the patches (the class token's attention to itself is left
out, as the paper's figures do). The `mass` mask of a map keeps the fewest patches whose attention sums
to at least `mass` (0.6 in the paper): thresholding attention this way gives object masks with no labels.
Maps and masks are upsampled to the image by repeating each patch's value over its pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from fastdino.data.files import DECODE_ERRORS, DataError, decode_rgb
from fastdino.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
from fastdino.models.vit import VisionTransformer
from fastdino.reports.plots import save_attention_grid

log = logging.getLogger("fastdino")

# PIL raises these for missing modes, truncated or malformed files, and absurd sizes.


def read_image(path: str | Path) -> Image.Image:
    """Decode `path` to RGB; a missing or unreadable file raises DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image {path} does not exist")
    try:
        return decode_rgb(str(path))  # upright (EXIF), 16-bit scaled: as training and k-NN see it
    except DECODE_ERRORS as exc:
        raise DataError(f"image {path} is unreadable ({exc})") from exc


MAX_PATCHES = 4096
"""The most patches one map is computed over: the attention of N patches holds heads x N^2 floats (4096 patches of a
ViT-S/16: 6 x 4097^2 x 4 B = 0.4 GB); a wide strip resized to a 480 px short side would need far more."""


def crop_to_patches(img: Image.Image, patch_size: int, image_size: int = 0,
                    max_patches: int = MAX_PATCHES) -> Image.Image:
    """Resize the short side to `image_size` (bicubic; 0 keeps the size), then centre-crop both sides down to
    multiples of `patch_size`. An image that would hold more than `max_patches` patches is scaled down (aspect
    kept) until it fits, with a warning. Raises ValueError when the image is smaller than one patch."""
    w, h = img.size
    scale = image_size / min(w, h) if image_size else 1.0
    patches = (w * scale / patch_size) * (h * scale / patch_size)
    if patches > max_patches:
        scale *= (max_patches / patches) ** 0.5
        log.warning("a %dx%d image at --image-size %d would hold %d patches: scaled to %dx%d px instead (at most %d "
                    "patches, as the attention of every patch pair must fit in memory)", w, h, image_size,
                    patches, round(w * scale), round(h * scale), max_patches)
    if scale != 1.0:
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
    w, h = img.size
    cw, ch = w - w % patch_size, h - h % patch_size
    if cw == 0 or ch == 0:
        raise ValueError(f"a {w}x{h} image is smaller than one {patch_size} px patch")
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


_TO_INPUT = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
                        v2.ToPureTensor()])


@torch.no_grad()
def class_attention_maps(backbone: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """x: (3, H, W) normalised image, H and W multiples of the patch size -> (n_heads, H/p, W/p) float32 maps,
    each summing to 1 over the patches. Position embeddings are interpolated by the model for any size."""
    p = backbone.patch_size
    attn = backbone.get_last_selfattention(x[None])  # (1, n_heads, N+1, N+1), every impl: explicit softmax
    cls_to_patches = attn[0, :, 0, 1:].float()  # (n_heads, N)
    cls_to_patches = cls_to_patches / cls_to_patches.sum(dim=-1, keepdim=True)
    return cls_to_patches.reshape(-1, x.shape[-2] // p, x.shape[-1] // p)


def mass_mask(maps: torch.Tensor, mass: float = 0.6) -> torch.Tensor:
    """The fewest patches of each map whose values sum to >= mass * the map's sum, as a bool mask.

    maps: (..., h, w), non-negative -> (..., h, w) bool. Largest values first; among equal values the first
    in row-major order wins. Sums run in float64 so a mass just reached is not missed by rounding.
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    flat = maps.flatten(-2).double()  # (..., h*w)
    values, order = flat.sort(dim=-1, descending=True, stable=True)
    before = values.cumsum(dim=-1) - values  # mass of the larger patches before this one
    keep_sorted = before < mass * flat.sum(dim=-1, keepdim=True)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.reshape(maps.shape)


def upsample_patches(maps: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(..., h, w) -> (..., h*p, w*p): each patch's value repeated over its pixels (nearest)."""
    return maps.repeat_interleave(patch_size, dim=-2).repeat_interleave(patch_size, dim=-1)


def write_attention_maps(
    backbone: VisionTransformer, image_paths: Sequence[str | Path], out_dir: str | Path, image_size: int = 480,
    mass: float = 0.6, device: torch.device | None = None,
) -> list[Path]:
    """One PNG grid per image in `out_dir`, `<stem>_attention.png` (`<folder>_<stem>_attention.png` when two
    images share a stem): the image, each head's map, the mean over heads, and each map's `mass` mask. Every
    image is read first, so a missing or unreadable one (DataError) stops the command before any PNG is
    written. Returns the PNG paths."""
    device = device or torch.device("cpu")
    images = [read_image(p) for p in image_paths]
    backbone = backbone.eval()
    out_dir = Path(out_dir)
    written, used = [], set()
    stems = [Path(p).stem for p in image_paths]
    for i, (path, img) in enumerate(zip(image_paths, images)):
        try:
            img = crop_to_patches(img, backbone.patch_size, image_size)
        except ValueError as exc:
            raise DataError(f"image {path}: {exc}; pass a larger --image-size") from exc
        maps = class_attention_maps(backbone, _TO_INPUT(img).to(device)).cpu()  # (n_heads, h, w)
        maps = torch.cat((maps, maps.mean(dim=0, keepdim=True)))  # (n_heads + 1, h, w): the mean last
        masks = mass_mask(maps, mass)
        name = Path(path).stem if stems.count(Path(path).stem) == 1 else f"{Path(path).parent.name}_{Path(path).stem}"
        name = name if name not in used else f"{name}-{i}"
        used.add(name)
        p = backbone.patch_size
        written.append(save_attention_grid(
            np.asarray(img), upsample_patches(maps, p).numpy(), upsample_patches(masks, p).numpy(), p,
            out_dir / f"{name}_attention.png", mass=mass,
            title=f"{Path(path).name}: the class token's attention in the last block (each map sums to 1 over "
                  f"the patches)\nbelow each map: the fewest patches that hold {mass:.0%} of it",
        ))
    return written
