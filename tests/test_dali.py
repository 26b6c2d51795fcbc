"""The dali data backend with DALI's CPU operators (issue 13): geometry against the torch_gpu backend on the same
parameters, the per-crop masks, determinism and resume, bad files. Skipped without `.[dali]`."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from fastdino.data import gpu_augment as ga
from fastdino.data.batch import CpuBatches
from fastdino.data.files import ImageFileDataset, decode_rgb, index_image_folder
from fastdino.data.multicrop import IMAGENET_MEAN, IMAGENET_STD, multicrop_transform

pytest.importorskip("nvidia.dali")
from nvidia.dali import fn, pipeline_def, types  # noqa: E402

from fastdino.data import dali as dali_module  # noqa: E402
from fastdino.data.batch import build_loader  # noqa: E402
from fastdino.data.dali import DaliBatches, _encoded, dali_rows  # noqa: E402
from fastdino.data.gpu_augment import collate_encoded  # noqa: E402

# CPU operators here; nvJPEG ("mixed") and the GPU operators in `pytest -m gpu` (perf/gpu_suite.py).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


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


def _sources(root, device="cpu", **kw):
    dataset = ImageFileDataset(index_image_folder(root), multicrop_transform(32, 16, 2, blur_sigma=(0.1, 0.5)),
                               seed=5)
    dali = DaliBatches(dataset, batch_size=4, num_workers=0, seed=5, device=device, num_threads=1, **kw)
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


@pytest.mark.parametrize("device", DEVICES)
def test_prefetch_runs_ahead_keeps_the_order_and_a_stopped_epoch_leaves_nothing_behind(tmp_path, monkeypatch, device):
    """DALI runs PREFETCH batches ahead (asynchronous executor), each batch's views and labels stay together, and a
    run stopped mid-epoch (the generator closed) leaves the pipeline ready for the next epoch from its start."""
    dali, _ = _sources(_folder(tmp_path, n=12), device=device)
    want = list(dali.epoch(0))
    assert len(want) == 3
    fed = []
    encoded = dali_module._encoded
    monkeypatch.setattr(dali_module, "_encoded", lambda item: fed.append(item.index) or encoded(item))
    batches = dali.epoch(0)
    views, labels, _ = next(batches)
    assert len(fed) == dali_module.PREFETCH * 4  # two batches pulled before the first was handed out
    assert torch.equal(labels, want[0][1]) and all(torch.equal(a, b) for a, b in zip(views, want[0][0], strict=True))
    batches.close()  # stopped after one step, with a batch still in DALI
    for (v1, l1, _), (v2, l2, _) in zip(want, dali.epoch(0), strict=True):
        assert torch.equal(l1, l2) and all(torch.equal(a, b) for a, b in zip(v1, v2, strict=True))
    # one batch on its own (no prefetch behind it) gives the same views as inside the epoch
    loader = build_loader(dali.encoded, 4, 0, seed=5, epoch=0, collate_fn=collate_encoded)
    for (items, labels, _), (v, want_labels, _) in zip(loader, want, strict=True):
        assert torch.equal(labels, want_labels)
        assert all(torch.equal(a, b) for a, b in zip(dali.views(items), v, strict=True))


@pytest.mark.gpu
def test_the_gpu_probe_pipeline_runs():
    """Where DALI and a GPU are there, the probe `auto` relies on passes (else auto silently takes torch_gpu)."""
    dali_module.gpu_problem.cache_clear()
    assert dali_module.gpu_problem(torch.cuda.current_device()) is None


def _jpeg(img, orientation=1, **kw) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, exif=exif, **kw)
    return buf.getvalue()


def _decoded_by_dali(blobs, device):
    """The backend's decode op alone (`fn.decoders.image` as in dali.build_pipeline): (H, W, 3) uint8 arrays."""
    gpu = device == "cuda"

    @pipeline_def(batch_size=len(blobs), num_threads=1, device_id=0 if gpu else None, exec_async=False,
                  exec_pipelined=False)
    def decode():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        return fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)

    pipe = decode()
    pipe.build()
    pipe.feed_input("encoded", blobs)
    (out,) = pipe.run()
    out = out.as_cpu() if gpu else out
    return [np.array(out.at(k)) for k in range(len(blobs))]


