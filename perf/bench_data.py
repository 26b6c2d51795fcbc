"""Benchmark the data backends: multi-crop images/s (2x224 + 10x96) from a folder of ImageNet-like JPEGs, and
from the same JPEGs as tar shards (issue 24); the shard index's first and cached start for a million members.

    PYTHONPATH=. python perf/bench_data.py [--images 2000] [--batch 64] [--workers 8] [--steps 20]
                                           [--backends official,cpu,torch_gpu,dali] [--device cuda|cpu]
                                           [--shards 4] [--repeats 2] [--index-members 1000000]
                                           [--index-processes-at-once 2]
    PYTHONPATH=. python perf/bench_data.py --make-only --images 2688 --workers 16 --folder DIR   # JPEGs only

Generates (once, cached under --folder; --workers processes) `--images` JPEGs of --width x --height (500 x 375,
ImageNet's most common size) at quality 90 with photo-like content (smooth colour fields plus noise), then times
each backend over `--steps` batches after `--warmup` batches:
  official   an official-style pipeline: torchvision transforms on PIL images as the official DINO code composes
             them (decode once, then per crop RandomResizedCrop, flip, ColorJitter p=0.8, grayscale, PIL blur,
             solarise, ToTensor, Normalize), in a DataLoader with the same workers; the ratio column divides by it
  cpu        data.backend=cpu (fastdino.data.batch.CpuBatches)
  torch_gpu  data.backend=torch_gpu on --device (on the CPU its batched ops run on CPU tensors)
  dali       data.backend=dali (needs `pip install -e ".[dali]"`; CPU operators without a GPU)
For a GPU backend on a GPU it also reports the GPU time per image of its decode + augmentation, what it takes
from the training step (`gpu_ms_per_image`): CUDA events on the training stream (the current one, which the
trainer steps on) around the backend's main-process work on one batch already read by the workers, repeated
--steps times with the GPU otherwise idle. It is elapsed stream time, so it also counts the gaps where the GPU
waits for the host (launches, a CPU fallback decode): an upper bound of the GPU's busy time. torch_gpu's work
is queued on that stream; dali's runs on DALI's own stream, and the window spans `pipe.run()` and the copy of its
outputs onto the training stream. Backends that cannot run here print why instead of a figure.

--shards N (0: off) also writes the JPEGs as N shards with `fastdino.data.shards.write_shards` (kept beside
them) and times every fastdino backend on the folder and on the shards in turn, --repeats times alternating
which goes first; each row shows the best of its repeats, the ratio of the bests (x folder) and the ratio within
each repeat, whose two timings ran back to back (sorted, with their median). --control also times the folder
against itself ("folder again"): the spread of its ratios is the machine's noise, which a shards ratio must be
read against. Before them it times the one step that differs, in one process: every image's bytes
(`ImageIndex.read`) and their decode.
--backends '' skips the backends. --index-members M
writes M tiny samples (a 1-byte image and a .cls each, 2M tar members) in 16 shards and times `index_shards`
with an empty index cache (scan over as many processes as `index_processes()` allows, + write), again (cached
start: read, checksum, stat every shard), and with an empty cache in one process (FASTDINO_INDEX_PROCESSES=1),
each with the CPU time of the calling process (with several processes: the merge, sort and cache, not the scan);
then the start and end of those processes alone (each scanning an empty shard).
--index-processes-at-once N (with --index-members, instead of those timings) starts N processes on those shards
at once, as a node's N ranks (LOCAL_WORLD_SIZE=N), each with an empty shared index cache, and times from their
common start (after their imports) until every one has its index, twice: before (flock made to fail with ENOLCK
in them: every process scans, dividing the CPUs, as all did before the build lock) and after (one scans with every
CPU while the others wait for its cache and read it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastdino.data.batch import CpuBatches, build_loader  # noqa: E402
from fastdino.data.files import ImageFileDataset, collate_views, decode_rgb, index_image_folder  # noqa: E402
from fastdino.data.loader import dali_available  # noqa: E402
from fastdino.data.multicrop import IMAGENET_MEAN, IMAGENET_STD, multicrop_transform  # noqa: E402
from fastdino.data.shards import (  # noqa: E402
    INDEX_PROCESSES_ENV,
    _scan_elsewhere,
    _scan_processes,
    index_processes,
    index_shards,
    write_shards,
)


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


def make_shards(folder: Path, n_shards: int) -> Path:
    """folder/train's JPEGs as n_shards shards in folder/shards<n> (kept between runs)."""
    out = folder / f"shards{n_shards}"
    if not (out / ".complete").exists():
        total = sum(p.stat().st_size + 1536 for p in (folder / "train").iterdir())
        if out.exists():
            for p in out.iterdir():
                p.unlink()
        write_shards(folder / "train", out, shard_size=-(-total // n_shards) + 10240 * 2, progress=False)
        (out / ".complete").touch()
    return out


def make_tiny_shards(folder: Path, n_samples: int, n_shards: int = 16, n_classes: int = 1000) -> Path:
    """n_samples samples (`c/i.jpg` of 1 byte + `c/i.cls`) in n_shards ustar shards, written header by header
    (tarfile takes minutes for millions of members); kept between runs."""
    out = folder / f"tiny{n_samples}"
    if (out / ".complete").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    template = bytearray(tarfile_header_template())
    per_shard = -(-n_samples // n_shards)
    for s in range(n_shards):
        with open(out / f"tiny-{s:06d}.tar", "wb") as f:
            for i in range(s * per_shard, min(n_samples, (s + 1) * per_shard)):
                c = i % n_classes
                for name, data in ((f"n{c:05d}/{i:08d}.jpg", b"x"), (f"n{c:05d}/{i:08d}.cls", str(c).encode())):
                    f.write(_header(template, name, len(data)))
                    f.write(data.ljust(512, b"\0"))
            f.write(b"\0" * 1024)
    (out / ".complete").touch()
    return out


def tarfile_header_template() -> bytes:
    import tarfile

    info = tarfile.TarInfo("x")
    info.mtime, info.mode = 0, 0o644
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _header(template: bytearray, name: str, size: int) -> bytes:
    block = bytearray(template)
    block[0:100] = name.encode().ljust(100, b"\0")
    block[124:136] = b"%011o\0" % size
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def index_timings(folder: Path, n_samples: int) -> None:
    """`index_shards` of n_samples tiny samples: the first start with an empty index cache (its scan spread over
    processes as the CPUs allow), the cached start, and the first start in one process (FASTDINO_INDEX_PROCESSES=1);
    then what starting and ending those processes costs alone."""
    tiny = ready_tiny_shards(folder, n_samples)
    shards = sorted(str(p) for p in tiny.glob("*.tar"))
    processes = _scan_processes(shards, sum(os.path.getsize(p) for p in shards), index_processes())
    runs = ((f"first start (scan in {processes} process{'es' * (processes > 1)} + write cache)", None),
            ("cached start (read + check)", None), ("first start (scan in 1 process + write cache)", "1"))
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as serial_cache:
        for what, env in runs:
            os.environ["FASTDINO_INDEX_CACHE"] = serial_cache if env else cache  # a first start: an empty cache
            if env is not None:
                os.environ[INDEX_PROCESSES_ENV] = env
            start, cpu = time.perf_counter(), time.process_time()
            n = len(index_shards(tiny))
            print(f"| {what} | {n} samples | {time.perf_counter() - start:.2f} s | this process's CPU "
                  f"{time.process_time() - cpu:.2f} s |", flush=True)
        os.environ.pop(INDEX_PROCESSES_ENV, None)
        size = sum(p.stat().st_size for p in Path(cache).iterdir())
        print(f"cache file: {size / 1e6:.1f} MB")
    many = min(index_processes(), 16)
    print(f"| start of {many} scan processes, each scanning an empty shard, and their end | "
          f"{scan_processes_start(many):.2f} s |")


def ready_tiny_shards(folder: Path, n_samples: int) -> Path:
    """`make_tiny_shards`, their mtimes set a minute back (shards changed within 2 s of indexing are never cached)."""
    start = time.perf_counter()
    tiny = make_tiny_shards(folder, n_samples)
    print(f"{n_samples} samples (2 tar members each) in 16 shards under {tiny} "
          f"({time.perf_counter() - start:.1f} s to generate or find)")
    past = time.time() - 60
    for p in [tiny, *tiny.glob("*.tar")]:
        os.utime(p, (past, past))
    return tiny


# One of the processes `at_once_timings` starts: argv ROOT SHARDS GATE LOCKED. It imports, says "ready", waits for
# GATE, indexes, then prints when it finished (time.time()) and how many scans it did.
_AT_ONCE = """
import errno, fcntl, json, os, sys, time
sys.path.insert(0, sys.argv[1])
from fastdino.data import shards
if sys.argv[4] == "0":  # before the build lock: every process scans, as on a file system without flock
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    fcntl.flock = no_flock
scans, scan = [], shards._scan
shards._scan = lambda *a: scans.append(1) or scan(*a)
print("ready", flush=True)
while not os.path.exists(sys.argv[3]):
    time.sleep(0.002)
n = len(shards.index_shards(sys.argv[2]))
print(json.dumps({"done": time.time(), "n": n, "scans": len(scans)}), flush=True)
"""


def at_once_timings(folder: Path, n_samples: int, processes: int) -> None:
    """`processes` processes indexing the same tiny shards at once with an empty index cache, as a node's ranks on
    a first start: seconds from their common start until the last has its index, before and after the build lock."""
    tiny = ready_tiny_shards(folder, n_samples)
    root = str(Path(__file__).resolve().parents[1])
    for what, locked in (("before: every process scans (flock failing with ENOLCK)", "0"),
                         ("after: one scans, the others wait and read its cache", "1")):
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "FASTDINO_INDEX_CACHE": os.path.join(tmp, "cache"),
                   "LOCAL_WORLD_SIZE": str(processes)}
            env.pop(INDEX_PROCESSES_ENV, None)
            gate = Path(tmp) / "go"
            procs = [subprocess.Popen([sys.executable, "-c", _AT_ONCE, root, str(tiny), str(gate), locked],
                                      stdout=subprocess.PIPE, env=env, text=True) for _ in range(processes)]
            for proc in procs:
                if proc.stdout.readline().strip() != "ready":
                    raise SystemExit(f"an indexing process failed to start (exit code {proc.wait()})")
            start = time.time()
            gate.touch()
            found = [json.loads(proc.stdout.readline()) for proc in procs]
            for proc in procs:
                proc.wait()
        print(f"| {processes} processes at once, {what} | {found[0]['n']} samples each | "
              f"{max(f['done'] for f in found) - start:.2f} s until all have the index | "
              f"{sum(f['scans'] for f in found)} scan(s) |", flush=True)


def scan_processes_start(processes: int) -> float:
    """Seconds `shards._scan_elsewhere` takes over `processes` empty shards: the processes' start (a fresh
    interpreter importing fastdino.data.tarscan), one request each, and their end."""
    with tempfile.TemporaryDirectory() as tmp:
        empty = [os.path.join(tmp, f"{i}.tar") for i in range(processes)]
        for path in empty:
            Path(path).write_bytes(b"\0" * 1024)
        start = time.perf_counter()
        assert all(found == ([], []) for found in _scan_elsewhere(empty, None, processes))
        return time.perf_counter() - start


def read_timings(sources: dict[str, ImageFileDataset], repeats: int) -> None:
    """The one step where a folder and shards differ: bytes of every image (`ImageIndex.read`) and their decode
    (`decode_rgb(ImageIndex.open(j))`) in this process, sources alternating, best of `repeats`."""
    best: dict[tuple[str, str], float] = {}
    for r in range(max(repeats, 1)):
        for label in (list(sources) if r % 2 == 0 else list(sources)[::-1]):
            index = sources[label].index
            for what, work in (("read", index.read), ("read + decode", lambda j, i=index: decode_rgb(i.open(j)))):
                start = time.perf_counter()
                for j in range(len(index)):
                    work(j)
                per_image = (time.perf_counter() - start) / len(index)
                best[label, what] = min(best.get((label, what), float("inf")), per_image)
    print("| step, 1 process | source | us/img | x folder (speed) |")
    print("|---|---|---|---|")
    for (label, what), seconds in best.items():
        print(f"| {what} | {label} | {seconds * 1e6:.1f} | {best['folder', what] / seconds:.2f} |")


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
    parser.add_argument("--shards", type=int, default=0, help="also time the JPEGs as this many tar shards")
    parser.add_argument("--repeats", type=int, default=1, help="timings per source and backend (best kept)")
    parser.add_argument("--control", action="store_true",
                        help="with --shards: also time the folder against itself, the noise of the x folder ratio")
    parser.add_argument("--index-members", type=int, default=0, help="time the shard index of this many samples")
    parser.add_argument("--index-processes-at-once", type=int, default=0,
                        help="with --index-members: time this many processes' first start at once instead")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.index_members and args.index_processes_at_once > 0:
        at_once_timings(Path(args.folder), args.index_members, args.index_processes_at_once)
    elif args.index_members:
        index_timings(Path(args.folder), args.index_members)
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
    sources = {"folder": ImageFileDataset(index, multicrop_transform(), seed=0)}
    if args.shards:
        shard_index = index_shards(make_shards(folder, args.shards))
        if len(shard_index) != len(index) or any(shard_index.read(j) != index.read(j) for j in range(len(index))):
            raise SystemExit(f"the shards under {folder} no longer hold the folder's images: delete them to rewrite")
        sources[f"{args.shards} shards"] = ImageFileDataset(shard_index, multicrop_transform(), seed=0)
        if args.control:
            sources["folder again"] = ImageFileDataset(index, multicrop_transform(), seed=0)
    if len(sources) > 1:
        read_timings(sources, args.repeats)
    if not args.backends:
        return 0
    print(f"{len(index)} JPEGs {args.width}x{args.height} q90, 2x224 + 10x96, batch {args.batch}, "
          f"{args.workers} workers, {args.steps} timed batches, best of {args.repeats}, torch threads "
          f"{torch.get_num_threads()}")
    print("| backend | source | device | img/s | x official | x folder | x folder per repeat | GPU ms/img |")
    print("|---|---|---|---|---|---|---|---|")
    official = None
    for name in args.backends.split(","):
        if name == "official":
            batches = build_loader(_OfficialDataset(index.paths), args.batch, args.workers, seed=0, epoch=0,
                                   collate_fn=collate_views)
            official = time_batches(batches, args.steps, args.warmup, args.batch, device)
            print(f"| official | folder | cpu | {official:.1f} | 1.00 | - | - | - |", flush=True)
            continue
        if name == "dali" and not dali_available():
            print('| dali | - | - | not measured yet (DALI is not installed: pip install -e ".[dali]") | | | | |')
            continue
        if name not in ("cpu", "torch_gpu", "dali"):
            parser.error(f"unknown backend {name!r}")
        rates: dict[str, list[float]] = {label: [] for label in sources}
        gpu_ms: dict[str, str] = {}
        for r in range(args.repeats):
            for label in (list(sources) if r % 2 == 0 else list(sources)[::-1]):
                dataset = sources[label]
                if name == "cpu":
                    batches, where = CpuBatches(dataset, args.batch, args.workers, seed=0).epoch(0), "cpu"
                else:
                    if name == "dali":
                        from fastdino.data.dali import DaliBatches as GpuBatches
                    else:
                        from fastdino.data.gpu_augment import TorchGpuBatches as GpuBatches

                    source = GpuBatches(dataset, args.batch, args.workers, seed=0, device=device)
                    batches, where = source.epoch(0), device.type
                    gpu_ms[label] = (gpu_ms_per_image(source, args.steps, args.batch) if device.type == "cuda"
                                     else "not measured yet (no GPU)")
                rates[label].append(time_batches(batches, args.steps, args.warmup, args.batch, device))
        for label, runs in rates.items():
            rate = max(runs)
            ratio = f"{rate / official:.2f}" if official else "-"
            vs_folder = f"{rate / max(rates['folder']):.2f}"
            # Repeat r's two timings ran back to back, so their ratio is the one least moved by the machine's load.
            paired = sorted(r / f for r, f in zip(runs, rates["folder"], strict=True))
            per_repeat = "-" if label == "folder" else (
                f"median {paired[len(paired) // 2]:.2f} ({', '.join(f'{x:.2f}' for x in paired)})")
            print(f"| {name} | {label} | {where} | {rate:.1f} | {ratio} | {vs_folder} | {per_repeat} | "
                  f"{gpu_ms.get(label, '-')} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
