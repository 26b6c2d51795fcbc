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

Data parallel: every process seeds its global generator alike, so with `rows` (`BatchRows`: where this
process's images sit in the step's global batch) each per-image number is drawn for the whole global batch
and a process keeps its own rows. An image then gets the same blocks, kinds, grey / blur blocks and blur
sigma whatever the number of processes. Two things stay per process: the noise values and the `replace`
partner. Noise is drawn for the local images only (drawing every process's pixels would cost the world size
in random numbers), from a stream of the process's own, seeded from one draw of the CPU default generator
(no device sync) and the process index: distinct on every process, and the shared stream advances alike
whatever the process count. The partner is another image of the process's own batch (other processes'
pixels are not there; the reference code also takes it from the local batch).
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


@dataclass(frozen=True)
class BatchRows:
    """Where one process's B images sit in the step's global batch of `total` images.

    index: (B,) int64 row of each local image in the global batch (`process_rows`).
    total: the global batch size: per-image random numbers are drawn for all of it (the same draw on every
    process, whose generators are in the same state) and each process keeps `index`.
    process: the process's rank (it seeds the process's noise stream).
    """

    index: torch.Tensor
    total: int
    process: int = 0


def process_rows(per_view: int, n_views: int, rank: int, world_size: int,
                 device: torch.device | str | None = None) -> BatchRows:
    """Rows of a process's torch.cat of `n_views` views of `per_view` images each, in the global batch laid out
    the same way (view-major, the images in the sampler's order): image i of view v on process `rank` is row
    v * world_size * per_view + i * world_size + rank, as data/loader.py's ResumableShardedSampler gives each
    process every world_size-th image of the step's slice of the permutation. One process: arange."""
    global_view = world_size * per_view
    local = torch.arange(per_view, device=device) * world_size + rank  # (per_view,)
    index = torch.cat([local + v * global_view for v in range(n_views)])  # (n_views * per_view,)
    return BatchRows(index, n_views * global_view, rank)


def _noise_stream(rows: BatchRows, device, generator: torch.Generator | None) -> torch.Generator:
    """The process's noise generator for one batch: seeded from one draw of the CPU generator (`generator` when
    it is a CPU one, else the CPU default: a host value, no device sync) and the process index."""
    cpu = generator if generator is not None and generator.device.type == "cpu" else None
    seed = int(torch.randint(2**62, (1,), generator=cpu)) + rows.process
    return torch.Generator(device=device).manual_seed(seed)


def rand_rows(shape: tuple[int, ...], device=None, generator: torch.Generator | None = None,
              rows: BatchRows | None = None) -> torch.Tensor:
    """Uniforms in [0, 1) of `shape` (B, ...); with `rows`, row i is row rows.index[i] of one draw of
    (rows.total, ...): the same number for an image whatever process holds it."""
    if rows is None:
        return torch.rand(shape, device=device, generator=generator)
    return torch.rand((rows.total, *shape[1:]), device=device, generator=generator)[rows.index]


def _uniform_int(low: torch.Tensor | int, high: torch.Tensor | int, shape: tuple[int, ...], device, generator,
                 rows: BatchRows | None = None):
    """Integers uniform in [low, high] (inclusive, elementwise), from one `rand` draw (`rand_rows`)."""
    u = rand_rows(shape, device, generator, rows)
    return (low + (u * (high - low + 1)).floor().long()).clamp(max=high)


