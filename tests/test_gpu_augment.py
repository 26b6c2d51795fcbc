"""The torch_gpu data backend on CPU tensors (issue 13): each op against torchvision's functional op on the same
parameters, the parameter distributions against SPEC "Augmentations", determinism and resume, bad files, and
the choice of backend."""

import functools
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode

from fastdino.cli import main
from fastdino.config import ConfigError
from fastdino.data import batch, loader
from fastdino.data import gpu_augment as ga
from fastdino.data.demo import make_demo_dataset
from fastdino.data.files import ImageFileDataset, decode_rgb, index_image_folder
from fastdino.data.multicrop import IMAGENET_MEAN, IMAGENET_STD, multicrop_transform
from fastdino.errors import MissingDependencyError

RECIPE = ga.CropRecipe(32, 16, 3, (0.4, 1.0), (0.05, 0.4), (0.1, 2.0), 1.0)
# The decode paths run on the CPU here and on the GPU (nvJPEG) in `pytest -m gpu` (perf/gpu_suite.py).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _pixels(n: int, size: int = 24, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) float32 in [0, 1]: smooth gradients plus noise, so every op changes something."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    base = torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size), 1 - ramp[None, :]
                        .expand(size, size)])
    return (0.6 * base + 0.4 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)


# --- each op against torchvision's on the same parameters ---

@pytest.mark.parametrize("op, tf, factors", [
    (ga.adjust_brightness, TF.adjust_brightness, [0.6, 1.0, 1.4]),
    (ga.adjust_contrast, TF.adjust_contrast, [0.6, 1.0, 1.4]),
    (ga.adjust_saturation, TF.adjust_saturation, [0.0, 0.8, 1.2]),
    (ga.adjust_hue, TF.adjust_hue, [-0.1, 0.03, 0.5]),
])
def test_colour_ops_match_torchvision_per_sample(op, tf, factors):
    x = _pixels(len(factors))
    got = op(x.clone(), torch.tensor(factors, dtype=torch.float64))
    for k, f in enumerate(factors):
        torch.testing.assert_close(got[k], tf(x[k], f), atol=2e-5, rtol=0)


def test_grayscale_blur_and_solarize_match_torchvision():
    x = _pixels(3, size=20)
    torch.testing.assert_close(ga.rgb_to_gray(x).expand(-1, 3, -1, -1), TF.rgb_to_grayscale(x, 3), atol=1e-6, rtol=0)
    sigma = torch.tensor([0.1, 0.9, 2.0])
    taps = RECIPE.blur_taps(20)
    assert taps == 13
    got = ga.gaussian_blur(x, sigma, taps)
    for k in range(3):
        want = TF.gaussian_blur(x[k], [taps, taps], [float(sigma[k])] * 2)
        torch.testing.assert_close(got[k], want, atol=1e-5, rtol=0)
    torch.testing.assert_close(ga.solarize(x), TF.solarize(x, ga.SOLARIZE_THRESHOLD), atol=0, rtol=0)
    assert RECIPE.blur_taps(4) == 7  # reflect padding must fit a tiny crop


@pytest.mark.parametrize("box, size", [
    ((3, 5, 30, 22), 16),  # shrink (antialiased)
    ((0, 0, 40, 48), 24),  # the whole image, shrink
    ((10, 7, 9, 12), 24),  # enlarge
    ((39, 47, 1, 1), 4),  # one pixel at the corner
])
@pytest.mark.parametrize("flip", [False, True])
def test_resized_crop_matches_torchvision_antialiased_bicubic(box, size, flip):
    img = _pixels(1, size=48)[0, :, :40, :]  # (3, 40, 48)
    top, left, h, w = box
    rows = ga.resample_weights(torch.tensor([top]), torch.tensor([h]), size, 40)
    cols = ga.resample_weights(torch.tensor([left]), torch.tensor([w]), size, 48)
    if flip:
        cols = cols.flip(1)
    got = ga.resized_crops(img, rows, cols)[0]
    want = TF.resized_crop(img, top, left, h, w, [size, size], InterpolationMode.BICUBIC, antialias=True)
    want = TF.horizontal_flip(want) if flip else want
    torch.testing.assert_close(got, want.clamp(0, 1), atol=2e-5, rtol=0)
    # and within a grey level or two of the cpu backend's Pillow path (uint8 between passes)
    pil = TF.to_pil_image((img * 255).round().to(torch.uint8))
    pil_crop = TF.resized_crop(pil, top, left, h, w, [size, size], InterpolationMode.BICUBIC, antialias=True)
    pil_crop = TF.horizontal_flip(pil_crop) if flip else pil_crop
    ref = TF.pil_to_tensor(pil_crop).float() / 255
    assert (got - ref).abs().max() <= 3 / 255


