"""A process indexing a folder or shard set, for the tests of one build among processes starting at once.

    python tests/index_build_child.py PATH OUT BUILDS [--hold FILE] [--after FILE]

Indexes PATH (`shards.index_images`: a folder or a shard set) with the cache `FASTDINO_INDEX_CACHE` names and
writes what it found to OUT as JSON (image ids, labels, classes, a digest of every image's bytes). Each scan it
does (the folder walk or the tar scan, not a cache read) appends its pid to BUILDS. With --hold the scan then
creates FILE.building and waits until FILE exists, so that the test can let a second process wait for it, or kill
this one, mid-build; with --after the index starts only once FILE exists (both processes import torch side by side
first). Logs at INFO on stderr (the "waiting for another process" line is what the tests wait for).
`Child`, `builds`, `wait_for` and `built_once` are the tests' side.
"""

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from fastdino.data import files
from fastdino.data import shards as sh

ROOT = Path(__file__).resolve().parents[1]
WAITING = "waiting for another process's index build"


class Child:
    """One indexing process (this script), started now: its Popen, JSON result file and stderr log file."""

    def __init__(self, path: Path, tmp: Path, name: str, *options: str | Path) -> None:
        self.out, self.log = tmp / f"{name}.json", tmp / f"{name}.log"
        args = [sys.executable, str(Path(__file__)), str(path), str(self.out), str(tmp / "builds"), *map(str, options)]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(args, cwd=ROOT, stderr=log, env={**os.environ, "PYTHONPATH": str(ROOT)})

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def result(self) -> dict:
        assert self.proc.wait(timeout=60) == 0, self.text()
        return json.loads(self.out.read_text())


def builds(tmp: Path) -> list[int]:
    """The pids of the scans done so far, in order."""
    file = tmp / "builds"
    return [int(line) for line in file.read_text().split()] if file.exists() else []


def wait_for(done, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def one_builds_one_waits(path: Path, tmp: Path, hold: Path) -> tuple[Child, Child]:
    """A builder held mid-build (until `hold` exists) and a second process started beside it, once it waits for
    the builder's lock (both import torch side by side)."""
    builder = Child(path, tmp, "builder", "--hold", hold)
    waiter = Child(path, tmp, "waiter", "--after", f"{hold}.building")
    wait_for(lambda: WAITING in waiter.text() or waiter.proc.poll() is not None or builder.proc.poll() is not None,
             "the second process to wait for the first's build")
    return builder, waiter


def built_once(path: Path, tmp: Path) -> dict:
    """Two processes index `path` at once: one builds (it alone scans), the other waits and reads its cache; both
    find the same index. Returns what they found (as `main` writes it)."""
    hold = tmp / "go"
    builder, waiter = one_builds_one_waits(path, tmp, hold)
    hold.touch()
    built, read = builder.result(), waiter.result()
    assert builds(tmp) == [builder.proc.pid]  # one scan: the waiter read the builder's cache
    assert "built by another process" in waiter.text() and WAITING not in builder.text()
    assert built == read
    return built


def _hooked(scan, builds: Path, hold: Path | None):
    def hooked(*args, **kwargs):
        with open(builds, "a") as f:
            f.write(f"{os.getpid()}\n")
        if hold is not None:
            Path(f"{hold}.building").touch()
            deadline = time.monotonic() + 60
            while not hold.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        return scan(*args, **kwargs)

    return hooked


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("out", type=Path)
    parser.add_argument("builds", type=Path)
    parser.add_argument("--hold", type=Path)
    parser.add_argument("--after", type=Path)
    args = parser.parse_args()
    path = args.path
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    files._scan_folder = _hooked(files._scan_folder, args.builds, args.hold)
    sh._scan = _hooked(sh._scan, args.builds, args.hold)
    if args.after is not None:
        wait_for(args.after.exists, str(args.after))
    index = sh.index_images(path)
    digest = hashlib.sha256()
    for j in range(len(index)):
        digest.update(index.read(j))
    args.out.write_text(json.dumps({"ids": list(index.image_ids(path)), "labels": list(map(int, index.labels)),
                               "classes": list(index.classes), "bytes": digest.hexdigest()}))


if __name__ == "__main__":
    main()
