"""Group masks and block corruption for GMML (SiT, Atito et al. 2021, arXiv 2104.03602, Sec. 3.1; SPEC "SiT").

Groups of connected patches, not scattered single patches, are corrupted: random rectangles of whole patches
(grid-aligned) are added until a target fraction of the patch grid is covered, and each rectangle is filled
with noise, the same region of another image of the batch, zeros, or left unchanged with a small probability.
The reference code draws and writes one block at a time in a Python loop per image; here a whole batch is
done at once on its device, without a host sync:

- every image draws `n_candidates` blocks at once ((B, R) tops, lefts, heights, widths);
- the running union of its first r blocks is a cumulative sum over r, so the cover after each block is known
  for every r, and the image keeps its first blocks up to the one that reaches the target.

`n_candidates` is sized so the target is reached with overwhelming probability (about three times the
expected need); an image that does not reach it keeps all its blocks. Randomness comes from `generator`, or
the device's global generator when None (the trainer checkpoints that one: masks are exact on resume).
Everything here knows shapes and pixels only, no model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastdino.data.multicrop import IMAGENET_MEAN, IMAGENET_STD

CORRUPTION_KINDS = ("noise", "replace", "zeros")
# Codes of the per-patch kind map (`Corruption.kind`): what each patch of the mask was filled with.
OUTSIDE, KEEP, NOISE, REPLACE, ZEROS, GREY, BLUR = -1, 0, 1, 2, 3, 4, 5
_CODE = {"noise": NOISE, "replace": REPLACE, "zeros": ZEROS}
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's convert("L")


@dataclass
class GroupMask:
    """Blocks drawn for a batch; patch units throughout.

    mask: (B, gh, gw) bool, the union of the kept blocks.
    owner: (B, gh, gw) int64, index of the last kept block covering each patch, -1 outside the mask.
    blocks: (B, R, 4) int64, every candidate block as (top, left, height, width).
    kept: (B, R) bool, the blocks that make up the mask (a prefix of each row).
    """

    mask: torch.Tensor
    owner: torch.Tensor
    blocks: torch.Tensor
    kept: torch.Tensor


def block_sides(grid: int, max_block: float, min_block: int) -> tuple[int, int]:
    """(smallest, largest) block side in patches on a grid of `grid` patches: max_block is a fraction of it."""
    low = min(min_block, grid)
    return low, max(low, min(grid, round(max_block * grid)))


def n_candidates(grid_h: int, grid_w: int, ratio: float, max_block: float, min_block: int) -> int:
    """Blocks drawn per image: three times what random blocks of the mean area need to cover `ratio` of the
    grid (union of r blocks ~ 1 - exp(-r * area / N)), plus 16."""
    lo_h, hi_h = block_sides(grid_h, max_block, min_block)
    lo_w, hi_w = block_sides(grid_w, max_block, min_block)
    mean_area = (lo_h + hi_h) / 2 * (lo_w + hi_w) / 2
    n = grid_h * grid_w
    return int(math.ceil(3 * -math.log1p(-ratio) * n / mean_area)) + 16


def _uniform_int(low: torch.Tensor | int, high: torch.Tensor | int, shape: tuple[int, ...], device, generator):
    """Integers uniform in [low, high] (inclusive, elementwise), from one `rand` draw."""
    u = torch.rand(shape, device=device, generator=generator)
    return (low + (u * (high - low + 1)).floor().long()).clamp(max=high)


def draw_blocks(
    batch: int, grid_h: int, grid_w: int, n_blocks: int, max_block: float, min_block: int = 1,
    device: torch.device | str | None = None, generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """n_blocks random grid-aligned rectangles per image, each inside the grid.

    Returns blocks (B, n_blocks, 4) int64 (top, left, height, width) and their patch masks
    (B, n_blocks, gh, gw) bool. Sides are uniform in `block_sides`, positions uniform over where they fit.
    """
    shape = (batch, n_blocks)
    h = _uniform_int(*block_sides(grid_h, max_block, min_block), shape, device, generator)
    w = _uniform_int(*block_sides(grid_w, max_block, min_block), shape, device, generator)
    top = _uniform_int(0, grid_h - h, shape, device, generator)
    left = _uniform_int(0, grid_w - w, shape, device, generator)
    rows = torch.arange(grid_h, device=device)
    cols = torch.arange(grid_w, device=device)
    in_rows = (rows >= top[..., None]) & (rows < (top + h)[..., None])  # (B, R, gh)
    in_cols = (cols >= left[..., None]) & (cols < (left + w)[..., None])  # (B, R, gw)
    return torch.stack((top, left, h, w), dim=-1), in_rows[..., :, None] & in_cols[..., None, :]


def group_masks(
    batch: int, grid_h: int, grid_w: int, ratio: float, max_block: float = 0.3, min_block: int = 1,
    device: torch.device | str | None = None, generator: torch.Generator | None = None,
) -> GroupMask:
    """GMML masks for a batch: blocks added until at least `ratio` of the gh x gw patches is covered.

    The cover overshoots the target by less than one block (at most `block_sides(...)[1]**2` patches).
    Raises ValueError for a ratio outside (0, 1).
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    r = n_candidates(grid_h, grid_w, ratio, max_block, min_block)
    blocks, cells = draw_blocks(batch, grid_h, grid_w, r, max_block, min_block, device, generator)
    cells = cells.flatten(2)  # (B, R, N)
    target = math.ceil(ratio * grid_h * grid_w)
    union = cells.cumsum(1, dtype=torch.int32) > 0  # (B, R, N): cover after blocks 0..r
    reached = union.sum(-1) >= target  # (B, R)
    last = torch.where(reached.any(1), reached.int().argmax(1), r - 1)  # (B,) first block that reaches it
    mask = union.gather(1, last[:, None, None].expand(-1, 1, cells.shape[-1])).squeeze(1)  # (B, N)
    index = torch.arange(r, device=cells.device)
    kept = index[None, :] <= last[:, None]  # (B, R)
    owner = torch.where(cells & kept[..., None], index[None, :, None], -1).amax(1)  # (B, N)
    return GroupMask(mask.view(batch, grid_h, grid_w), owner.view(batch, grid_h, grid_w), blocks, kept)


