"""What `fastdino shards`' image check costs (`fastdino.data.shards.image_problem`, issue 24's trial): per image,
the check, a full decode as training does (`decode_rgb`, what a thorough check would cost) and the read of its
bytes, then `write_shards` of the folder end to end (reads from the page cache: a disk or a network file system
only makes the read, not the check, slower). The best of --repeats passes over the images, per image.

    PYTHONPATH=. python perf/bench_shards_check.py [--images 200] [--folder DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import make_jpegs  # noqa: E402

from fastdino.data.files import NamedBytes, decode_rgb  # noqa: E402
from fastdino.data.shards import image_problem, write_shards  # noqa: E402


def _best_us(fn, items, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - start)
    return 1e6 * best / len(items)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "fastdino_bench_jpegs")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    root = make_jpegs(args.folder, args.images, 500, 375) / "train"
    paths = sorted(root.glob("*.jpg"))[: args.images]
    data = [p.read_bytes() for p in paths]
    assert all(image_problem(d, str(p)) is None for d, p in zip(data, paths, strict=True))
    print(f"{len(paths)} JPEGs 500x375 q90, {sum(map(len, data)) / len(data) / 1e3:.1f} kB each")
    print(f"read bytes    {_best_us(lambda p: p.read_bytes(), paths, args.repeats):8.1f} us/image (page cache)")
    print(f"check         {_best_us(lambda d: image_problem(d, 'x'), data, args.repeats):8.1f} us/image")
    print(f"full decode   {_best_us(lambda d: decode_rgb(NamedBytes(d, 'x')), data, args.repeats):8.1f} us/image")
    best = float("inf")
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            write_shards(root, Path(out) / "shards", shard_size=10**8, progress=False)
            best = min(best, time.perf_counter() - start)
    print(f"write_shards  {1e6 * best / len(paths):8.1f} us/image (with the check)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