@pytest.mark.parametrize("device", DEVICES)
def test_the_decoder_equals_pillow_within_jpeg_rounding_and_fallbacks_exactly(tmp_path, device):
    for k, (w, h) in enumerate([(64, 48), (57, 33), (500, 375)]):  # 4:4:4, 4:2:2, 4:2:0 chroma
        _photo(w, h, seed=k).save(tmp_path / f"0_{k}.jpg", quality=90, subsampling=k)
    photo = _photo(40, 24)
    (tmp_path / "1_exif6.jpg").write_bytes(_jpeg(photo, orientation=6))
    (tmp_path / "1_exif7.jpg").write_bytes(_jpeg(photo, orientation=7))
    photo.save(tmp_path / "2.png")
    (tmp_path / "2_cmyk.jpg").write_bytes(_jpeg(photo.convert("CMYK")))
    (tmp_path / "2_gray.jpg").write_bytes(_jpeg(photo.convert("L")))
    Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257).save(tmp_path / "2_16bit.png")
    dali, _ = _sources(tmp_path)
    items = [dali.encoded[i] for i in range(len(dali.encoded))]
    paths = dali.encoded.base.index.paths
    assert [it.jpeg is None for it in items] == [False] * 5 + [True] * 4  # fallbacks: Pillow, then BMP
    for got, it, path in zip(_decoded_by_dali([_encoded(it) for it in items], device), items, paths, strict=True):
        want = np.array(decode_rgb(path))
        assert got.shape == want.shape == (*it.size, 3), path  # EXIF orientation applied
        diff = np.abs(got.astype(np.float64) - want)
        if it.jpeg is None:
            assert diff.max() == 0, path  # lossless hand-over of Pillow's pixels
        else:  # grey levels: IDCT and chroma upsampling round differently
            assert diff.mean() < 1.5 and np.quantile(diff, 0.999) <= 12, (path, diff.mean(), diff.max())


@pytest.mark.parametrize("device", DEVICES)
def test_views_follow_the_exif_orientation_and_the_torch_gpu_geometry(tmp_path, device):
    for o in range(1, 9):
        (tmp_path / f"{o}.jpg").write_bytes(_jpeg(_photo(56, 40, seed=o), orientation=o))
    dali, torch_gpu = _sources(tmp_path, device=device)
    items = [dali.encoded[i] for i in range(4, 8)]  # orientations 5-8: transposed, height and width swap
    for it in items:
        it.params[:, [ga.P_JITTER, ga.P_GRAY, ga.P_BLUR, ga.P_SOLARIZE]] = 0  # geometry only
        it.params[::2, ga.P_FLIP] = 1
        it.params[1::2, ga.P_FLIP] = 0
    got = [_unnormalise(v.cpu()) for v in dali.views(items)]
    want = [_unnormalise(v) for v in torch_gpu.views(items)[0]]
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert (g - w).abs().mean() < 3
        assert (g - w.transpose(-1, -2)).abs().mean() > 10  # an orientation left unapplied would be caught


@pytest.mark.gpu
def test_a_gpu_batch_has_the_cpu_backends_shapes_dtypes_ranges_and_labels(tmp_path):
    root = _folder(tmp_path)
    dali, _ = _sources(root, device="cuda")
    views, labels, bad = next(iter(dali.epoch(0)))
    cpu_views, cpu_labels, _ = next(iter(CpuBatches(dali.encoded.base, 4, 0, seed=5).epoch(0)))
    assert [v.shape for v in views] == [v.shape for v in cpu_views] and bad == []
    assert all(v.dtype == torch.float32 and v.device.type == "cuda" for v in views)
    assert torch.equal(labels, cpu_labels)  # same sampler: the same images in the same order
    for v in views:
        for c, (m, s) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)):
            assert (0 - m) / s - 1e-3 <= v[:, c].min() and v[:, c].max() <= (1 - m) / s + 1e-3
    # the same batch on DALI's CPU operators: nvJPEG and the GPU kernels round differently, the recipe is the same
    host = next(iter(_sources(root)[0].epoch(0)))[0]
    for v, h in zip(views, host, strict=True):
        assert (_unnormalise(v.cpu()) - _unnormalise(h)).abs().mean() < 4  # grey levels


def test_a_dropped_source_frees_its_pipeline_at_once_so_no_forked_worker_inherits_it(tmp_path):
    """A DataLoader worker forked while a dropped pipeline waits for the cyclic GC collects it there, and DALI's
    shutdown in the child waits forever (perf/bench_data.py hung): so nothing may keep it in a cycle. The next
    source, with forked workers, still runs its epochs to the end."""
    import gc
    import weakref

    root = _folder(tmp_path / "imgs")
    dali, _ = _sources(root)
    assert len(list(dali.epoch(0))) == 2
    pipe = weakref.ref(dali.pipe)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        del dali
        assert pipe() is None  # freed by its reference count, not left for the collector
    finally:
        if was_enabled:
            gc.enable()
    dataset = ImageFileDataset(index_image_folder(root), multicrop_transform(32, 16, 2), seed=5)
    for _ in range(2):  # a new source per timing, as the bench does; its workers fork each epoch
        source = DaliBatches(dataset, batch_size=4, num_workers=2, seed=5, device="cpu", num_threads=1)
        assert [len(labels) for _, labels, _ in source.epoch(0)] == [4, 4]
