"""Benchmark the data backends: multi-crop images/s (2x224 + 10x96) from a folder of ImageNet-like JPEGs.

    PYTHONPATH=. python perf/bench_data.py [--images 2000] [--batch 64] [--workers 8] [--steps 20]
                                           [--backends official,cpu,torch_gpu,dali] [--device cuda|cpu]
    PYTHONPATH=. python perf/bench_data.py --make-only --images 2688 --workers 16 --folder DIR   # JPEGs only

Generates (once, cached under --folder; --workers processes) `--images` JPEGs of --width x --height (500 x 375,
ImageNet's most common size) at quality 90 with photo-like content (smooth colour fields plus noise), then times
each backend over `--steps` batches after `--warmup` batches:
  official   an official-style pipeline: torchvision transforms on PIL images as the official DINO code composes
             them (decode once, then per crop RandomResizedCrop, flip, ColorJitter p=0.8, grayscale, PIL blur,
             solarise, ToTensor, Normalize), in a DataLoader with the same workers; the ratio column divides by it
  cpu        data.backend=cpu (fastdino.data.loader.CpuBatches)
  torch_gpu  data.backend=torch_gpu on --device (on the CPU its batched ops run on CPU tensors)
  dali       data.backend=dali (needs `pip install -e ".[dali]"`; CPU operators without a GPU)
For a GPU backend on a GPU it also reports the GPU time per image of its decode + augmentation, what it takes
from the training step (`gpu_ms_per_image`): CUDA events on the training stream (the current one, which the
trainer steps on) around the backend's main-process work on one batch already read by the workers, repeated
--steps times with the GPU otherwise idle. It is elapsed stream time, so it also counts the gaps where the GPU
waits for the host (launches, a CPU fallback decode): an upper bound of the GPU's busy time. torch_gpu's work
is queued on that stream; dali's runs on DALI's own stream, and the window spans `pipe.run()` and the copy of its
outputs onto the training stream. Backends that cannot run here print why instead of a figure.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastdino.data.files import ImageFileDataset, collate_views, decode_rgb, index_image_folder  # noqa: E402
from fastdino.data.loader import CpuBatches, build_loader, dali_available  # noqa: E402
from fastdino.data.multicrop import IMAGENET_MEAN, IMAGENET_STD, multicrop_transform  # noqa: E402


def _write_jpegs(root: Path, indices: list[int], width: int, height: int, quality: int) -> None:
    """JPEGs number `indices`: each drawn from its own seed, so any split over processes writes the same files;
    written under a temporary name then renamed, so a run cut off leaves no half file."""
    for i in indices:
        rng = np.random.default_rng([0, i])
        coarse = rng.integers(0, 256, size=(height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
        field = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        grain = rng.normal(0, 12, size=(height, width, 3))
        pixels = np.clip(np.asarray(field, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
        partial = root / f"{i:06d}.part"
        Image.fromarray(pixels).save(partial, format="JPEG", quality=quality)
        partial.replace(root / f"{i:06d}.jpg")


def make_jpegs(folder: Path, n: int, width: int, height: int, quality: int = 90, workers: int = 1) -> Path:
    """n JPEGs in folder/train (kept between runs): a blurred colour field plus grain, like a photo's spectrum.
    `workers` processes write them (about 21 ms per 500x375 image on one core: 2,688 take ~56 s on one)."""
    root = folder / "train"
    have = {p.name for p in root.glob("*.jpg")} if root.is_dir() else set()
    missing = [i for i in range(n) if f"{i:06d}.jpg" not in have]
    if not missing:
        return folder
    root.mkdir(parents=True, exist_ok=True)
    workers = max(1, min(workers, len(missing)))
    if workers == 1:
        _write_jpegs(root, missing, width, height, quality)
        return folder
    from concurrent.futures import ProcessPoolExecutor

    chunks = [missing[k::workers] for k in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        for done in [pool.submit(_write_jpegs, root, c, width, height, quality) for c in chunks]:
            done.result()
    return folder


class _PilBlur:
    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class _PilSolarize:
    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


class OfficialStyle:
    """The SPEC's multi-crop composed from torchvision (v1) transforms on PIL images, the official code's way."""

    def __init__(self, n_local: int = 10) -> None:
        def chain(size: int, scale: tuple[float, float], blur_p: float, solarize_p: float = 0.0) -> T.Compose:
            return T.Compose([
                T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
                T.RandomHorizontalFlip(p=0.5),
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
                _PilBlur(blur_p),
                _PilSolarize(solarize_p),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ])

        self.crops = [chain(224, (0.4, 1.0), 1.0), chain(224, (0.4, 1.0), 0.1, 0.2)]
        self.crops += [chain(96, (0.05, 0.4), 0.5)] * n_local

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return [crop(img) for crop in self.crops]


class _OfficialDataset(torch.utils.data.Dataset):
    def __init__(self, paths: list[str]) -> None:
        self.paths, self.transform = paths, OfficialStyle()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.transform(decode_rgb(self.paths[i])), 0, ()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_batches(batches, n_steps: int, n_warmup: int, batch: int, device: torch.device) -> float:
    """img/s over n_steps batches after n_warmup (the views are forced onto `device`, as the trainer does)."""
    it = iter(batches)
    for _ in range(n_warmup):
        next(it)
    _sync(device)
    start = time.perf_counter()
    for _ in range(n_steps):
        views, _, _ = next(it)
        for v in views:
            v.to(device, non_blocking=True)
    _sync(device)
    return n_steps * batch / (time.perf_counter() - start)


def gpu_ms_per_image(source, n_steps: int, batch: int) -> str:
    """ms of the training stream per image that a GPU backend's main-process decode + augmentation takes
    (`TorchGpuBatches` or `DaliBatches` on a CUDA device): CUDA events on the current stream around `source.views`
    of one read batch, run n_steps times after one untimed run."""
    from fastdino.data.gpu_augment import collate_encoded

    items = next(iter(build_loader(source.encoded, batch, 0, seed=0, epoch=0, collate_fn=collate_encoded)))[0]
    source.views(items)  # warm-up: nvJPEG handles, DALI's buffers, cuBLAS
    stream = torch.cuda.current_stream(source.device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(source.device)
    start.record(stream)
    for _ in range(n_steps):
        source.views(items)
    end.record(stream)
    torch.cuda.synchronize(source.device)
    return f"{start.elapsed_time(end) / (n_steps * batch):.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="/tmp/fastdino_bench_jpegs")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backends", default="official,cpu,torch_gpu,dali")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--make-only", action="store_true",
                        help="only write the --images JPEGs into --folder/WxH/train, --workers processes at once, "
                             "and exit (the GPU suite shares them between parts)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if not args.make_only and (args.warmup + args.steps) * args.batch > args.images:
        parser.error(f"--images {args.images} is fewer than (--warmup + --steps) x --batch")
    started = time.perf_counter()
    folder = make_jpegs(Path(args.folder) / f"{args.width}x{args.height}", args.images, args.width, args.height,
                        workers=args.workers)
    if args.make_only:
        print(f"{args.images} JPEGs {args.width}x{args.height} q90 in {folder / 'train'} "
              f"({time.perf_counter() - started:.1f} s, {args.workers} processes)")
        return 0
    index = index_image_folder(folder / "train")
    dataset = ImageFileDataset(index, multicrop_transform(), seed=0)
    print(f"{len(index)} JPEGs {args.width}x{args.height} q90, 2x224 + 10x96, batch {args.batch}, "
          f"{args.workers} workers, {args.steps} timed batches, torch threads {torch.get_num_threads()}")
    print("| backend | device | img/s | x official | GPU ms/img |")
    print("|---|---|---|---|---|")
    official = None
    for name in args.backends.split(","):
        gpu_ms = "-"
        if name == "official":
            batches = build_loader(_OfficialDataset(index.paths), args.batch, args.workers, seed=0, epoch=0,
                                   collate_fn=collate_views)
            where = "cpu"
        elif name == "cpu":
            batches, where = CpuBatches(dataset, args.batch, args.workers, seed=0).epoch(0), "cpu"
        elif name in ("torch_gpu", "dali"):
            if name == "dali" and not dali_available():
                print('| dali | - | not measured yet (DALI is not installed: pip install -e ".[dali]") | | |')
                continue
            if name == "dali":
                from fastdino.data.dali import DaliBatches as GpuBatches
            else:
                from fastdino.data.gpu_augment import TorchGpuBatches as GpuBatches

            source = GpuBatches(dataset, args.batch, args.workers, seed=0, device=device)
            batches, where = source.epoch(0), device.type
            if device.type == "cuda":
                gpu_ms = gpu_ms_per_image(source, args.steps, args.batch)
            else:
                gpu_ms = "not measured yet (no GPU)"
        else:
            parser.error(f"unknown backend {name!r}")
        rate = time_batches(batches, args.steps, args.warmup, args.batch, device)
        official = rate if name == "official" else official
        ratio = f"{rate / official:.2f}" if official else "-"
        print(f"| {name} | {where} | {rate:.1f} | {ratio} | {gpu_ms} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
