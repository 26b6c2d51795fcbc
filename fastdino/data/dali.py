"""DINO multi-crop in an NVIDIA DALI pipeline: the `dali` data backend (issue 13; SPEC "Augmentations").

Needs `pip install -e ".[dali]"` (nvidia-dali-cuda130); the same pipeline runs with DALI's CPU operators when
the device is the CPU (CI). Data order, sharding, bad files and random parameters are the torch_gpu backend's
(`gpu_augment.EncodedImages` in DataLoader workers, `build_loader`'s `ResumableShardedSampler`): workers read
the bytes and draw every crop's parameters from `item_seed(seed, epoch, index)`, and the pipeline takes both
through `external_source`. That is the equivalent of DALI's reader checkpointing used here: a run resumed at
step s of an epoch feeds exactly the files and parameters the uninterrupted run fed from step s on, with no
DALI state to save. Bit-exact on resume: the file order, the substitutions, every random choice (crop boxes,
flips, which ops apply and their factors), and on the CPU operators the views themselves (checked by
tests/test_dali.py). Tar shards reach DALI the same way (the workers read each member's bytes by offset,
`ImageIndex.read`), not through `fn.readers.webdataset`: that reader shuffles and shards by itself and would
need its own checkpoint state to resume, whereas the external source keeps one data order for every backend
and an exact resume with nothing to save. Not promised bit-exact: GPU views between runs or DALI versions
(nvJPEG, the hardware decoder and the GPU kernels may round differently), and views against the torch_gpu or
cpu backends.

Per image: one decode (`fn.decoders.image`, `device="mixed"` on a GPU: nvJPEG; EXIF orientation applied),
then per crop: `fn.resize` of the crop box (cubic, antialiased when shrinking; a flip is the box given right
to left), `fn.color_twist` with the jitter factors (identity for the 20% without jitter), a second
`fn.color_twist` with saturation 0 for grayscale, `fn.gaussian_blur` with the per-crop sigma blended in by the
blur mask, solarisation by arithmetic on the solarise mask, `fn.crop_mirror_normalize` to normalised float CHW.
Files DALI is not given as they are (PNG and other formats, CMYK or greyscale JPEG) are decoded by Pillow in
the worker and handed over as uncompressed BMP.

The pipeline runs DALI's asynchronous, pipelined executor PREFETCH = 2 batches ahead of the step (it pulls the
batches from the DataLoader itself, in order: `build_pipeline` says why order and resume stay exact); a run
stopped mid-epoch drains it. `auto` picks this backend only where a probe pipeline ran on the GPU
(`gpu_problem`).

Where DALI's ops differ from torchvision's (the cpu backend):
- colour jitter: `color_twist` applies brightness, contrast, saturation and hue as one fixed-order colour
  transform, not torchvision's random order per sample; hue rotates in YIQ space, not HSV; contrast scales
  around mid-grey, not the image's mean luma;
- cubic resampling is DALI's own filter (not Pillow's a = -0.5 Keys kernel), values rounded to uint8 after
  each op as in Pillow;
- blur: a sampled Gaussian of 2*ceil(3*sigma_max)+1 taps, not Pillow's box approximation.
"""

from __future__ import annotations

import collections
import functools
import io
from collections.abc import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from fastdino.data.batch import Batch, build_loader
from fastdino.data.files import ImageFileDataset
from fastdino.data.gpu_augment import (
    P_BLUR,
    P_BRIGHTNESS,
    P_CONTRAST,
    P_FLIP,
    P_GRAY,
    P_HEIGHT,
    P_HUE,
    P_JITTER,
    P_LEFT,
    P_SATURATION,
    P_SIGMA,
    P_SOLARIZE,
    P_TOP,
    P_WIDTH,
    CropRecipe,
    EncodedImages,
    EncodedItem,
    collate_encoded,
)
from fastdino.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
from fastdino.errors import MissingDependencyError