def draw_blocks(
    batch: int, grid_h: int, grid_w: int, n_blocks: int, max_block: float, min_block: int = 1,
    device: torch.device | str | None = None, generator: torch.Generator | None = None,
    rows: BatchRows | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """n_blocks random grid-aligned rectangles per image, each inside the grid.

    Returns blocks (B, n_blocks, 4) int64 (top, left, height, width) and their patch masks
    (B, n_blocks, gh, gw) bool. Sides are uniform in `block_sides`, positions uniform over where they fit.
    """
    shape = (batch, n_blocks)
    h = _uniform_int(*block_sides(grid_h, max_block, min_block), shape, device, generator, rows)
    w = _uniform_int(*block_sides(grid_w, max_block, min_block), shape, device, generator, rows)
    top = _uniform_int(0, grid_h - h, shape, device, generator, rows)
    left = _uniform_int(0, grid_w - w, shape, device, generator, rows)
    rows = torch.arange(grid_h, device=device)
    cols = torch.arange(grid_w, device=device)
    in_rows = (rows >= top[..., None]) & (rows < (top + h)[..., None])  # (B, R, gh)
    in_cols = (cols >= left[..., None]) & (cols < (left + w)[..., None])  # (B, R, gw)
    return torch.stack((top, left, h, w), dim=-1), in_rows[..., :, None] & in_cols[..., None, :]


def group_masks(
    batch: int, grid_h: int, grid_w: int, ratio: float, max_block: float = 0.3, min_block: int = 1,
    device: torch.device | str | None = None, generator: torch.Generator | None = None,
    rows: BatchRows | None = None,
) -> GroupMask:
    """GMML masks for a batch: blocks added until at least `ratio` of the gh x gw patches is covered.

    The cover overshoots the target by less than one block (at most `block_sides(...)[1]**2` patches).
    With `rows`, image i gets the mask of global row rows.index[i]. Raises ValueError for a ratio outside (0, 1).
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    r = n_candidates(grid_h, grid_w, ratio, max_block, min_block)
    blocks, cells = draw_blocks(batch, grid_h, grid_w, r, max_block, min_block, device, generator, rows)
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
    batch: int, grid_h: int, grid_w: int, prob: float, max_block: float, min_block: int, device, generator, rows,
) -> torch.Tensor:
    """(B, gh, gw) bool: one random block in each image chosen with probability `prob`, nothing elsewhere."""
    _, cells = draw_blocks(batch, grid_h, grid_w, 1, max_block, min_block, device, generator, rows)
    chosen = rand_rows((batch,), device, generator, rows) < prob
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
    rows: BatchRows | None = None,
) -> Corruption:
    """GMML corruption of a batch of normalised images (B, C, H, W), H and W multiples of patch_size.

    In order (a later step overwrites an earlier one where they overlap): with probability grey_prob one
    block of an image turns grey (`greyscale`), with probability blur_prob one block is blurred (sigma uniform
    in blur_sigma pixels, `gaussian_blur`), then the group mask's blocks (`group_masks`) are each left
    unchanged with probability keep_prob, else filled by one of `kinds` drawn uniformly: noise N(0, 1),
    `replace` from the same pixels of another image (one partner per image, drawn within its group of
    `group_size` consecutive images, e.g. one augmented view of the batch; default the whole batch), zeros.
    The mask covers all of these blocks. With `rows` (data parallel: this process's place in the global
    batch), every per-image draw but the partner is that of the image's global row, and the noise comes from
    the process's own stream (module docstring).
    Raises ValueError for bad sizes, kinds or ratio.
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
        grey_cells = _one_block_per_image(b, gh, gw, grey_prob, max_block, min_block, device, generator, rows)
        kind = torch.where(grey_cells, GREY, kind)
    if blur_prob > 0:
        blur_cells = _one_block_per_image(b, gh, gw, blur_prob, max_block, min_block, device, generator, rows)
        kind = torch.where(blur_cells, BLUR, kind)
        low, high = blur_sigma
        sigma = low + (high - low) * rand_rows((b,), device, generator, rows)
        sigma = torch.where(blur_cells.flatten(1).any(1), sigma, 0.0)
    groups = group_masks(b, gh, gw, ratio, max_block, min_block, device, generator, rows)
    pick = _uniform_int(0, len(kinds) - 1, groups.kept.shape, device, generator, rows)  # (B, R) index into kinds
    block_kind = sum((pick == i).long() * _CODE[k] for i, k in enumerate(kinds))  # codes without a host copy
    keep = rand_rows(groups.kept.shape, device, generator, rows) < keep_prob
    block_kind = torch.where(keep, KEEP, block_kind)
    owned = block_kind.gather(1, groups.owner.clamp(min=0).flatten(1)).view(b, gh, gw)
    kind = torch.where(groups.mask, owned, kind)
    within = torch.arange(b, device=device) % group_size
    shift = _uniform_int(1, max(group_size - 1, 1), (b,), device, generator, rows) if group_size > 1 else 0
    source = torch.arange(b, device=device) - within + (within + shift) % group_size  # (B,)

    pixel_kind = to_pixels(kind, patch_size)[:, None]  # (B, 1, H, W)
    out = images
    if grey_prob > 0:
        out = torch.where(pixel_kind == GREY, greyscale(images), out)
    if blur_prob > 0:
        out = torch.where(pixel_kind == BLUR, gaussian_blur(images, sigma.clamp(min=blur_sigma[0]), blur_sigma[1]), out)
    if "noise" in kinds:
        stream = generator if rows is None else _noise_stream(rows, device, generator)
        noise = torch.randn(images.shape, device=device, generator=stream, dtype=images.dtype)
        out = torch.where(pixel_kind == NOISE, noise, out)
    if "replace" in kinds:
        out = torch.where(pixel_kind == REPLACE, images[source], out)
    if "zeros" in kinds:
        out = torch.where(pixel_kind == ZEROS, torch.zeros((), dtype=images.dtype, device=device), out)
    return Corruption(out, pixel_kind != OUTSIDE, kind, block_kind, source, sigma, groups)