def _dense_resample_weights(start, length, out_size, in_size):
    """The filter as it was first written (before issue 21): every crop's weights over the whole axis of the
    batch's largest image, (n, out_size, in_size) and temporaries of that size."""
    start, length = start.float(), length.float()
    scale = length / out_size
    centres = start[:, None] + (torch.arange(out_size) + 0.5) * scale[:, None]
    src = torch.arange(in_size) + 0.5
    w = ga._cubic((src - centres[:, :, None]) / scale.clamp(min=1)[:, None, None])
    w = w * ((src >= start[:, None, None]) & (src < (start + length)[:, None, None]))
    return w / w.sum(-1, keepdim=True)


def _dense_multicrop_views(images, params, recipe):
    """multicrop_views as first written: the weights of every crop sized by the batch's largest image."""
    batch, heights, widths = len(images), [i.shape[1] for i in images], [i.shape[2] for i in images]
    views = []
    for size, crops in ((recipe.global_size, slice(0, 2)), (recipe.local_size, slice(2, recipe.n_crops))):
        g = params[:, crops].reshape(-1, ga.N_PARAMS).float()
        n = g.shape[0] // batch
        rows = _dense_resample_weights(g[:, ga.P_TOP], g[:, ga.P_HEIGHT], size, max(heights)).view(batch, n, size, -1)
        cols = _dense_resample_weights(g[:, ga.P_LEFT], g[:, ga.P_WIDTH], size, max(widths))
        cols = torch.where(g[:, ga.P_FLIP].view(-1, 1, 1) > 0, cols.flip(1), cols).view(batch, n, size, -1)
        out = torch.stack([ga.resized_crops(img.float() / 255, rows[b, :, :, :heights[b]], cols[b, :, :, :widths[b]])
                           for b, img in enumerate(images)])
        out = ga.augment_crops(out.view(-1, 3, size, size), params[:, crops].reshape(-1, ga.N_PARAMS),
                               recipe.blur_taps(size)).view(batch, n, 3, size, size)
        views += [out[:, k] for k in range(n)]
    return views


class _LargestAllocation(TorchDispatchMode):
    """Records the largest storage (bytes) any op creates: views of existing tensors share their storage."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def test_resize_memory_follows_the_crops_not_the_largest_image_and_the_views_are_unchanged():
    """One 640 x 480 image among 15 small ones: no op of the multi-crop allocates more than that image's float
    copy (the filters cover each crop's support, each image gets its own dense matrices), where the first
    version made (B * n_crops, S, 640) weights and temporaries; the views equal that version's."""
    recipe = ga.CropRecipe(32, 32, 8, (0.4, 1.0), (0.05, 0.4), (0.1, 2.0), 1.0)
    g = torch.Generator().manual_seed(0)
    sizes = [(480, 640)] + [(40 + k % 7, 48 - k % 5) for k in range(15)]
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]
    params = torch.stack([ga.draw_crop_params(100 + k, h, w, recipe) for k, (h, w) in enumerate(sizes)])
    big_image = 3 * 480 * 640 * 4  # bytes of its float copy, which the matmuls need anyway
    with _LargestAllocation() as new:
        views = ga.multicrop_views(images, params, recipe)
    with _LargestAllocation() as old:
        want = _dense_multicrop_views(images, params, recipe)
    assert new.largest <= big_image < old.largest / 1.5, (new.largest, big_image, old.largest)
    for got, ref in zip(views, want, strict=True):
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
    # the filter itself: the same weights as the dense formula, in memory of the crops' support only
    start, length = params[:, 2:, ga.P_LEFT].flatten(), params[:, 2:, ga.P_WIDTH].flatten()
    with _LargestAllocation() as taps:
        index, w = ga.resample_taps(start, length, 32, ga.n_taps(length.max(), 32))
    assert taps.largest <= index.numel() * 8 < 128 * 32 * 640 * 4 / 4
    dense = ga.dense_weights(torch.minimum(index.clamp(min=0), torch.tensor([w for _, w in sizes])
                                           .repeat_interleave(8).view(-1, 1, 1) - 1), w, 640)
    torch.testing.assert_close(dense, _dense_resample_weights(start, length, 32, 640), atol=1e-7, rtol=0)


