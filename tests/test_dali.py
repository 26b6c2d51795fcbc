"""The dali data backend with DALI's CPU operators (issue 13): geometry against the torch_gpu backend on the same
parameters, the per-crop masks, determinism and resume, bad files. Skipped without `.[dali]`."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from fastdino.data import gpu_augment as ga
from fastdino.data.files import ImageFileDataset, index_image_folder
from fastdino.data.multicrop import IMAGENET_MEAN, IMAGENET_STD, multicrop_transform

pytest.importorskip("nvidia.dali")
from fastdino.data.dali import DaliBatches, dali_rows  # noqa: E402


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth and asymmetric: a wrong box or flip is a large error, resampling filters a small one."""
    yy, xx = np.mgrid[0:height, 0:width]
    phase = seed * 0.7
    rgb = np.stack([255 * xx / width, 255 * yy / height, 127.5 + 100 * np.sin(xx / 9 + yy / 13 + phase)], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def _folder(root, n=8):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = _photo(64 + 4 * i, 48 + 2 * i, seed=i)
        if i % 4 == 3:
            img.save(root / f"{i}.png")
        else:
            img.save(root / f"{i}.jpg", quality=95)
    return root


def _sources(root, **kw):
    dataset = ImageFileDataset(index_image_folder(root), multicrop_transform(32, 16, 2, blur_sigma=(0.1, 0.5)),
                               seed=5)
    dali = DaliBatches(dataset, batch_size=4, num_workers=0, seed=5, device="cpu", num_threads=1, **kw)
    torch_gpu = ga.TorchGpuBatches(dataset, batch_size=4, num_workers=0, seed=5, device="cpu", **kw)
    return dali, torch_gpu


def _unnormalise(v):
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (v * std + mean) * 255


def test_crop_and_flip_match_the_torch_gpu_backend_on_the_same_parameters(tmp_path):
    dali, torch_gpu = _sources(_folder(tmp_path))
    items = [dali.encoded[i] for i in range(4)]
    for it in items:
        it.params[:, [ga.P_JITTER, ga.P_GRAY, ga.P_BLUR, ga.P_SOLARIZE]] = 0  # geometry only
        it.params[::2, ga.P_FLIP] = 1
        it.params[1::2, ga.P_FLIP] = 0
    got = [_unnormalise(v) for v in dali.views(items)]
    want = [_unnormalise(v) for v in torch_gpu.views(items)[0]]
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert (g - w).abs().mean() < 3  # grey levels: DALI's cubic filter and uint8 rounding vs Pillow's kernel
        assert (g - w.flip(-1)).abs().mean() > 10  # a flip the wrong way round would be caught


def test_masks_switch_grayscale_blur_and_solarise_per_crop(tmp_path):
    dali, _ = _sources(_folder(tmp_path))
    items = [dali.encoded[i] for i in range(4)]
    for it in items:
        it.params[:, [ga.P_JITTER, ga.P_BLUR, ga.P_SOLARIZE, ga.P_FLIP]] = 0
        it.params[:, ga.P_GRAY] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    plain = [_unnormalise(v) for v in dali.views(items)]
    for k, v in enumerate(plain):
        spread = (v - v.mean(1, keepdim=True)).abs().max()
        assert (spread < 1.5) if k % 2 == 0 else (spread > 20)  # grey crops have equal channels
    for it in items:
        it.params[:, ga.P_GRAY] = 0
    plain = [_unnormalise(v) for v in dali.views(items)]
    for it in items:
        it.params[:, ga.P_SOLARIZE] = torch.tensor([0.0, 1.0, 0.0, 0.0])
        it.params[:, ga.P_BLUR] = torch.tensor([0.0, 0.0, 1.0, 0.0])
        it.params[:, ga.P_SIGMA] = 0.5
    out = [_unnormalise(v) for v in dali.views(items)]
    assert torch.allclose(out[0], plain[0], atol=1e-3) and torch.allclose(out[3], plain[3], atol=1e-3)
    solarised = torch.where(plain[1] >= 128, 255 - plain[1], plain[1])
    assert (out[1] - solarised).abs().max() < 1.5
    assert 0.2 < (out[2] - plain[2]).abs().mean() < 10  # blurred: changed, but the same picture


def test_rows_fold_the_flip_and_the_identity_factors():
    params = ga.draw_crop_params(3, 40, 60, ga.CropRecipe(32, 16, 2, (0.4, 1.0), (0.05, 0.4), (0.1, 0.5), 1.0))
    params[0, ga.P_FLIP], params[1, ga.P_FLIP], params[0, ga.P_JITTER], params[1, ga.P_JITTER] = 1, 0, 0, 1
    rows = dali_rows(params)
    top, left, h, w = params[0, :4].tolist()
    assert rows[0, :4].tolist() == [top, left + w, top + h, left]
    top, left, h, w = params[1, :4].tolist()
    assert rows[1, :4].tolist() == [top, left, top + h, left + w]
    assert rows[0, 4:8].tolist() == [1, 1, 1, 0]
    assert rows[1, 7] == pytest.approx(float(params[1, ga.P_HUE]) * 360, abs=1e-4)


def test_batches_are_deterministic_resume_exactly_and_skip_bad_files(tmp_path):
    root = _folder(tmp_path)
    (root / "9_empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    _photo(40, 30).save(buf, format="JPEG")
    (root / "9_truncated.jpg").write_bytes(buf.getvalue()[:200])
    dali, _ = _sources(root)
    first = list(dali.epoch(0))
    assert len(first) == 2
    resumed = list(dali.epoch(0, start_step=1))
    assert all(torch.equal(a, b) for a, b in zip(first[1][0], resumed[0][0], strict=True))
    again = list(dali.epoch(0))
    assert all(torch.equal(a, b) for (v1, _, _), (v2, _, _) in zip(first, again, strict=True)
               for a, b in zip(v1, v2, strict=True))
    for views, _labels, _ in first:
        assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views)
    everything = list(dali.epoch(1)) + list(dali.epoch(2)) + first
    reported = {p.rsplit("/", 1)[-1] for _, _, bad in everything for p, _ in bad}
    assert reported <= {"9_empty.jpg", "9_truncated.jpg"} and reported  # met in some epoch, never a crash