@dataclass
class Corruption:
    """A corrupted batch and where its pixels came from.

    images: (B, C, H, W) the corrupted views, the input dtype.
    mask: (B, 1, H, W) bool, every pixel of every block (unchanged blocks included): what is reconstructed.
    kind: (B, gh, gw) int64 per-patch code (OUTSIDE, KEEP, NOISE, REPLACE, ZEROS, GREY, BLUR).
    block_kind: (B, R) int64 code of each candidate block of `groups` (meaningful where groups.kept).
    source: (B,) int64, the image a `replace` block of image i copies from (never i when its group has > 1).
    blur_sigma: (B,) float32 sigma in pixels of each image's blurred block (0 where there is none).
    groups: the GroupMask the blocks came from.
    """

    images: torch.Tensor
    mask: torch.Tensor
    kind: torch.Tensor
    block_kind: torch.Tensor
    source: torch.Tensor
    blur_sigma: torch.Tensor
    groups: GroupMask


def to_pixels(patch_map: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, gh, gw) -> (B, gh * p, gw * p): every patch value repeated over its p x p pixels."""
    return patch_map.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)


def greyscale(images: torch.Tensor) -> torch.Tensor:
    """Colour drop of ImageNet-normalised (B, 3, H, W) images: the ITU-R 601 luma in pixel space, put back in
    every channel and normalised again (so the result is the normalised grey image, not a channel mean)."""
    # Python scalars, not small tensors: a host-to-device copy would synchronise the device
    channels = zip(_LUMA, IMAGENET_MEAN, IMAGENET_STD)
    luma = sum(w * (images[:, ch : ch + 1] * s + m) for ch, (w, m, s) in enumerate(channels))  # (B, 1, H, W)
    return torch.cat([(luma - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], dim=1)  # (B, 3, H, W)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) images with one sigma per image (B,), in pixels; reflect
    padding; the kernel spans +-3 max_sigma (an upper bound of sigma known on the host: no sync), at most the
    image. One grouped convolution per axis for the whole batch."""
    b, c, h, w = images.shape
    radius = max(1, min(int(math.ceil(3 * max_sigma)), min(h, w) - 1))
    x = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float32)
    kernel = torch.exp(-(x[None, :] ** 2) / (2 * sigma.float()[:, None] ** 2))  # (B, K)
    kernel = (kernel / kernel.sum(1, keepdim=True)).to(images.dtype).repeat_interleave(c, 0)  # (B*C, K)
    out = images.reshape(1, b * c, h, w)
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=b * c)
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=b * c)
    return out.view(b, c, h, w)


