"""Time the image index of a large folder: a plain walk, the first build with the index cache, a cached start.

    python -m perf.bench_index [--folder /tmp/fastdino_index_tree] [--files 1000000] [--per-folder 1000]

Generates (once, kept under --folder) an ImageNet-shaped tree of empty `.JPEG` files (`--per-folder` files in
each of files / per-folder class folders; empty files are enough: indexing never opens a file), then times
`index_image_folder` on it three ways: with the cache off (`FASTDINO_INDEX_CACHE=off`), with an empty cache
folder (walk + write), and again (read + check every folder's mtime). The OS's own file-system cache is warm
for all three (the tree was just written or walked): a cold first walk on a network file system is slower.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from fastdino.data import files


def make_tree(folder: Path, n_files: int, per_folder: int) -> Path:
    """`n_files` empty files in class folders of `per_folder`, under folder/train (kept between runs)."""
    root = folder / "train"
    done = folder / f".complete-{n_files}-{per_folder}"
    if done.exists():
        return root
    for c in range((n_files + per_folder - 1) // per_folder):
        d = root / f"n{c:08d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(min(per_folder, n_files - c * per_folder)):
            os.close(os.open(d / f"n{c:08d}_{i}.JPEG", os.O_CREAT | os.O_WRONLY, 0o644))
    done.touch()
    return root


def timed_index(root: Path, cache: str) -> tuple[float, int]:
    os.environ[files.INDEX_CACHE_ENV] = cache
    start = time.perf_counter()
    n = len(files.index_image_folder(root))
    return time.perf_counter() - start, n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="/tmp/fastdino_index_tree")
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--per-folder", type=int, default=1000)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    root = make_tree(Path(args.folder), args.files, args.per_folder)
    print(f"tree: {args.files} empty files in folders of {args.per_folder} under {root} "
          f"({time.perf_counter() - start:.1f} s to generate or find)")
    newest = max(os.stat(d).st_mtime for d in [root, *root.iterdir()])
    time.sleep(max(0.0, files._RACY_NS / 1e9 + 0.1 - (time.time() - newest)))  # a folder changed just now is not cached
    with tempfile.TemporaryDirectory() as cache:
        for what, where in (("walk, cache off", "off"), ("first build (walk + write cache)", cache),
                            ("cached start (read + check mtimes)", cache)):
            seconds, n = timed_index(root, where)
            print(f"| {what} | {n} images | {seconds:.2f} s |", flush=True)
        size = sum(p.stat().st_size for p in Path(cache).iterdir())
        print(f"cache file: {size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