def test_augment_crops_applies_the_drawn_ops_in_the_drawn_order():
    n, size = 24, 16
    x = _pixels(n, size=size, seed=1)
    params = torch.stack([ga.draw_crop_params(seed, 60, 50, RECIPE)[k % RECIPE.n_crops] for k, seed in
                          enumerate(range(100, 100 + n))])
    params[:6, ga.P_GRAY] = 1.0  # make sure every op shows up in a small batch
    params[6:12, ga.P_SOLARIZE] = 1.0
    params[12:18, ga.P_BLUR] = 1.0
    taps = RECIPE.blur_taps(size)
    got = ga.augment_crops(x.clone(), params, taps)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for k in range(n):
        p, y = params[k], x[k]
        if p[ga.P_JITTER]:
            for slot in range(4):
                op = int(p[ga.P_ORDER + slot])
                y = ops[op](y, float(p[ga.P_BRIGHTNESS + op]))
        if p[ga.P_GRAY]:
            y = TF.rgb_to_grayscale(y, 3)
        if p[ga.P_BLUR]:
            y = TF.gaussian_blur(y, [taps, taps], [float(p[ga.P_SIGMA])] * 2)
        if p[ga.P_SOLARIZE]:
            y = TF.solarize(y, ga.SOLARIZE_THRESHOLD)
        torch.testing.assert_close(got[k], (y - mean) / std, atol=2e-4, rtol=0)


def _jpeg_bytes(img: Image.Image, orientation: int = 1, **kw) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, exif=exif, **kw)
    return buf.getvalue()


def _photo(width: int = 40, height: int = 24) -> Image.Image:
    """Smooth, asymmetric content: an orientation mistake is a large error, JPEG noise a small one."""
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * xx / width, 255 * yy / height, 128 + 0 * xx], -1).astype(np.uint8)
    return Image.fromarray(rgb)


def _pillow_chw(path) -> torch.Tensor:
    return torch.from_numpy(np.array(decode_rgb(str(path)))).permute(2, 0, 1)  # (3, H, W) uint8


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("orientation", range(1, 9))
def test_gpu_decode_path_applies_exif_orientation_as_pillow(tmp_path, orientation, device):
    path = tmp_path / "o.jpg"
    path.write_bytes(_jpeg_bytes(_photo(), orientation))
    ds = ga.EncodedImages(ImageFileDataset(index_image_folder(tmp_path), multicrop_transform()), RECIPE)
    item = ds[0]
    assert item.jpeg is not None  # the GPU decoder's path
    source = ga.TorchGpuBatches(ds.base, 1, 0, 0, device=device)
    images, decoded = source._decode([item])
    assert decoded[0].pixels is None and images[0].device.type == device  # not a CPU fallback
    want = _pillow_chw(path)
    assert images[0].shape == want.shape == (3, *item.size)
    assert (images[0].cpu().float() - want.float()).abs().mean() < 2  # JPEG decoders differ by rounding only
    assert ImageOps.exif_transpose(Image.open(path)).size == (want.shape[2], want.shape[1])


def _smooth(width: int, height: int, seed: int) -> Image.Image:
    """Photo-like: smooth fields, so JPEG decoders differ by rounding only, not by ringing at sharp edges."""
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * xx / width, 255 * yy / height, 127.5 + 100 * np.sin(xx / 9 + yy / 13 + seed)], -1)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.mark.parametrize("device", DEVICES)
def test_batched_decode_equals_the_pillow_decode_within_jpeg_rounding(tmp_path, device):
    sizes = [(64, 48), (57, 33), (120, 80), (33, 65), (500, 375)]
    for k, (w, h) in enumerate(sizes):  # 4:4:4, 4:2:2 and 4:2:0 chroma, odd sizes
        _smooth(w, h, k).save(tmp_path / f"{k}.jpg", quality=90, subsampling=k % 3)
    ds = ga.EncodedImages(ImageFileDataset(index_image_folder(tmp_path), multicrop_transform()), RECIPE)
    items = [ds[i] for i in range(len(ds))]
    assert all(it.jpeg is not None for it in items)
    images, decoded = ga.TorchGpuBatches(ds.base, len(items), 0, 0, device=device)._decode(list(items))
    for img, item, path in zip(images, decoded, ds.base.index.paths, strict=True):
        assert item.pixels is None  # one batched decode on the device, no CPU fallback
        assert img.device.type == device and img.dtype == torch.uint8
        want = _pillow_chw(path)
        assert img.shape == want.shape
        diff = (img.cpu().float() - want.float()).abs()  # grey levels: IDCT and chroma upsampling round differently
        assert diff.mean() < 1.5 and torch.quantile(diff.flatten(), 0.999) <= 12, (path, diff.mean(), diff.max())


