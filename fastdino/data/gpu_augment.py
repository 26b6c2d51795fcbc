"""DINO multi-crop as batched tensor ops on the GPU: the `torch_gpu` data backend (issue 13).

The augmentations are the paper's (Caron et al. 2021, Sec. 3.1 and App. D; SPEC "Augmentations"). CPU
workers read each image's bytes (a file or a tar-shard member), read the JPEG header and its EXIF orientation
with Pillow (no decode), and draw every crop's random parameters from a generator seeded with
`item_seed(seed, epoch, index)`, so a batch depends only on its indices: a resumed run and any worker count
give the same views. The main process decodes the batch's JPEGs with one
`torchvision.io.decode_jpeg(list, device=...)` call (nvJPEG on the GPU), turns each image upright, then runs,
batched:

- random-resized-crop + flip: an antialiased bicubic resample per crop written as two matrix products (rows,
  then columns) with per-crop weight matrices: the filter of Pillow's and torch's antialiased bicubic resize
  (Keys cubic a = -0.5, support widened by the downscale factor, weights renormalised at the crop's edges);
  a flip reverses the column weights. All of one image's crops of one size take one pair of matmuls (images
  differ in size, so this is the one per-image loop). The filters are built for the whole batch at once over
  each crop's support only (a few taps per output pixel), and spread into each image's own dense matrices in
  the loop: memory follows the crops, not the largest image of the batch.
- colour jitter (p=0.8; brightness, contrast, saturation, hue in a per-sample random order, as torchvision's
  ColorJitter), grayscale (p=0.2), Gaussian blur (per-sample sigma; reflect padding and a sampled kernel of
  2*ceil(3*sigma_max)+1 taps, as torchvision's tensor blur; the cpu backend uses Pillow's box approximation),
  solarise (global crop 2, p=0.2, pixels >= 128/255), ImageNet normalisation: batched over every crop of one
  size, with per-sample factors; which samples an op touches is decided from the CPU copy of the parameters
  (no host sync).

On a GPU nothing here waits for the device: per-batch parameters go through pinned memory before their
`non_blocking` copies (a copy from pageable memory may wait for the stream), the constants (hue's HSV
offsets, the ImageNet mean and std) are made once per device, and which samples an op touches is read from
the CPU parameters (tests/test_gpu_augment.py runs an epoch under `torch.cuda.set_sync_debug_mode("error")`).
The decode itself runs on a side stream (`TorchGpuBatches._decode_jpegs` says why).

Files the GPU decoder is not given (PNG and other formats, CMYK or greyscale JPEG, a JPEG without its end
marker) are decoded in the worker by `files.decode_rgb`; a JPEG the decoder refuses is decoded on the CPU in
the main process; an unreadable file is substituted by the next index as in `ImageFileDataset`.

The ops run on CPU tensors too (tests, `perf/bench_data.py`). The views follow the cpu backend's recipe but
are not bitwise its views: the random draws and the resampling arithmetic (float here, uint8 between Pillow's
ops) differ.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from fastdino.data.batch import Batch, build_loader
from fastdino.data.files import (
    DECODE_ERRORS,
    MAX_SUBSTITUTIONS,
    DataError,
    ImageFileDataset,
    NamedBytes,
    decode_rgb,
    item_seed,
)
from fastdino.data.multicrop import IMAGENET_MEAN, IMAGENET_STD, MultiCrop
from fastdino.errors import ConfigError

# Columns of a crop's parameter row (float64): box in pixels of the upright image, then the draws.
P_TOP, P_LEFT, P_HEIGHT, P_WIDTH, P_FLIP, P_JITTER = range(6)
P_ORDER = 6  # 4 columns: the jitter ops in the order applied (0 brightness, 1 contrast, 2 saturation, 3 hue)
P_BRIGHTNESS, P_CONTRAST, P_SATURATION, P_HUE = range(10, 14)  # jitter factors, indexed P_BRIGHTNESS + op
P_GRAY, P_BLUR, P_SIGMA, P_SOLARIZE = range(14, 18)
N_PARAMS = 18
RATIO = (3 / 4, 4 / 3)  # random-resized-crop aspect range (torchvision's default, the paper's)
CROP_TRIES = 10  # random-resized-crop attempts before the centre-crop fallback, as torchvision
SOLARIZE_THRESHOLD = 128 / 255  # Pillow's solarise threshold 128 on uint8
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
_N_UNIFORMS = 4 * CROP_TRIES + 10  # per crop: crop tries, flip, jitter, 4 factors, grayscale, blur, sigma, solarise


@dataclass(frozen=True)
class CropRecipe:
    """The multi-crop settings the GPU backends run: 2 global crops then `n_local` local crops."""

    global_size: int
    local_size: int
    n_local: int
    global_scale: tuple[float, float]
    local_scale: tuple[float, float]
    blur_sigma: tuple[float, float]
    color_strength: float

    @classmethod
    def from_transform(cls, transform: object, backend: str = "torch_gpu") -> CropRecipe:
        """The recipe of a `MultiCrop`; ConfigError (data.backend) for any other transform."""
        if not isinstance(transform, MultiCrop):
            raise ConfigError(f"data.backend={backend} runs the DINO multi-crop only, not {type(transform).__name__}:"
                              " use data.backend=cpu", "data.backend")
        t = transform
        return cls(t.global_size, t.local_size, t.n_local, tuple(t.global_scale), tuple(t.local_scale),
                   tuple(t.blur_sigma), t.color_strength)

    @property
    def n_crops(self) -> int:
        return 2 + self.n_local

    def crop(self, k: int) -> tuple[int, tuple[float, float], float, float]:
        """Crop k's (size, scale range, blur probability, solarise probability): SPEC's 1.0 / 0.1 / 0.5 blur."""
        if k < 2:
            return self.global_size, self.global_scale, (1.0, 0.1)[k], (0.0, 0.2)[k]
        return self.local_size, self.local_scale, 0.5, 0.0

    def blur_taps(self, size: int) -> int:
        """Odd kernel length covering +-3 sigma_max, capped so reflect padding fits a `size` px crop."""
        half = min(math.ceil(3 * self.blur_sigma[1]), size - 1)
        return 2 * half + 1


def _crop_box(u: Sequence[float], height: int, width: int, scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (top, left, h, w) from 4 * CROP_TRIES uniforms in [0, 1)."""
    area = height * width
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    for t in range(CROP_TRIES):
        target = area * (scale[0] + u[4 * t] * (scale[1] - scale[0]))
        aspect = math.exp(log_lo + u[4 * t + 1] * (log_hi - log_lo))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u[4 * t + 2] * (height - h + 1)), height - h)
            left = min(int(u[4 * t + 3] * (width - w + 1)), width - w)
            return top, left, h, w
    aspect = width / height  # fallback: the whole image cut to the nearest allowed aspect, centred
    if aspect < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif aspect > RATIO[1]:
        w, h = round(height * RATIO[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_crop_params(seed: int, height: int, width: int, recipe: CropRecipe) -> torch.Tensor:
    """(n_crops, N_PARAMS) float64: every random choice of one image's crops, for an upright height x width image.

    Drawn from a torch.Generator seeded with `seed` (the slot's `item_seed`), a fixed number of draws per crop.
    Jitter factors: brightness / contrast in [max(0, 1 - 0.4 s), 1 + 0.4 s], saturation in [max(0, 1 - 0.2 s),
    1 + 0.2 s], hue in [-min(0.1 s, 0.5), +...] for colour strength s, as torchvision's ColorJitter.
    """
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(recipe.n_crops, _N_UNIFORMS, generator=generator, dtype=torch.float64)
    order = torch.argsort(torch.rand(recipe.n_crops, 4, generator=generator), dim=1)
    s = recipe.color_strength
    spans = torch.tensor([0.4 * s, 0.4 * s, 0.2 * s], dtype=torch.float64)
    hue = min(0.1 * s, 0.5)
    params = torch.zeros(recipe.n_crops, N_PARAMS, dtype=torch.float64)
    for k in range(recipe.n_crops):
        _, scale, blur_p, solarize_p = recipe.crop(k)
        row, v = params[k], u[k, 4 * CROP_TRIES:]
        row[P_TOP:P_WIDTH + 1] = torch.tensor(_crop_box(u[k, :4 * CROP_TRIES].tolist(), height, width, scale))
        row[P_FLIP] = float(v[0] < 0.5)
        row[P_JITTER] = float(v[1] < 0.8)
        row[P_ORDER:P_ORDER + 4] = order[k]
        low = (1 - spans).clamp(min=0)
        row[P_BRIGHTNESS:P_SATURATION + 1] = low + v[2:5] * (1 + spans - low)
        row[P_HUE] = (2 * v[5] - 1) * hue
        row[P_GRAY] = float(v[6] < 0.2)
        row[P_BLUR] = float(v[7] < blur_p)
        row[P_SIGMA] = recipe.blur_sigma[0] + v[8] * (recipe.blur_sigma[1] - recipe.blur_sigma[0])
        row[P_SOLARIZE] = float(v[9] < solarize_p)
    return params


# -- host to device without a sync ---------------------------------------------------------------------------

def to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A CPU tensor (cast to `dtype` first) on `device`, without the host waiting for the device.

    On a GPU the tensor goes through pinned memory: a `non_blocking` copy from pageable memory lets the driver
    wait for the stream while it stages the bytes (CUDA's "API synchronization behavior"), one from pinned
    memory is only queued. torch's caching host allocator keeps the pinned block until the queued copy has run.
    Made contiguous first: torch copies a strided source through a contiguous pageable temporary.
    """
    t = (t if dtype is None else t.to(dtype)).contiguous()
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@functools.cache
def _constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small constant tensor made once per device and dtype (each `torch.tensor(list, device=cuda)` is a
    blocking copy)."""
    return to_device(torch.tensor(values, dtype=dtype), device)


# -- geometry ----------------------------------------------------------------------------------------------

def exif_orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) as stored -> upright, for EXIF orientation 1-8 (what `PIL.ImageOps.exif_transpose` does)."""
    if orientation == 2:
        return img.flip(2)
    if orientation == 3:
        return img.flip(1, 2)
    if orientation == 4:
        return img.flip(1)
    if orientation == 5:
        return img.transpose(1, 2)
    if orientation == 6:
        return img.rot90(-1, (1, 2))  # Pillow's ROTATE_270: 90 degrees clockwise
    if orientation == 7:
        return img.transpose(1, 2).flip(1, 2)
    if orientation == 8:
        return img.rot90(1, (1, 2))
    return img


def _cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = -0.5 (Pillow's and torch's antialiased bicubic)."""
    a, x = -0.5, x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resample_taps(start: torch.Tensor, length: torch.Tensor, out_size: int, taps: int) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """Each crop's resampling filter over its support only: (index, weights), both (n, out_size, taps).

    start, length: (n,) pixel offsets and extents of the crops along one axis. Output pixel o's centre maps to
    c = start + (o + 0.5) * length / out_size; source pixel j (centre j + 0.5) inside the crop weighs
    cubic((j + 0.5 - c) / s), s = max(length / out_size, 1), the weights of a row summing to 1 (Pillow's
    resampling filter; widening the kernel by s when shrinking is the antialiasing). The cubic is 0 beyond 2 s,
    so row o only needs the `taps` source pixels from floor(c - 2 s - 0.5) - 1 on (`n_taps` of the longest
    crop); index (int64) holds them, unclamped (taps outside the image weigh 0, being outside the crop).
    Memory is bounded by the crops (n * out_size * taps), not by the image they come from.
    """
    start, length = start.float(), length.float()
    scale = length / out_size  # (n,)
    support = scale.clamp(min=1)
    centres = start[:, None] + (torch.arange(out_size, device=start.device) + 0.5) * scale[:, None]  # (n, out)
    first = (centres - 2 * support[:, None] - 0.5).floor().long() - 1  # one spare tap against rounding
    index = first[:, :, None] + torch.arange(taps, device=start.device)  # (n, out, taps)
    src = index.float() + 0.5  # exact: pixel indices are far below 2**24
    w = _cubic((src - centres[:, :, None]) / support[:, None, None])
    inside = (src >= start[:, None, None]) & (src < (start + length)[:, None, None])
    w = w * inside
    return index, w / w.sum(-1, keepdim=True)


def n_taps(longest: float, out_size: int) -> int:
    """Taps per output pixel that cover the filter's support for crops up to `longest` pixels (`resample_taps`):
    the support spans 4 s pixels, so ceil(4 s) + 2 taps from `resample_taps`' first tap reach past it; two more
    absorb the float32 rounding of s and of the centres on the device."""
    return math.ceil(4 * max(float(longest) / out_size, 1.0)) + 4


def dense_weights(index: torch.Tensor, w: torch.Tensor, in_size: int) -> torch.Tensor:
    """(n, out, taps) taps with their indices clamped to [0, in_size) -> (n, out, in_size) float32 weights.

    Clamped taps weigh 0, so adding them (scatter_add) leaves every real weight exactly as computed."""
    dense = torch.zeros(*index.shape[:2], in_size, dtype=w.dtype, device=w.device)
    return dense.scatter_add_(2, index, w)


def resample_weights(start: torch.Tensor, length: torch.Tensor, out_size: int, in_size: int) -> torch.Tensor:
    """(n, out_size, in_size) float32: row o averages source pixels of [start, start + length) for output o,
    with `resample_taps`' filter (start, length: (n,) along one axis of an image `in_size` pixels long)."""
    index, w = resample_taps(start, length, out_size, n_taps(in_size, out_size))
    return dense_weights(index.clamp_(0, in_size - 1), w, in_size)


def resized_crops(img: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(3, H, W) float image, (n, S, H) row and (n, S, W) column weights -> (n, 3, S, S) crops clamped to [0, 1]."""
    n, size, height = rows.shape
    width = img.shape[2]
    tmp = rows.reshape(n * size, height) @ img.transpose(0, 1).reshape(height, 3 * width)  # (n*S, 3*W): one matmul
    out = tmp.view(n, size * 3, width) @ cols.transpose(1, 2)  # (n, S*3, S)
    return out.view(n, size, 3, size).permute(0, 2, 1, 3).clamp_(0, 1)  # (n, 3, S, S)


# -- colour, batched with per-sample factors (N,) ------------------------------------------------------------

def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma with torchvision's weights."""
    r, g, b = x.unbind(1)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor | float, factor: torch.Tensor) -> torch.Tensor:
    f = factor.to(x.dtype).view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x * factor, clamped to [0, 1] (torchvision's adjust_brightness on float images)."""
    return _blend(x, 0.0, factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean luma (torchvision's adjust_contrast)."""
    return _blend(x, rgb_to_gray(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the per-pixel luma (torchvision's adjust_saturation)."""
    return _blend(x, rgb_to_gray(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by `shift` turns in [-0.5, 0.5] (torchvision's adjust_hue), through HSV and back."""
    r, g, b = x.unbind(1)
    value, _ = x.max(1)
    chroma = value - x.min(1)[0]
    saturation = chroma / torch.where(value > 0, value, torch.ones_like(value))
    c = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(value == r, ((g - b) / c) % 6, torch.where(value == g, (b - r) / c + 2, (r - g) / c + 4))
    hue = torch.where(chroma > 0, hue, torch.zeros_like(hue)) / 6  # turns, in [0, 1)
    hue = (hue + shift.to(x.dtype).view(-1, 1, 1)) % 1
    # HSV -> RGB: channel n (R 5, G 3, B 1) is v - v s clamp(min(k, 4 - k), 0, 1) with k = (n + 6 hue) mod 6
    n = _constant((5.0, 3.0, 1.0), x.device, x.dtype).view(1, 3, 1, 1)
    k = (n + 6 * hue.unsqueeze(1)) % 6
    ramp = torch.minimum(k, 4 - k).clamp(0, 1)
    return value.unsqueeze(1) * (1 - saturation.unsqueeze(1) * ramp)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, taps: int) -> torch.Tensor:
    """(N, C, H, W) blurred with a per-sample sampled Gaussian of `taps` (odd) taps, std `sigma` (N,) pixels,
    reflect padding: torchvision's gaussian_blur as two separable depthwise convolutions."""
    n, c, h, w = x.shape
    half = (taps - 1) / 2
    t = torch.linspace(-half, half, taps, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma.to(x.dtype)[:, None]) ** 2)  # (N, taps)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N*C, taps)
    pad = taps // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, kernel[:, None, None, :], groups=n * c)  # along W
    y = F.conv2d(y, kernel[:, None, :, None], groups=n * c)  # along H
    return y.reshape(n, c, h, w)


def solarize(x: torch.Tensor) -> torch.Tensor:
    """Invert pixels >= 128/255 (torchvision's solarize; Pillow's threshold 128 on uint8)."""
    return torch.where(x >= SOLARIZE_THRESHOLD, 1 - x, x)


def augment_crops(crops: torch.Tensor, params: torch.Tensor, taps: int) -> torch.Tensor:
    """Colour ops of one crop size, then normalisation: (N, 3, S, S) in [0, 1] -> normalised float32.

    params: (N, N_PARAMS) on the CPU (it decides which samples each op touches, without a host sync); the
    factors travel to the crops' device once, each op's sample indices once. In place on `crops`.
    """
    device = crops.device
    factors = to_device(params, device, torch.float32)

    def where(mask: torch.Tensor) -> torch.Tensor | None:
        idx = mask.nonzero().squeeze(1)
        return to_device(idx, device) if len(idx) else None

    jitter = params[:, P_JITTER] > 0
    for slot in range(4):
        for op, fn in enumerate(JITTER_OPS):
            if (idx := where(jitter & (params[:, P_ORDER + slot] == op))) is not None:
                crops[idx] = fn(crops[idx], factors[idx, P_BRIGHTNESS + op])
    if (idx := where(params[:, P_GRAY] > 0)) is not None:
        crops[idx] = rgb_to_gray(crops[idx]).expand(-1, 3, -1, -1)
    if (idx := where(params[:, P_BLUR] > 0)) is not None:
        crops[idx] = gaussian_blur(crops[idx], factors[idx, P_SIGMA], taps)
    if (idx := where(params[:, P_SOLARIZE] > 0)) is not None:
        crops[idx] = solarize(crops[idx])
    mean = _constant(IMAGENET_MEAN, device, torch.float32).view(1, 3, 1, 1)
    std = _constant(IMAGENET_STD, device, torch.float32).view(1, 3, 1, 1)
    return crops.sub_(mean).div_(std)


def multicrop_views(images: Sequence[torch.Tensor], params: torch.Tensor, recipe: CropRecipe) -> list[torch.Tensor]:
    """Upright uint8 (3, H_b, W_b) images on one device and their (B, n_crops, N_PARAMS) CPU parameters ->
    the views: [global 1, global 2, local 1, ...], each (B, 3, S, S) float32 normalised, on the images' device."""
    device = images[0].device
    batch = len(images)
    heights = [img.shape[1] for img in images]
    widths = [img.shape[2] for img in images]
    box = to_device(params, device, torch.float32)  # (B, n_crops, N_PARAMS)
    groups = [(recipe.global_size, slice(0, 2))] + ([(recipe.local_size, slice(2, recipe.n_crops))]
                                                   if recipe.n_local else [])
    views: list[torch.Tensor] = []
    for size, crops in groups:
        cpu = params[:, crops].reshape(-1, N_PARAMS)  # (B*n, N_PARAMS) on the CPU: tap counts without a sync
        g = box[:, crops].reshape(-1, N_PARAMS)
        n = g.shape[0] // batch
        # Filters over each crop's support, for the whole batch at once; each image's dense (n, S, H_b) and
        # (n, S, W_b) matrices are made in the loop, so memory follows the crops and each image's own size.
        rows, row_w = resample_taps(g[:, P_TOP], g[:, P_HEIGHT], size, n_taps(cpu[:, P_HEIGHT].max(), size))
        cols, col_w = resample_taps(g[:, P_LEFT], g[:, P_WIDTH], size, n_taps(cpu[:, P_WIDTH].max(), size))
        flip = (g[:, P_FLIP] > 0).view(-1, 1, 1)
        cols, col_w = torch.where(flip, cols.flip(1), cols), torch.where(flip, col_w.flip(1), col_w)
        last_row = to_device(torch.tensor(heights).repeat_interleave(n) - 1, device).view(-1, 1, 1)  # (B*n, 1, 1)
        last_col = to_device(torch.tensor(widths).repeat_interleave(n) - 1, device).view(-1, 1, 1)
        rows = torch.minimum(rows.clamp_(min=0), last_row)  # each image's taps clamped to its own extent
        cols = torch.minimum(cols.clamp_(min=0), last_col)
        out = torch.empty(batch, n, 3, size, size, device=device)
        for b, img in enumerate(images):  # one pair of matmuls per image: the images differ in size
            k = slice(b * n, (b + 1) * n)
            pixels = img.float().div_(255)
            out[b] = resized_crops(pixels, dense_weights(rows[k], row_w[k], heights[b]),
                                   dense_weights(cols[k], col_w[k], widths[b]))
        out = augment_crops(out.view(-1, 3, size, size), cpu, recipe.blur_taps(size)).view(batch, n, 3, size, size)
        views += [out[:, k].contiguous() for k in range(n)]
    return views


# -- the backend: workers read bytes and draw parameters, the main process decodes and augments -------------

@dataclass
class EncodedItem:
    """One slot of a batch as a worker leaves it: `jpeg` bytes for the GPU decoder, or CPU-decoded `pixels`."""

    index: int
    jpeg: torch.Tensor | None  # (n_bytes,) uint8
    pixels: torch.Tensor | None  # (3, H, W) uint8, upright
    orientation: int  # EXIF orientation of `jpeg` (1 = upright)
    size: tuple[int, int]  # (H, W) upright, which the parameters were drawn for
    params: torch.Tensor  # (n_crops, N_PARAMS) float64
    label: int
    unreadable: tuple[tuple[str, str], ...]


def _to_chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)


class EncodedImages(Dataset):
    """The torch_gpu backend's worker side over an `ImageFileDataset` (its index, seed, epoch, bad-file policy)."""

    def __init__(self, base: ImageFileDataset, recipe: CropRecipe) -> None:
        self.base, self.recipe = base, recipe
        self._bad: dict[str, str] = {}

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def _params(self, i: int, height: int, width: int) -> torch.Tensor:
        return draw_crop_params(item_seed(self.base.seed, self.base.epoch, i), height, width, self.recipe)

    def _read(self, j: int) -> tuple[torch.Tensor | None, torch.Tensor | None, int, int, int]:
        """(jpeg, pixels, orientation, height, width) of image j, upright; raises a decode error if unreadable.
        The bytes come from its file or its shard member (`ImageIndex.read`)."""
        data, name = self.base.index.read(j), self.base.index.paths[j]
        with Image.open(NamedBytes(data, name)) as img:
            # baseline check that the file is whole: a JPEG without its end marker goes to Pillow, which refuses it
            if img.format == "JPEG" and img.mode == "RGB" and data.endswith(b"\xff\xd9"):
                orientation = img.getexif().get(0x0112, 1)
                width, height = img.size
                if orientation in (5, 6, 7, 8):
                    width, height = height, width
                return torch.frombuffer(bytearray(data), dtype=torch.uint8), None, orientation, height, width
        pixels = _to_chw(decode_rgb(NamedBytes(data, name)))
        return None, pixels, 1, pixels.shape[1], pixels.shape[2]

    def __getitem__(self, i: int) -> EncodedItem:
        i, n = int(i), len(self.base)
        bad = []
        for k in range(min(n, MAX_SUBSTITUTIONS + 1)):
            path = self.base.index.paths[(i + k) % n]
            if path not in self._bad:
                try:
                    jpeg, pixels, orientation, height, width = self._read((i + k) % n)
                except DECODE_ERRORS as err:
                    self._bad[path] = f"{type(err).__name__}: {err}"
                else:
                    # the slot's seed, not the substitute's (as ImageFileDataset)
                    return EncodedItem(i, jpeg, pixels, orientation, (height, width), self._params(i, height, width),
                                       self.base.index.labels[(i + k) % n], tuple(bad))
            bad.append((path, self._bad[path]))
        raise DataError(f"no readable image among {len(bad)} files from {self.base.index.paths[i]}: check the data set")

    def decode_on_cpu(self, i: int) -> EncodedItem:
        """Slot i decoded by Pillow (a JPEG the GPU decoder refused), substituting unreadable files as usual."""
        img, label, bad = self.base._load(i)
        pixels = _to_chw(img)
        height, width = pixels.shape[1:]
        return EncodedItem(i, None, pixels, 1, (height, width), self._params(i, height, width), label, bad)


def collate_encoded(items: list[EncodedItem]) -> tuple[list[EncodedItem], torch.Tensor, list[tuple[str, str]]]:
    """Keep the items (decoded later, on the device), stack the labels, gather the unreadable pairs."""
    labels = torch.tensor([it.label for it in items], dtype=torch.int64)
    return items, labels, [pair for it in items for pair in it.unreadable]


class TorchGpuBatches:
    """The torch_gpu `BatchSource`: bytes and parameters from DataLoader workers (`build_loader`, same sampler and
    sharding as the cpu backend), decode and multi-crop on `device` (any device: the CPU in tests)."""

    def __init__(
        self, dataset: ImageFileDataset, batch_size: int, num_workers: int, seed: int, rank: int = 0,
        world_size: int = 1, device: torch.device | str = "cuda",
    ) -> None:
        self.recipe = CropRecipe.from_transform(dataset.transform)
        self.encoded = EncodedImages(dataset, self.recipe)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self._decode_stream: torch.cuda.Stream | None = None  # made on first use (GPU only)

    def _decode_jpegs(self, jpegs: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """(n_bytes,) uint8 CPU tensors -> (3, H, W) uint8 images on the device as stored (None where the
        decoder refuses the file), usable on the current stream.

        On a GPU the decode runs on a side stream of its own, for torchvision's nvJPEG wrapper
        (`decode_jpegs_cuda.cpp`): it allocates the outputs with the caching allocator on the *current* stream,
        then decodes on a private pool stream that waits for nothing queued on the current stream (and nvJPEG's
        hardware engine does not follow stream order anyway: pytorch/vision PR 9606, torchcodec PR 1634). Since
        the step never syncs, the training stream still has kernels queued that read blocks freed on the host,
        and those blocks would be handed to the decoder. A block of the side stream's pool is only ever a
        decoded image: its reuse waits for the training stream's uses recorded below (`record_stream`: the
        allocator polls an event), and nothing else is queued on the side stream. So the side stream waits for
        nothing (the inputs are host bytes), the decode overlaps the queued training work as before, and the
        training stream waits for the side stream (the decode has already finished on the host by then:
        torchvision synchronises its private stream before returning). The one-by-one retry runs there too,
        which also keeps a failed batch's late writes inside the side stream's pool.
        """
        if not jpegs:
            return []  # torchvision refuses an empty list with a ValueError
        if self.device.type != "cuda":
            return self._decode_all(jpegs)
        if self._decode_stream is None:
            self._decode_stream = torch.cuda.Stream(self.device)
        current = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._decode_stream):
            decoded = self._decode_all(jpegs)
        current.wait_stream(self._decode_stream)
        for img in decoded:
            if img is not None:
                img.record_stream(current)
        return decoded

    def _decode_all(self, jpegs: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """One batched decode; if it fails (one bad file fails the batch), one by one to find the bad ones."""
        try:
            return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            decoded: list[torch.Tensor | None] = []
            for jpeg in jpegs:
                try:
                    decoded.append(decode_jpeg(jpeg, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    decoded.append(None)
            return decoded

    def _decode(self, items: list[EncodedItem]) -> tuple[list[torch.Tensor], list[EncodedItem]]:
        """Upright uint8 images on the device; items a CPU decode replaced (their parameters change with the size)."""
        images: list[torch.Tensor | None] = [None] * len(items)
        jpegs = [k for k, it in enumerate(items) if it.jpeg is not None]
        decoded = self._decode_jpegs([items[k].jpeg for k in jpegs])
        for k, img in zip(jpegs, decoded, strict=True):
            upright = None if img is None else exif_orient(img, items[k].orientation)
            if upright is not None and tuple(upright.shape) == (3, *items[k].size):
                images[k] = upright
        for k, it in enumerate(items):
            if images[k] is None and it.pixels is None:
                items[k] = it = self.encoded.decode_on_cpu(it.index)
            if images[k] is None:
                images[k] = to_device(it.pixels, self.device)
        return images, items

    def views(self, items: list[EncodedItem]) -> tuple[list[torch.Tensor], list[tuple[str, str]]]:
        """Decode and augment one batch of items: the views and the unreadable files a CPU fallback met."""
        before = [it.unreadable for it in items]
        images, items = self._decode(list(items))
        params = torch.stack([it.params for it in items])  # (B, n_crops, N_PARAMS)
        more = [pair for it, was in zip(items, before, strict=True) if it.unreadable is not was
                for pair in it.unreadable]
        return multicrop_views(images, params, self.recipe), more

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        loader = build_loader(
            self.encoded, self.batch_size, self.num_workers, seed=self.seed, epoch=epoch, start_step=start_step,
            rank=self.rank, world_size=self.world_size, pin_memory=False, collate_fn=collate_encoded,
        )
        for items, labels, unreadable in loader:
            views, more = self.views(items)
            yield views, labels, unreadable + more