# Columns of the per-crop rows fed to the pipeline (float32).
F_ROI = slice(0, 4)  # y0, x0, y1, x1: a flipped crop has x0 > x1
F_BRIGHTNESS, F_CONTRAST, F_SATURATION, F_HUE, F_GRAY, F_BLUR, F_SIGMA, F_SOLARIZE = range(4, 12)
N_FEED = 12
PREFETCH = 2  # batches DALI runs ahead of the step (its prefetch_queue_depth)


def dali_rows(params: torch.Tensor) -> np.ndarray:
    """(n_crops, N_PARAMS) parameters -> (n_crops, N_FEED) float32 rows in DALI's terms (identity where an op
    is not drawn; hue in degrees; saturation 0 for grayscale)."""
    p = params.double()
    rows = torch.zeros(p.shape[0], N_FEED, dtype=torch.float64)
    flip = p[:, P_FLIP] > 0
    left, right = p[:, P_LEFT], p[:, P_LEFT] + p[:, P_WIDTH]
    rows[:, F_ROI] = torch.stack([p[:, P_TOP], torch.where(flip, right, left), p[:, P_TOP] + p[:, P_HEIGHT],
                                  torch.where(flip, left, right)], 1)
    jitter = p[:, P_JITTER] > 0
    for f, q in ((F_BRIGHTNESS, P_BRIGHTNESS), (F_CONTRAST, P_CONTRAST), (F_SATURATION, P_SATURATION)):
        rows[:, f] = torch.where(jitter, p[:, q], 1.0)
    rows[:, F_HUE] = torch.where(jitter, p[:, P_HUE] * 360, 0.0)
    rows[:, F_GRAY] = 1 - p[:, P_GRAY]
    rows[:, F_BLUR], rows[:, F_SIGMA], rows[:, F_SOLARIZE] = p[:, P_BLUR], p[:, P_SIGMA], p[:, P_SOLARIZE]
    return rows.float().numpy()


def _encoded(item: EncodedItem) -> np.ndarray:
    """The bytes DALI decodes: the file's JPEG, or the worker's upright pixels as BMP (lossless, no compression)."""
    if item.jpeg is not None:
        return item.jpeg.numpy()
    buf = io.BytesIO()
    Image.fromarray(item.pixels.permute(1, 2, 0).numpy()).save(buf, format="BMP")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def _import_dali():
    try:
        from nvidia.dali import fn, pipeline_def, types
    except Exception as err:  # not installed, or installed but broken (any error while importing)
        raise MissingDependencyError(f'data.backend=dali needs NVIDIA DALI: pip install -e ".[dali]" (importing it '
                                     f'failed: {type(err).__name__}: {err})') from err
    return fn, pipeline_def, types


def build_pipeline(recipe: CropRecipe, batch_size: int, num_threads: int, device_id: int | None, seed: int,
                   source: Callable[[], tuple[list[np.ndarray], list[np.ndarray]]]):
    """The DALI pipeline (not built): `source()` gives each batch's bytes and (n_crops, N_FEED) float32 rows,
    and raises StopIteration at the end of the data; outputs one normalised float32 (3, S, S) batch per crop.
    device_id None runs CPU operators only.

    Asynchronous and pipelined, PREFETCH batches deep: DALI calls `source` in order, in the calling thread, when a
    run is scheduled, and runs iterations in order, so batch i's outputs are batch i's inputs whatever the depth.
    No operator draws a random number (every choice comes in `params`), so running ahead changes nothing either.
    """
    fn, pipeline_def, types = _import_dali()
    gpu = device_id is not None

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  exec_async=True, exec_pipelined=True, exec_dynamic=True, prefetch_queue_depth=PREFETCH)
    def multicrop():
        encoded, params = fn.external_source(source=source, num_outputs=2, dtype=[types.UINT8, types.FLOAT],
                                             ndim=[1, 2])
        if gpu:
            params_dev = params.gpu()
        images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
        mean = [255 * m for m in IMAGENET_MEAN]
        std = [255 * s for s in IMAGENET_STD]
        views = []
        for k in range(recipe.n_crops):
            size = recipe.crop(k)[0]
            x = fn.resize(images, size=[size, size], roi_start=params[k, 0:2], roi_end=params[k, 2:4],
                          interp_type=types.INTERP_CUBIC, antialias=True)
            x = fn.color_twist(x, brightness=params[k, F_BRIGHTNESS], contrast=params[k, F_CONTRAST],
                               saturation=params[k, F_SATURATION], hue=params[k, F_HUE])
            x = fn.color_twist(x, saturation=params[k, F_GRAY])
            blurred = fn.gaussian_blur(x, sigma=params[k, F_SIGMA], window_size=recipe.blur_taps(size))
            dev = params_dev if gpu else params
            x = fn.cast(x, dtype=types.FLOAT)
            x = x + dev[k, F_BLUR] * (fn.cast(blurred, dtype=types.FLOAT) - x)
            x = x + dev[k, F_SOLARIZE] * (x >= 128) * (255 - 2 * x)
            views.append(fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std))
        return tuple(views)

    return multicrop()


