"""A process indexing a folder or shard set, for the tests of one build among processes starting at once.

    python tests/index_build_child.py PATH OUT BUILDS [HOLD]

Indexes PATH (`shards.index_images`: a folder or a shard set) with the cache `FASTDINO_INDEX_CACHE` names and
writes what it found to OUT as JSON (image ids, labels, classes, a digest of every image's bytes). Each scan it
does (the folder walk or the tar scan, not a cache read) appends its pid to BUILDS; with HOLD the scan then
creates HOLD.building and waits until HOLD exists, so that the test can start a second process, or kill this
one, mid-build. Logs at INFO on stderr (the "waiting for another process" line is what the tests wait for).
`Child`, `builds` and `wait_for` are the tests' side.
"""

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

    def __init__(self, path: Path, tmp: Path, name: str, hold: Path | None = None) -> None:
        self.out, self.log = tmp / f"{name}.json", tmp / f"{name}.log"
        args = [sys.executable, str(Path(__file__)), str(path), str(self.out), str(tmp / "builds")]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([*args, *([str(hold)] if hold else [])], cwd=ROOT, stderr=log,
                                         env={**os.environ, "PYTHONPATH": str(ROOT)})

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
        time.sleep(0.05)


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
    path, out, builds = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    hold = Path(sys.argv[4]) if len(sys.argv) > 4 else None
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    files._scan_folder = _hooked(files._scan_folder, builds, hold)
    sh._scan = _hooked(sh._scan, builds, hold)
    index = sh.index_images(path)
    digest = hashlib.sha256()
    for j in range(len(index)):
        digest.update(index.read(j))
    out.write_text(json.dumps({"ids": list(index.image_ids(path)), "labels": list(map(int, index.labels)),
                               "classes": list(index.classes), "bytes": digest.hexdigest()}))


if __name__ == "__main__":
    main()