@pytest.mark.parametrize("device", DEVICES)
def test_formats_the_gpu_decoder_is_not_given_are_decoded_exactly_by_pillow(tmp_path, device):
    photo = _smooth(40, 24, 0)
    photo.save(tmp_path / "0.png")
    (tmp_path / "1_cmyk.jpg").write_bytes(_jpeg_bytes(photo.convert("CMYK")))
    (tmp_path / "2_gray.jpg").write_bytes(_jpeg_bytes(photo.convert("L")))
    Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257).save(tmp_path / "3_16bit.png")
    (tmp_path / "4_rgb.jpg").write_bytes(_jpeg_bytes(photo, orientation=6))
    ds = ga.EncodedImages(ImageFileDataset(index_image_folder(tmp_path), multicrop_transform(32, 16, 2)), RECIPE)
    items = [ds[i] for i in range(len(ds))]
    assert [it.jpeg is None for it in items] == [True, True, True, True, False]
    source = ga.TorchGpuBatches(ds.base, len(items), 0, 0, device=device)
    images, _ = source._decode(list(items))
    for img, path in zip(images[:4], ds.base.index.paths, strict=False):
        assert img.device.type == device and torch.equal(img.cpu(), _pillow_chw(path)), path
    views, bad = source.views(items)
    assert bad == [] and [tuple(v.shape) for v in views] == [(5, 3, 32, 32)] * 2 + [(5, 3, 16, 16)] * 2
    assert all(v.device.type == device and torch.isfinite(v).all() for v in views)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("files", [("0.png", "1.png", "2.png"), ("0.png", "1.jpg", "2.png", "3.jpg")])
def test_a_batch_without_jpegs_or_mixing_formats_decodes(tmp_path, files, device):
    """A PNG-only batch gives the decoder no file at all (torchvision refuses an empty list with ValueError)."""
    for k, name in enumerate(files):
        photo = _smooth(40 + 3 * k, 24 + 2 * k, k)
        photo.save(tmp_path / name, quality=95) if name.endswith(".jpg") else photo.save(tmp_path / name)
    ds = ga.EncodedImages(ImageFileDataset(index_image_folder(tmp_path), multicrop_transform(32, 16, 2)), RECIPE)
    items = [ds[i] for i in range(len(ds))]
    assert [it.jpeg is not None for it in items] == [name.endswith(".jpg") for name in files]
    source = ga.TorchGpuBatches(ds.base, len(items), 0, 0, device=device)
    images, _ = source._decode(list(items))
    for img, path in zip(images, ds.base.index.paths, strict=True):
        diff = (img.cpu().float() - _pillow_chw(path).float()).abs()
        assert img.device.type == device and diff.mean() < (1.5 if path.endswith(".jpg") else 1e-9), path
    views, bad = source.views(items)
    n = len(files)
    assert bad == [] and [tuple(v.shape) for v in views] == [(n, 3, 32, 32)] * 2 + [(n, 3, 16, 16)] * 2
    assert all(torch.isfinite(v).all() for v in views)