def _one_block_per_image(
    batch: int, grid_h: int, grid_w: int, prob: float, max_block: float, min_block: int, device, generator,
) -> torch.Tensor:
    """(B, gh, gw) bool: one random block in each image chosen with probability `prob`, nothing elsewhere."""
    _, cells = draw_blocks(batch, grid_h, grid_w, 1, max_block, min_block, device, generator)
    chosen = torch.rand(batch, device=device, generator=generator) < prob
    return cells[:, 0] & chosen[:, None, None]


def corrupt_images(
    images: torch.Tensor,
    patch_size: int,
    ratio: float,
    kinds: tuple[str, ...] = ("noise", "replace"),
    keep_prob: float = 0.1,
    grey_prob: float = 0.0,
    blur_prob: float = 0.0,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    max_block: float = 0.3,
    min_block: int = 1,
    group_size: int | None = None,
    generator: torch.Generator | None = None,
) -> Corruption:
    """GMML corruption of a batch of normalised images (B, C, H, W), H and W multiples of patch_size.

    In order (a later step overwrites an earlier one where they overlap): with probability grey_prob one
    block of an image turns grey (`greyscale`), with probability blur_prob one block is blurred (sigma uniform
    in blur_sigma pixels, `gaussian_blur`), then the group mask's blocks (`group_masks`) are each left
    unchanged with probability keep_prob, else filled by one of `kinds` drawn uniformly: noise N(0, 1),
    `replace` from the same pixels of another image (one partner per image, drawn within its group of
    `group_size` consecutive images, e.g. one augmented view of the batch; default the whole batch), zeros.
    The mask covers all of these blocks. Raises ValueError for bad sizes, kinds or ratio.
    """
    b, c, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch_size}")
    unknown = set(kinds) - set(CORRUPTION_KINDS)
    if not kinds or unknown:
        raise ValueError(f"corruption kinds must be among {CORRUPTION_KINDS}, got {kinds}")
    group_size = group_size or b
    if b % group_size:
        raise ValueError(f"batch {b} is not a multiple of group_size {group_size}")
    gh, gw, device = h // patch_size, w // patch_size, images.device

    kind = torch.full((b, gh, gw), OUTSIDE, dtype=torch.long, device=device)
    sigma = torch.zeros(b, device=device)
    if grey_prob > 0:
        grey_cells = _one_block_per_image(b, gh, gw, grey_prob, max_block, min_block, device, generator)
        kind = torch.where(grey_cells, GREY, kind)
    if blur_prob > 0:
        blur_cells = _one_block_per_image(b, gh, gw, blur_prob, max_block, min_block, device, generator)
        kind = torch.where(blur_cells, BLUR, kind)
        sigma = torch.empty(b, device=device).uniform_(*blur_sigma, generator=generator)
        sigma = torch.where(blur_cells.flatten(1).any(1), sigma, 0.0)
    groups = group_masks(b, gh, gw, ratio, max_block, min_block, device, generator)
    pick = _uniform_int(0, len(kinds) - 1, groups.kept.shape, device, generator)  # (B, R) index into kinds
    block_kind = sum((pick == i).long() * _CODE[k] for i, k in enumerate(kinds))  # codes without a host copy
    keep = torch.rand(groups.kept.shape, device=device, generator=generator) < keep_prob
    block_kind = torch.where(keep, KEEP, block_kind)
    owned = block_kind.gather(1, groups.owner.clamp(min=0).flatten(1)).view(b, gh, gw)
    kind = torch.where(groups.mask, owned, kind)
    within = torch.arange(b, device=device) % group_size
    shift = _uniform_int(1, max(group_size - 1, 1), (b,), device, generator) if group_size > 1 else 0
    source = torch.arange(b, device=device) - within + (within + shift) % group_size  # (B,)

    pixel_kind = to_pixels(kind, patch_size)[:, None]  # (B, 1, H, W)
    out = images
    if grey_prob > 0:
        out = torch.where(pixel_kind == GREY, greyscale(images), out)
    if blur_prob > 0:
        out = torch.where(pixel_kind == BLUR, gaussian_blur(images, sigma.clamp(min=blur_sigma[0]), blur_sigma[1]), out)
    if "noise" in kinds:
        noise = torch.randn(images.shape, device=device, generator=generator, dtype=images.dtype)
        out = torch.where(pixel_kind == NOISE, noise, out)
    if "replace" in kinds:
        out = torch.where(pixel_kind == REPLACE, images[source], out)
    if "zeros" in kinds:
        out = torch.where(pixel_kind == ZEROS, torch.zeros((), dtype=images.dtype, device=device), out)
    return Corruption(out, pixel_kind != OUTSIDE, kind, block_kind, source, sigma, groups)