def _to_torch(tensor_list, device: torch.device) -> tuple[torch.Tensor, object]:
    """(a torch copy of one DALI output, the DALI tensor it is copied from, to keep until the copy has run)."""
    dense = tensor_list.as_tensor()
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = torch.empty(dense.shape(), dtype=torch.float32, device=device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))  # queued on the training stream
        return out, dense
    return torch.from_numpy(np.array(dense)), dense


def _stop() -> tuple[list[np.ndarray], list[np.ndarray]]:
    raise StopIteration


class _Feed:
    """What the pipeline's external source calls: the running epoch's feed, else `_stop`.

    The pipeline holds this, not its DaliBatches, so no reference cycle keeps a dropped DaliBatches and its
    pipeline alive until the cyclic garbage collector runs. Left to it, a DataLoader worker forked meanwhile
    inherits the pipeline as garbage, collects it, and DALI's shutdown there waits forever on threads the fork
    did not copy: perf/bench_data.py, which builds a DaliBatches per timing, hung so."""

    def __init__(self) -> None:
        self.source: Callable[[], tuple[list[np.ndarray], list[np.ndarray]]] = _stop

    def __call__(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return self.source()


@functools.cache
def gpu_problem(device_index: int) -> str | None:
    """Why DALI cannot run on cuda:`device_index`, or None when a tiny GPU pipeline (one 16 x 16 JPEG through
    the nvJPEG "mixed" decoder and a GPU resize) built and ran there. Cached per device: one probe a process.

    Importing DALI says nothing about the machine: a driver older than the wheel's CUDA, or a GPU DALI does
    not support, only fails when a pipeline is built or run. `loader.resolve_backend` asks this before `auto`
    picks DALI.
    """
    try:
        fn, pipeline_def, types = _import_dali()
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 30, 60)).save(buf, format="JPEG")
        jpeg = np.frombuffer(buf.getvalue(), dtype=np.uint8)

        @pipeline_def(batch_size=1, num_threads=1, device_id=device_index, exec_async=False, exec_pipelined=False,
                      prefetch_queue_depth=1)
        def probe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            images = fn.decoders.image(encoded, device="mixed", output_type=types.RGB)
            return fn.resize(images, size=[8, 8])

        pipe = probe()
        pipe.build()
        pipe.feed_input("encoded", [jpeg])
        (out,) = pipe.run()
        shape = tuple(out.as_cpu().as_array().shape)
        if shape != (1, 8, 8, 3):
            return f"a probe pipeline gave shape {shape}, not (1, 8, 8, 3)"
    except Exception as err:  # noqa: BLE001 - whatever fails here, DALI is not usable on this device
        # DALI's executor errors start with a generic line ("Critical error in pipeline:"): keep them whole.
        return f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
    return None