@pytest.mark.gpu
def test_a_gpu_batch_has_the_cpu_backends_shapes_dtypes_ranges_and_labels(tmp_path):
    dataset = ImageFileDataset(index_image_folder(_folder(tmp_path)), multicrop_transform(32, 16, 2), seed=3)
    cpu_views, cpu_labels, _ = next(iter(batch.CpuBatches(dataset, 4, 0, seed=3).epoch(0)))
    gpu = ga.TorchGpuBatches(dataset, 4, 0, seed=3, device="cuda")
    views, labels, bad = next(iter(gpu.epoch(0)))
    assert [v.shape for v in views] == [v.shape for v in cpu_views] and bad == []
    assert all(v.dtype == torch.float32 and v.device.type == "cuda" and v.is_contiguous() for v in views)
    assert torch.equal(labels, cpu_labels)  # same sampler: the same images in the same order
    for v in views:
        for c, (m, s) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)):
            assert (0 - m) / s - 1e-4 <= v[:, c].min() and v[:, c].max() <= (1 - m) / s + 1e-4
    # the same batch with every op on CPU tensors: the GPU changes the decode's rounding, not the recipe
    host = next(iter(ga.TorchGpuBatches(dataset, 4, 0, seed=3, device="cpu").epoch(0)))[0]
    for v, h in zip(views, host, strict=True):
        assert (v.cpu() - h).abs().mean() < 0.05  # normalised units: about one grey level is 0.017


@pytest.mark.gpu
def test_a_torch_gpu_epoch_never_waits_for_the_device(tmp_path):
    """Decode (batched nvJPEG, EXIF turns, PNGs from the workers), crops, colour ops and normalisation of
    whole batches under `set_sync_debug_mode("error")`, which raises on any synchronising call. One batch first:
    first-use set-up (cuBLAS and cuDNN handles, nvJPEG's decoder) may sync once; the steady state may not."""
    dataset = ImageFileDataset(index_image_folder(_folder(tmp_path, n=16)), multicrop_transform(32, 16, 4), seed=3)
    source = ga.TorchGpuBatches(dataset, 4, 0, seed=3, device="cuda")
    next(iter(source.epoch(0)))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = [views for views, _, _ in source.epoch(1)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(batches) == 4 and all(torch.isfinite(v).all() for views in batches for v in views)


@pytest.mark.gpu
def test_decode_under_load_equals_the_cpu_decode(tmp_path):
    """pytorch/vision PR 9606's race, in the shape the trainer meets it: kernels queued behind a long one on the
    training stream write (then read) buffers of the decoded images' sizes, freed on the host at once, while 200
    batches are decoded. torchvision alone hands the decoder those blocks and its writes land under the queued
    kernels; on the side stream every decoded image equals its CPU decode (libjpeg) within JPEG rounding and every
    queued read sees what was written."""
    sizes = [(500, 375), (375, 500), (320, 240), (640, 480), (333, 250), (256, 256)]
    for k, (w, h) in enumerate(sizes):
        _smooth(w, h, k).save(tmp_path / f"{k}.jpg", quality=90, subsampling=k % 3)
    ds = ga.EncodedImages(ImageFileDataset(index_image_folder(tmp_path), multicrop_transform()), RECIPE)
    items = [ds[i] for i in range(len(ds))]
    want = [decode_jpeg(it.jpeg, mode=ImageReadMode.RGB).cuda().float() for it in items]  # CPU decode, uploaded
    source = ga.TorchGpuBatches(ds.base, len(items), 0, 0, device="cuda")
    source._decode(list(items))  # warm-up: nvJPEG's decoder
    torch.cuda.synchronize()
    errors, sums, expected = [], [], []
    for step in range(200):
        torch.cuda._sleep(5_000_000)  # a few ms of queued work: the host runs ahead, as in training
        value = step % 251 + 1
        for img in want:
            buf = torch.full((img.numel(),), value, dtype=torch.uint8, device="cuda")  # a queued write
            sums.append(buf.sum(dtype=torch.int64))  # and a queued read, then freed on the host
            expected.append(img.numel() * value)
            del buf
        images, decoded = source._decode(list(items))
        assert all(it.pixels is None for it in decoded)  # every image from the GPU decoder
        errors.append(torch.stack([(img.float() - ref).abs().mean() for img, ref in zip(images, want, strict=True)]))
    torch.cuda.synchronize()
    errors = torch.stack(errors).cpu()  # (200, n_images) mean grey-level differences
    assert errors.max() < 1.5, (errors.max(), (errors >= 1.5).sum())
    assert torch.stack(sums).cpu().tolist() == expected


# --- random parameters against SPEC ---

def test_parameter_distributions_follow_the_spec():
    n = 1500
    params = torch.stack([ga.draw_crop_params(seed, 375, 500, ga.CropRecipe(224, 96, 10, (0.4, 1.0), (0.05, 0.4),
                                                                           (0.1, 2.0), 1.0)) for seed in range(n)])
    assert params.shape == (n, 12, ga.N_PARAMS)
    area = params[..., ga.P_HEIGHT] * params[..., ga.P_WIDTH] / (375 * 500)
    aspect = params[..., ga.P_WIDTH] / params[..., ga.P_HEIGHT]
    slack = 0.01  # sides are rounded to whole pixels
    assert area[:, :2].min() >= 0.4 - slack and area[:, :2].max() <= 1.0
    assert area[:, 2:].min() >= 0.05 - slack and area[:, 2:].max() <= 0.4 + slack
    assert aspect.min() >= 3 / 4 - 0.02 and aspect.max() <= 4 / 3 + 0.02
    assert area[:, 2:].mean() == pytest.approx(0.225, abs=0.01)  # uniform in the scale range
    assert (params[..., ga.P_TOP] + params[..., ga.P_HEIGHT]).max() <= 375
    assert (params[..., ga.P_LEFT] + params[..., ga.P_WIDTH]).max() <= 500

    def rate(column, crops):
        return params[:, crops, column].mean().item()

    def near(value, p, count):  # within 5 binomial standard deviations
        return abs(value - p) <= 5 * math.sqrt(p * (1 - p) / count) + 1e-12

    everything = slice(None)
    assert near(rate(ga.P_FLIP, everything), 0.5, 12 * n)
    assert near(rate(ga.P_JITTER, everything), 0.8, 12 * n)
    assert near(rate(ga.P_GRAY, everything), 0.2, 12 * n)
    assert rate(ga.P_BLUR, 0) == 1.0
    assert near(rate(ga.P_BLUR, 1), 0.1, n)
    assert near(rate(ga.P_BLUR, slice(2, None)), 0.5, 10 * n)
    assert near(rate(ga.P_SOLARIZE, 1), 0.2, n)
    assert rate(ga.P_SOLARIZE, 0) == 0 and rate(ga.P_SOLARIZE, slice(2, None)) == 0
    sigma = params[..., ga.P_SIGMA]
    assert 0.1 <= sigma.min() and sigma.max() <= 2.0
    for column, low, high in ((ga.P_BRIGHTNESS, 0.6, 1.4), (ga.P_CONTRAST, 0.6, 1.4), (ga.P_SATURATION, 0.8, 1.2),
                              (ga.P_HUE, -0.1, 0.1)):
        values = params[..., column]
        assert low <= values.min() < low + 0.01 and high - 0.01 < values.max() <= high
    orders = params[..., ga.P_ORDER:ga.P_ORDER + 4]
    assert torch.equal(orders.sort(-1).values, torch.arange(4.0).expand_as(orders))
    assert near((orders[..., 0] == 3).float().mean().item(), 0.25, 12 * n)  # hue first a quarter of the time


def test_parameters_are_a_function_of_the_seed():
    a = ga.draw_crop_params(7, 100, 80, RECIPE)
    assert torch.equal(a, ga.draw_crop_params(7, 100, 80, RECIPE))
    assert not torch.equal(a, ga.draw_crop_params(8, 100, 80, RECIPE))


def test_tiny_images_fall_back_to_a_centre_crop():
    params = ga.draw_crop_params(0, 1, 300, RECIPE)  # aspect 300: no try fits
    assert params[:, ga.P_HEIGHT].eq(1).all() and params[:, ga.P_WIDTH].eq(1).all()
    assert params[:, ga.P_LEFT].eq(149).all()


# --- the backend end to end ---

def _folder(root: Path, n: int = 10) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 256, size=(30 + i, 44 - i, 3), dtype=np.uint8)
        img = Image.fromarray(arr)
        cls = root / ("a" if i % 2 else "b")
        cls.mkdir(parents=True, exist_ok=True)
        if i % 4 == 3:
            img.save(cls / f"{i}.png")
        else:
            (cls / f"{i}.jpg").write_bytes(_jpeg_bytes(img, orientation=1 + i % 8))
    return root


def _source(root: Path, **kw) -> ga.TorchGpuBatches:
    transform = multicrop_transform(32, 16, 2, blur_sigma=(0.1, 0.5))
    return ga.TorchGpuBatches(ImageFileDataset(index_image_folder(root), transform, seed=3), batch_size=2,
                              num_workers=kw.pop("num_workers", 0), seed=3, device="cpu", **kw)