class DaliBatches:
    """The dali `BatchSource`: workers read bytes and draw parameters (as torch_gpu), DALI decodes and crops,
    up to PREFETCH batches ahead of the training step."""

    def __init__(
        self, dataset: ImageFileDataset, batch_size: int, num_workers: int, seed: int, rank: int = 0,
        world_size: int = 1, device: torch.device | str = "cuda", num_threads: int = 4,
    ) -> None:
        self.recipe = CropRecipe.from_transform(dataset.transform, backend="dali")
        self.encoded = EncodedImages(dataset, self.recipe)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        device_id = (self.device.index or 0) if self.device.type == "cuda" else None
        self._feed = _Feed()
        self._held: collections.deque = collections.deque()  # (event, DALI outputs) until the copies have run
        self.pipe = build_pipeline(self.recipe, batch_size, num_threads, device_id, seed, self._feed)
        self.pipe.build()

    def _run(self, batches: Iterator[tuple[list[EncodedItem], torch.Tensor, list]]) -> Iterator[Batch]:
        """Each (items, labels, unreadable) of `batches` through the pipeline, in order: (views, labels,
        unreadable). DALI pulls up to PREFETCH batches ahead; their labels wait here in the same order.
        Leaving early (a run stopped mid-epoch) drains what DALI still holds, so the next epoch starts clean."""
        waiting: collections.deque = collections.deque()

        def feed() -> tuple[list[np.ndarray], list[np.ndarray]]:
            items, labels, unreadable = next(batches)  # StopIteration ends DALI's epoch
            waiting.append((labels, unreadable))
            return [_encoded(it) for it in items], [dali_rows(it.params) for it in items]

        if not self.pipe.empty():  # an earlier epoch's generator was never closed: its batches are stale
            self._feed.source = _stop
            self._drain()
        self._feed.source = feed
        failed = False
        try:
            while True:
                self.pipe.schedule_run()
                try:
                    outputs = self.pipe.outputs()  # waits for this batch only: the next ones keep running
                except StopIteration:
                    return
                labels, unreadable = waiting.popleft()
                yield self._views(outputs), labels, unreadable
        except Exception:
            failed = True
            raise
        finally:
            self._feed.source = _stop
            try:
                self._drain()
            except Exception:
                if not failed:  # after a DALI error the pipeline refuses again: keep the first error
                    raise

    def _drain(self) -> None:
        """End DALI's epoch, drop what it still holds and free the kept outputs (one host wait, at an epoch's
        end only), so the next epoch starts clean and no batch outlives its epoch."""
        self.pipe.schedule_run()  # takes no more input: marks DALI's epoch as ended
        while not self.pipe.empty():
            self.pipe.outputs()
        self.pipe.reset()
        while self._held:
            self._held.popleft()[0].synchronize()

    def _views(self, outputs) -> list[torch.Tensor]:
        """DALI's outputs as torch tensors on the device. On a GPU the copies are queued on the current stream,
        which the step never waits for; DALI's output buffers are kept referenced (so DALI cannot reuse them)
        until an event after the copies has passed, polled without blocking, the way torch's caching allocator
        treats `record_stream`."""
        views, sources = zip(*(_to_torch(out, self.device) for out in outputs), strict=True)
        if self.device.type == "cuda":
            while self._held and self._held[0][0].query():
                self._held.popleft()
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._held.append((event, (outputs, sources)))
        return list(views)

    def views(self, items: list[EncodedItem]) -> list[torch.Tensor]:
        """One batch through the pipeline: the views, (B, 3, S, S) float32 each, on the device."""
        ((views, _, _),) = list(self._run(iter([(items, None, [])])))
        return views

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        loader = build_loader(
            self.encoded, self.batch_size, self.num_workers, seed=self.seed, epoch=epoch, start_step=start_step,
            rank=self.rank, world_size=self.world_size, pin_memory=False, collate_fn=collate_encoded,
        )
        yield from self._run(iter(loader))