def test_backend_batches_shapes_ranges_determinism_and_resume(tmp_path):
    source = _source(_folder(tmp_path))
    batches = list(source.epoch(1))
    assert len(batches) == 5
    low = [(0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    high = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    for views, labels, bad in batches:
        assert [tuple(v.shape) for v in views] == [(2, 3, 32, 32)] * 2 + [(2, 3, 16, 16)] * 2
        assert all(v.dtype == torch.float32 and v.is_contiguous() for v in views)
        for v in views:
            for c in range(3):
                assert low[c] - 1e-5 <= v[:, c].min() and v[:, c].max() <= high[c] + 1e-5
        assert labels.dtype == torch.int64 and bad == []
    again = list(source.epoch(1))
    resumed = list(source.epoch(1, start_step=3))
    for (v1, l1, _), (v2, l2, _) in zip(batches[3:], resumed, strict=True):
        assert torch.equal(l1, l2) and all(torch.equal(a, b) for a, b in zip(v1, v2, strict=True))
    assert all(torch.equal(a, b) for (v1, _, _), (v2, _, _) in zip(batches, again, strict=True)
               for a, b in zip(v1, v2, strict=True))
    other = next(iter(source.epoch(2)))[0][0]
    assert not torch.equal(other, batches[0][0][0])
    with_workers = list(_source(tmp_path, num_workers=2).epoch(1))
    assert all(torch.equal(a, b) for (v1, _, _), (v2, _, _) in zip(batches, with_workers, strict=True)
               for a, b in zip(v1, v2, strict=True))


def test_backend_shards_by_rank(tmp_path):
    """Each rank decodes exactly the images the sampler assigns it, in its order (not only the same labels)."""
    from fastdino.data.batch import ResumableShardedSampler

    _folder(tmp_path)
    for r in (0, 1):
        source = _source(tmp_path, rank=r, world_size=2)
        seen, views = [], source.views

        def recording(items, _views=views, _seen=seen):
            _seen.extend(item.index for item in items)
            return _views(items)

        source.views = recording
        labels = torch.cat([b[1] for b in source.epoch(0)])
        assigned = list(ResumableShardedSampler(10, 2, seed=3, epoch=0, rank=r, world_size=2))
        assert len(assigned) == 4 and seen == assigned  # 10 images, global batch 4: 2 steps per rank
        assert labels.tolist() == [source.encoded.base.index.labels[i] for i in assigned]


def test_backend_skips_and_reports_bad_files_and_decodes_other_formats(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    good = _jpeg_bytes(_photo())
    (root / "0_good.jpg").write_bytes(good)
    (root / "1_empty.jpg").write_bytes(b"")
    (root / "2_truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "3_text.jpg").write_bytes(b"not an image at all")
    (root / "4_gray.jpg").write_bytes(_jpeg_bytes(_photo().convert("L")))
    (root / "5_cmyk.jpg").write_bytes(_jpeg_bytes(_photo().convert("CMYK")))
    _photo().save(root / "6.png")
    corrupt = bytearray(good)
    corrupt[len(good) // 2: len(good) // 2 + 64] = b"\xff\xd9" * 32  # an end marker inside the scan
    (root / "7_corrupt_scan.jpg").write_bytes(bytes(corrupt))
    source = _source(root)
    encoded = [source.encoded[i] for i in range(8)]
    assert [it.jpeg is not None for it in encoded][:1] == [True]
    assert encoded[4].pixels is not None and encoded[5].pixels is not None  # greyscale, CMYK: CPU decode
    assert encoded[6].pixels is not None
    views, bad = source.views(encoded)
    assert all(v.shape[0] == 8 for v in views)  # the batch keeps its size
    assert all(torch.isfinite(v).all() for v in views)
    reported = {Path(p).name for p, _ in [pair for it in encoded for pair in it.unreadable] + bad}
    assert {"1_empty.jpg", "2_truncated.jpg", "3_text.jpg"} <= reported
    assert "0_good.jpg" not in reported and "6.png" not in reported


# --- choosing the backend ---

def test_backend_choice(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(loader, "dali_available", lambda: False)
    assert loader.resolve_backend("auto", cpu) == "cpu"
    assert loader.resolve_backend("auto", cuda) == "torch_gpu"
    assert loader.resolve_backend("torch_gpu", cuda) == "torch_gpu"
    with pytest.raises(MissingDependencyError, match=r'data\.backend=dali .*pip install -e "\.\[dali\]"'):
        loader.resolve_backend("dali", cuda)
    with pytest.raises(ConfigError, match="data.backend") as err:
        loader.resolve_backend("torch_gpu", cpu)
    assert err.value.key == "data.backend"
    with pytest.raises(ConfigError, match="data.backend='gpu' is not one of"):
        loader.resolve_backend("gpu", cpu)
    monkeypatch.setattr(loader, "dali_problem", lambda device: None)
    assert loader.resolve_backend("auto", cuda) == "dali"
    assert loader.resolve_backend("auto", cpu) == "cpu"


def test_auto_picks_dali_only_where_its_probe_pipeline_runs(monkeypatch):
    """DALI imports but its probe fails (a driver older than the wheel needs): auto takes torch_gpu, an explicit
    dali is refused in one line naming data.backend; the probe runs once per device, never for a CPU run."""
    dali = pytest.importorskip("fastdino.data.dali")
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(loader, "dali_available", lambda: True)
    calls = []

    def failing_pipeline(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version\nmore detail")

    monkeypatch.setattr(dali, "_import_dali", failing_pipeline)
    dali.gpu_problem.cache_clear()
    try:
        assert loader.resolve_backend("auto", cpu) == "cpu" and calls == []  # no GPU, no probe
        assert loader.resolve_backend("auto", cuda) == "torch_gpu"
        assert loader.resolve_backend("auto", cuda) == "torch_gpu" and len(calls) == 1  # cached
        with pytest.raises(ConfigError, match=r"data\.backend=dali: DALI cannot run on cuda:0 \(RuntimeError: CUDA "
                           r"driver version is insufficient for CUDA runtime version more detail\): use "
                           r"data\.backend=torch_gpu"):
            loader.resolve_backend("dali", cuda)
        assert len(calls) == 1
        dali.gpu_problem.cache_clear()
        monkeypatch.setattr(dali, "gpu_problem", functools.cache(lambda index: None))
        assert loader.resolve_backend("auto", cuda) == "dali" and loader.resolve_backend("dali", cuda) == "dali"
        # This process's probe runs, another's failed (what the trainer's all-reduce says): every rank leaves DALI.
        another_failed = lambda flag: True  # noqa: E731
        assert loader.resolve_backend("auto", cuda, another_failed) == "torch_gpu"
        with pytest.raises(ConfigError, match=r"DALI cannot run on another process's GPU"):
            loader.resolve_backend("dali", cuda, another_failed)
    finally:
        dali.gpu_problem.cache_clear()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the probe on a machine without a GPU")
def test_the_real_dali_probe_reports_why_without_a_gpu():
    dali = pytest.importorskip("fastdino.data.dali")
    pytest.importorskip("nvidia.dali")
    dali.gpu_problem.cache_clear()
    try:
        problem = dali.gpu_problem(0)
    finally:
        dali.gpu_problem.cache_clear()
    assert problem and "\n" not in problem and "CUDA" in problem


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cli_refuses_a_gpu_backend_without_a_gpu_in_one_line(tmp_path, capsys):
    root = make_demo_dataset(tmp_path / "demo", n_train_per_class=2, n_val_per_class=1, size=16)
    argv = ["train", "configs/demo.yaml", f"data.path={root}", f"train.output_dir={tmp_path}/run",
            "data.backend=torch_gpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.backend=torch_gpu" in err and "CUDA" in err
    assert not (tmp_path / "run").exists()
    assert main([*argv[:-1], "data.backend=tpu"]) == 2
    assert "data.backend" in capsys.readouterr().err


def test_bench_data_runs_on_the_cpu(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "perf/bench_data.py", "--folder", str(tmp_path), "--images", "2",
                          "--width", "64", "--height", "48", "--batch", "1", "--workers", "0", "--steps", "1",
                          "--warmup", "1", "--backends", "cpu,torch_gpu", "--shards", "2", "--repeats", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith(("| cpu", "| torch_gpu"))]
    assert [(row[0].strip(), row[1].strip()) for row in rows] == [
        ("cpu", "folder"), ("cpu", "2 shards"), ("torch_gpu", "folder"), ("torch_gpu", "2 shards")]
    assert all(row[-1].strip() == "not measured yet (no GPU)" for row in rows[2:])
    assert rows[1][6].strip().startswith("median ") and rows[1][6].count(",") == 1  # one ratio per repeat
