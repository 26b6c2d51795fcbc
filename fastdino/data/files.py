"""Image folders on disk: the index, a dataset that decodes and augments deterministically, the collate.

Each item is augmented under its own seed drawn from (seed, epoch, index), so a run's views do not depend
on the worker count, on which worker got the item, or on where a resumed run restarted. Images are decoded
as a viewer shows them (`decode_rgb`: EXIF orientation applied, 16-bit and float samples scaled, not
clipped). An unreadable file never stops a run: training substitutes the next index so batches keep
their size, evaluation skips it so no image is scored under another's label. Either way its path travels
back with the batch, so the main process keeps one record per run (`UnreadableImages`) whatever the
number of worker processes and however often they are rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from fastdino.errors import UserError

# Formats Pillow can open that are not still images to train on: PostScript needs Ghostscript to render,
# MPEG and FLI are video / animation, BUFR, GRIB and HDF5 are data containers Pillow only stubs, WMF/EMF are
# vector drawings (decoded on Windows only), IPTC is news metadata. Save-only formats (PDF, PALM) have no
# decoder and drop out by themselves.
_NOT_STILL_IMAGES = frozenset({"EPS", "MPEG", "FLI", "BUFR", "GRIB", "HDF5", "WMF", "IPTC"})


def _still_image_extensions() -> frozenset[str]:
    extensions = Image.registered_extensions()  # first: it loads every plugin, which fills Image.OPEN
    readable = set(Image.OPEN) | {"MPO"}  # MPO (multi-picture JPEG) is opened by the JPEG plugin
    return frozenset(ext for ext, fmt in extensions.items() if fmt in readable and fmt not in _NOT_STILL_IMAGES)


IMAGE_EXTENSIONS = _still_image_extensions()
"""Lower-case suffixes indexed as images: every still-image format this Pillow decodes (JPEG, PNG, TIFF, WebP,
BMP, GIF, JPEG 2000, AVIF, PNM, FITS, ...). A multi-frame file (animated GIF, TIFF stack) is one image: its
first frame."""
FLAT_CLASS = "."  # the one class of a folder without class sub-folders
MAX_SUBSTITUTIONS = 32  # bad files in a row before an item gives up: more means a broken data set, not bad luck
ON_UNREADABLE = ("substitute", "skip")

# PIL raises OSError for unreadable/truncated files (UnidentifiedImageError is one), SyntaxError from some
# plugins for malformed headers, ValueError for bad modes, DecompressionBombError for absurd sizes.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

log = logging.getLogger("fastdino.data")


class DataError(UserError, ValueError):
    """The data on disk cannot be used (missing folder, no images, too many unreadable files)."""


class UnknownClassesError(DataError):
    """Images in classes the given class list (the training set's) lacks; `unknown` lists them, so a caller
    that knows where the given classes came from can say which set is at fault (`shards.index_in_classes_of`)."""

    def __init__(self, message: str, unknown: list[str]) -> None:
        super().__init__(message)
        self.unknown = unknown


class NamedBytes(io.BytesIO):
    """An image's bytes in memory that Pillow's errors name as the image (`shard:key`, or the file), not as
    `<_io.BytesIO object at 0x...>`: a warning's reason then reads the same in every process and backend."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.image_name = name

    def __repr__(self) -> str:
        return repr(self.image_name)


class MemberSource(Protocol):
    """Reads indexed images that are not files of their own: tar-shard members (`fastdino.data.shards`)."""

    def read(self, j: int) -> bytes:
        """Image j's bytes; raises OSError when they cannot be read whole (its shard vanished or shrank)."""
        ...

    def take(self, keep: Sequence[int]) -> MemberSource:
        """The source of the images `keep` (positions in this one), in that order."""
        ...

    def image_ids(self) -> Iterable[str]:
        """Each image's name within its data set: the relative path a `fastdino shards` key was made from."""
        ...

    def files(self) -> list[str]:
        """The files the images live in (each shard once)."""
        ...


@dataclass
class ImageIndex:
    """Images in a deterministic order, their integer labels, and the class names the labels index.

    `paths` name the images in warnings and bad-file records: file paths for a folder, `shard:key` for the
    members of a tar-shard set, whose bytes `members` reads (None: the paths are files). Everything above
    data/ reads images through `open` / `read`, so a folder and a shard set look the same to it.
    """

    paths: Sequence[str]
    labels: list[int]
    classes: list[str]
    members: MemberSource | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, j: int) -> bytes:
        """Image j's encoded bytes (file or shard member); raises OSError when unreadable."""
        if self.members is not None:
            return self.members.read(j)
        with open(self.paths[j], "rb") as f:
            return f.read()

    def open(self, j: int) -> str | NamedBytes:
        """What `decode_rgb` takes for image j: its path, or its shard member's bytes in memory."""
        return self.paths[j] if self.members is None else NamedBytes(self.members.read(j), self.paths[j])

    def subset(self, keep: Sequence[int]) -> ImageIndex:
        """The images `keep` (positions in this index), in that order, with the same classes."""
        members = None if self.members is None else self.members.take(keep)
        return ImageIndex([self.paths[i] for i in keep], [self.labels[i] for i in keep], list(self.classes), members)

    def files(self) -> Sequence[str]:
        """The files the images live in: each image's own file for a folder, each shard once for a shard set
        (what a run checks to tell data that vanished from data that cannot be decoded)."""
        return self.paths if self.members is None else self.members.files()

    def image_ids(self, root: str | Path) -> Iterable[str]:
        """Each image's name within the data set at `root`, which the run's image-set fingerprint hashes: a
        file's path relative to `root`; a shard member's relative path as `fastdino shards` recorded it in its
        key, so a folder and the shards made from it have one fingerprint."""
        if self.members is not None:
            return self.members.image_ids()
        return (os.path.relpath(path, root) for path in self.paths)


def _is_hidden(name: str) -> bool:
    # Skips `.ipynb_checkpoints`, `.git` and macOS `._x.jpg` resource forks (garbage with an image suffix).
    return name.startswith(".")


class _Walk:
    """Image files under a set of folders, following symlinks, each real file and folder visited once.

    `claimed` folders (the data root and every class folder, as real paths) are entered only as the start
    of their own walk, so a link from one class to another or back to the root neither loops nor moves
    images between classes. A real file reached by several paths keeps the first in sorted order.
    It also notes what the index cache checks: the mtime of every folder listed (read before listing it, so
    a later change moves it), the links that are not image files (to folders, dangling, to other files) with
    their targets, and whether every folder could be listed.
    """

    def __init__(self, claimed: Iterable[str]) -> None:
        self.claimed = set(claimed)
        self.walked: set[str] = set()
        self.files: set[str] = set()
        self.duplicates = 0
        self.listed: dict[str, int] = {}  # real folder path -> st_mtime_ns
        self.links: dict[str, tuple[str, bool]] = {}  # link as reached -> (its real path, whether a folder)
        self.complete = True

    def images(self, folder: Path, recursive: bool) -> list[str]:
        """Sorted image paths (as reached from `folder`, not resolved) in `folder` and, if `recursive`, below."""
        start = os.path.realpath(folder)
        if start in self.walked:
            return []
        found: list[tuple[str, str]] = []  # (path, real path)
        stack = [(str(folder), start)]
        while stack:
            path, real = stack.pop()
            self.walked.add(real)
            try:
                self.listed[real] = os.stat(path).st_mtime_ns
                entries = sorted(os.scandir(path), key=lambda e: e.name)
            except OSError as err:  # os.walk skipped these silently; say which folder is left out
                self.complete = False
                log.warning("cannot list folder %s (%s): its images are left out", path, err)
                continue
            for entry in entries:
                if _is_hidden(entry.name):
                    continue
                try:
                    entry.is_dir()  # a link loop (a -> b -> a) raises here: leave the entry out, say so
                except OSError as err:
                    log.warning("skipping %s (%s)", entry.path, err.strerror or err)
                    continue
                # Only a link costs a realpath call: below a resolved folder a plain entry is resolved already.
                entry_real = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real, entry.name)
                is_image = os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
                if entry.is_symlink() and (entry.is_dir() or not is_image):  # its target may appear or move
                    self.links[entry.path] = (entry_real, entry.is_dir())
                if entry.is_dir():
                    if recursive and entry_real not in self.walked and entry_real not in self.claimed:
                        self.walked.add(entry_real)
                        stack.append((entry.path, entry_real))
                elif is_image:
                    found.append((entry.path, entry_real))
        paths = []
        for path, real in sorted(found):
            if real in self.files:
                self.duplicates += 1
            else:
                self.files.add(real)
                paths.append(path)
        return paths


INDEX_CACHE_ENV = "FASTDINO_INDEX_CACHE"
"""Environment variable: the folder of the image-index cache, or `off` to index every time (docs/data.md,
"The index cache"). Unset: `$XDG_CACHE_HOME/fastdino/index`, else `~/.cache/fastdino/index`."""
_CACHE_MAGIC = b"fastdino image index v1\n"
_RACY_NS = 2_000_000_000  # a folder changed this close to the walk may change again within its mtime's granularity


@dataclass
class _FolderScan:
    """What a walk of a data folder found, before labels: what the index cache stores."""

    per_class: dict[str, list[str]]  # class folder name -> its image paths (classes without images left out)
    top_level: list[str]  # images directly in the root
    duplicates: int  # paths dropped because they lead to a file indexed already
    walk: _Walk | None = field(default=None, repr=False)  # None when read from the cache


def _scan_folder(root: Path) -> _FolderScan:
    root_mtime = os.stat(root).st_mtime_ns  # before listing the root: a later change moves it
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not _is_hidden(p.name))
    walk = _Walk(claimed=[os.path.realpath(p) for p in (root, *subdirs)])
    per_class = {d.name: walk.images(d, recursive=True) for d in subdirs}
    top_level = walk.images(root, recursive=False)
    walk.listed[os.path.realpath(root)] = root_mtime
    walk.links.update((str(d), (os.path.realpath(d), True)) for d in subdirs if d.is_symlink())
    return _FolderScan({name: paths for name, paths in per_class.items() if paths}, top_level, walk.duplicates, walk)


def index_cache_dir() -> Path | None:
    """The index cache's folder (`INDEX_CACHE_ENV`, else the XDG cache folder), None when it is turned off."""
    value = os.environ.get(INDEX_CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "off", "0", "false", "no") else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastdino" / "index"


def _cache_file(cache_dir: Path, root: Path) -> Path:
    # Keyed by the folder as given (the cached paths start with it) and where it really is.
    key = f"{root}\0{os.path.realpath(root)}".encode(sys.getfilesystemencoding(), "surrogateescape")
    return cache_dir / f"{hashlib.blake2b(key, digest_size=16).hexdigest()}.idx"


def _extensions_key() -> str:
    return ",".join(sorted(IMAGE_EXTENSIONS))  # another Pillow may index other suffixes


def _encode(text: str) -> bytes:
    return text.encode(sys.getfilesystemencoding(), "surrogateescape")


def _write_cache(file: Path, root: Path, scan: _FolderScan) -> None:
    """Store `scan` in `file` atomically: a header line (JSON) then the paths, relative to their folder, joined
    by NUL (the one byte no file name holds)."""
    groups, names = [], []
    for name, folder, paths in [*((n, root / n, p) for n, p in scan.per_class.items()), (None, root, scan.top_level)]:
        prefix = os.path.join(str(folder), "")
        if not all(p.startswith(prefix) for p in paths):
            prefix = ""
        groups.append([name, prefix, len(paths)])
        names += [p[len(prefix):] for p in paths]
    blob = _encode("\0".join(names))
    links = [[link, real, is_dir] for link, (real, is_dir) in sorted(scan.walk.links.items())]
    header = {"root": str(root), "real_root": os.path.realpath(root), "extensions": _extensions_key(),
              "folders": sorted(scan.walk.listed.items()), "links": links, "groups": groups,
              "duplicates": scan.duplicates, "digest": hashlib.blake2b(blob).hexdigest()}
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(_CACHE_MAGIC + _encode(json.dumps(header)) + b"\n" + blob)
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)


def _read_cache(file: Path, root: Path) -> tuple[_FolderScan | None, str]:
    """The cached scan of `root`, or None and why not (missing, unreadable, corrupt or out of date)."""
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        return None, "none yet"
    except OSError as err:
        return None, f"unreadable ({err})"
    try:
        if not data.startswith(_CACHE_MAGIC):
            raise ValueError("not a fastdino index file")
        header_end = data.index(b"\n", len(_CACHE_MAGIC))
        header = json.loads(data[len(_CACHE_MAGIC):header_end])
        blob = data[header_end + 1:]
        if hashlib.blake2b(blob).hexdigest() != header["digest"]:
            raise ValueError("checksum mismatch")
        if (header["root"], header["real_root"]) != (str(root), os.path.realpath(root)):
            raise ValueError("written for another folder")
        if header["extensions"] != _extensions_key():
            return None, "out of date (another set of image suffixes)"
        for folder, mtime in header["folders"]:
            try:
                if os.stat(folder).st_mtime_ns != mtime:
                    return None, f"out of date ({folder} changed)"
            except OSError:
                return None, f"out of date ({folder} is gone)"
        for link, real, is_dir in header["links"]:
            if (os.path.realpath(link), os.path.isdir(link)) != (real, is_dir):
                return None, f"out of date (link {link} moved)"
        names = blob.decode(sys.getfilesystemencoding(), "surrogateescape").split("\0") if blob else []
        if sum(count for _, _, count in header["groups"]) != len(names):
            raise ValueError("path count mismatch")
        per_class, top_level, start = {}, [], 0
        for name, prefix, count in header["groups"]:
            paths = [prefix + n for n in names[start:start + count]]
            start += count
            if name is None:
                top_level = paths
            else:
                per_class[name] = paths
        return _FolderScan(per_class, top_level, int(header["duplicates"])), "hit"
    except (ValueError, KeyError, TypeError, IndexError, UnicodeError) as err:  # JSONDecodeError is a ValueError
        return None, f"corrupt ({err})"


BUILD_LOCK_WAIT_S = 600.0
"""How long a process waits for another's index build before it indexes by itself: a holder that never lets go (a
suspended job sharing the cache folder, an NFSv3 lock of a crashed node) must not hang a run."""


@contextlib.contextmanager
def _build_lock(file: Path, what: str | Path) -> Iterator[bool]:
    """Let one process build the index cached in `file` while the others wait: an flock on `file`.lock beside it.

    Yields True in the process that takes the lock at once: it holds it while it builds and writes `file`, and is
    the only process scanning (its scan may use every CPU). Yields False, holding nothing, in a process that waited
    for another's build (it lets go as soon as it has the lock, so the waiters read the new cache side by side),
    gave up waiting after BUILD_LOCK_WAIT_S (a warning names the holder the lock file records: host and pid), or
    could not take the lock (a cache folder it cannot write, a file system without flock: some network mounts).
    The caller then reads the cache again and builds only when it is still missing (the builder was killed or could
    not cache its index), side by side with the other waiters, as every process did before this lock. No process
    group is needed (ranks before or after init_distributed, two runs on one data set, nodes sharing the cache
    folder). The kernel drops a flock when its holder ends, SIGKILL included: a killed builder leaves no lock held.
    """
    lock = file.with_name(file.name + ".lock")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # an unwritable cache folder: writing the cache fails too, and says so
        yield False
        return
    sole = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            sole = True
            with contextlib.suppress(OSError):  # who builds, for a waiter's messages
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.uname().nodename} pid {os.getpid()}".encode(), 0)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            log.info("%s: waiting for another process's index build (%s holds %s)", what, holder, lock)
            if not _wait_for_lock(fd, BUILD_LOCK_WAIT_S):
                log.warning("%s: %s has held the index build lock %s for %.0f s: indexing here without it (delete "
                            "the lock file if that process is gone)", what, holder, lock, BUILD_LOCK_WAIT_S)
        except OSError as err:
            log.info("cannot lock %s (%s): indexing %s without waiting for other processes", lock,
                     err.strerror or err, what)
        if not sole:
            os.close(fd)  # closing drops the lock
            fd = -1
        yield sole
    finally:
        if fd >= 0:
            os.close(fd)


def _wait_for_lock(fd: int, seconds: float) -> bool:
    """Poll for the exclusive flock on fd for up to `seconds`; False when still held then. An error (a lock lost on
    a network mount) counts as got: the caller reads or builds as if unlocked either way."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)
        except OSError:
            return True


def _scan_folder_cached(root: Path) -> _FolderScan:
    """`_scan_folder(root)`, read from the index cache while every listed folder keeps its mtime.

    A cache that is missing, corrupt (checksum, format) or out of date is rebuilt, never trusted. The cache is
    written only after a walk that listed every folder and saw none changed within `_RACY_NS` of its start
    (a change in the same mtime tick would go unseen); writing is atomic. Processes starting on one folder at once
    (a node's ranks) walk it once: one builds while the others wait, then read its cache (`_build_lock`).
    """
    cache_dir = index_cache_dir()
    if cache_dir is None:
        return _scan_folder(root)
    file = _cache_file(cache_dir, root)
    scan, why = _read_cache(file, root)
    if scan is not None:
        log.info("%s: index read from the cache %s", root, file)
        return scan
    with _build_lock(file, root) as sole:
        if not sole:
            scan, why = _read_cache(file, root)
            if scan is not None:
                log.info("%s: index read from the cache %s, built by another process", root, file)
                return scan
        if why.startswith("corrupt"):
            log.warning("index cache %s is %s: re-indexing %s", file, why, root)
        elif why != "none yet":
            log.info("index cache %s is %s: re-indexing %s", file, why, root)
        else:
            log.info("%s: indexing (nothing cached yet in %s)", root, cache_dir)
        started = time.time_ns()
        scan = _scan_folder(root)
        if scan.walk.complete and all(mtime < started - _RACY_NS for mtime in scan.walk.listed.values()):
            try:
                _write_cache(file, root, scan)
            except OSError as err:
                log.warning("cannot write the index cache %s (%s): set %s to a writable folder, or to off",
                            file, err, INDEX_CACHE_ENV)
    return scan


def index_image_folder(root: str | Path, classes: Sequence[str] | None = None) -> ImageIndex:
    """Index `root`: each non-hidden sub-folder holding images is a class (sorted names, searched recursively).

    Without such sub-folders the images directly in `root` form the single class `FLAT_CLASS` (label 0).
    Pass the training index's `classes` when indexing a validation folder so both share one label space
    (a class missing from validation then keeps its label; a sub-folder not in `classes` is an error).
    Images are the files whose suffix is in `IMAGE_EXTENSIONS`. Symlinked files and folders are followed;
    each real file is indexed once (a second path to it is dropped, with a warning) and no folder is entered
    twice, so a link back to a parent does not loop. Raises DataError naming `root` when it is missing, not
    a folder, or holds no image.

    The walk is cached outside `root` (`index_cache_dir()`; `FASTDINO_INDEX_CACHE=off` turns it off), keyed by
    `root` and its real path, and reused while every folder it listed keeps its mtime and every link that is not
    an image file (to a folder, dangling, ...) its target: adding, removing or renaming a file or folder anywhere
    below invalidates it. Not seen: a change inside a file that keeps its name (the index holds paths only; the
    file is read when used), permissions changed by chmod, and an image-file link whose target moves because a
    link outside the folder changed (it only decides which of two paths to one file is kept). Processes indexing
    one folder at once (a node's ranks, two runs) walk it once: the first builds the cache, the others wait for it.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"image folder {root} is not a folder")
    scan = _scan_folder_cached(root)
    per_class, top_level = scan.per_class, scan.top_level
    if scan.duplicates:
        log.warning("%s: %d path(s) lead to files already indexed through another path; each file is indexed once",
                    root, scan.duplicates)
    if per_class and top_level:
        log.warning("%s: ignoring %d image(s) beside the class sub-folders", root, len(top_level))
    if not per_class:
        if not top_level:
            raise DataError(f"image folder {root} holds no images: put image files (.jpg, .png, .tif, ...: "
                            f"any still-image format Pillow reads) in it or in class sub-folders")
        per_class = {FLAT_CLASS: top_level}

    if classes is None:
        classes = sorted(per_class)
    unknown = sorted(set(per_class) - set(classes))
    if unknown:
        raise UnknownClassesError(f"image folder {root} has classes {unknown} that are not in the given classes",
                                  unknown)
    label_of = {name: label for label, name in enumerate(classes)}
    paths, labels = [], []
    for name in sorted(per_class, key=label_of.__getitem__):
        paths += per_class[name]
        labels += [label_of[name]] * len(per_class[name])
    return ImageIndex(paths=paths, labels=labels, classes=list(classes))


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 64-bit seed for one item of one epoch (nearby triples give unrelated streams)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0])


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator and `random` for one item, then give the caller its own states back.

    With num_workers=0 the dataset runs in the training process: its RNG (dropout, drop path) must not
    depend on data loading. Only the CPU default generator is touched: `torch.manual_seed` would also
    reseed CUDA generators.
    """
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)


def _scale_to_8_bits(img: Image.Image) -> Image.Image:
    """An "I;16*", "I" or "F" image as 8-bit greyscale "L", linearly by its range; never clipped.

    Integer samples within 0..65535 (16-bit PNG / TIFF, which Pillow opens as "I;16" or "I") map the full
    16-bit range as a viewer does: v -> round(v * 255 / 65535), so 32768 -> 128. Other integer images (signed
    16-bit, 32-bit) and float images ("F": float TIFF, FITS, PFM) map their own finite min..max to 0..255, as
    ImageJ displays them; NaN goes to 0, infinities to the ends; a constant image is black.
    """
    values = np.asarray(img, dtype=np.float32)  # (H, W)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return Image.new("L", img.size)
    low, high = float(finite.min()), float(finite.max())
    if img.mode != "F" and low >= 0 and high <= 65535:
        low, high = 0.0, 65535.0
    scaled = (np.nan_to_num(values, nan=low) - low) * (255.0 / (high - low) if high > low else 0.0)
    return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), "L")  # clip: infinities only


ALPHA_BACKGROUND = (255, 255, 255)
"""The colour transparent pixels are composited onto when an image is decoded (training and evaluation): white."""


def decode_rgb(path: str | BinaryIO) -> Image.Image:
    """Decode `path` (a file, or a binary file object) to an 8-bit "RGB" image, upright, as an image viewer shows it.

    - Fully decoded here (PIL decodes lazily, so only `load()` exposes a truncated file).
    - EXIF orientation (tag 0x0112, set by phone cameras) applied (`PIL.ImageOps.exif_transpose`), so crops
      are taken from the upright image.
    - 16-bit greyscale and float images scaled to 8 bits by `_scale_to_8_bits` (Pillow's own conversion
      clips every sample above 255 to white). 16-bit RGB(A) PNGs arrive from Pillow as 8-bit "RGB(A)"
      holding each sample's high byte (v // 256): linear over the full range, not clipped.
    - Transparency (an alpha channel, or a palette's or greyscale's transparent colour) composited onto white
      (`ALPHA_BACKGROUND`), as a viewer on a white page shows it: the colour hidden under alpha 0 never reaches
      the model, and two files that look the same decode the same. Palette and CMYK converted by Pillow.
    - A multi-frame file gives its first frame.

    Raises what Pillow raises for an unreadable file (OSError, SyntaxError, ValueError,
    DecompressionBombError); `ImageFileDataset` catches them.
    """
    with Image.open(path) as img:
        img.load()
        upright = ImageOps.exif_transpose(img)
    if upright.mode == "F" or upright.mode.startswith("I"):
        upright = _scale_to_8_bits(upright)
    if upright.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in upright.info:
        rgba = upright.convert("RGBA")
        upright = Image.alpha_composite(Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255)), rgba)
    return upright.convert("RGB")


class UnreadableImages:
    """The distinct unreadable files met in a run (or an evaluation); each is warned about when first met.

    Dataset items carry `(path, reason)` pairs back to the main process with their batch; `add` them here.
    Worker processes are rebuilt every epoch, so this record, not the dataset, is what remembers a file
    across epochs; `state()` goes into the checkpoint so it also survives a resume. Several training processes
    exchange only `news()` at each checkpoint (`merge`): `paths` given here (a checkpoint's, which holds every
    process's) are known to all of them, and so are those of the last merge.
    """

    def __init__(self, paths: Iterable[str] = ()) -> None:
        self.paths: set[str] = set(paths)
        self._news: set[str] = set()  # added here since the last merge: what the other processes may lack

    @classmethod
    def from_state(cls, state: list[str] | int) -> UnreadableImages:
        """Rebuild from `state()`. An int (checkpoints written before the paths were kept) counted
        substitutions, not files, and cannot name them: it starts an empty record, and the files are
        counted again when next met."""
        if isinstance(state, int):
            if state:
                log.info("the checkpoint counted %d substitutions of unreadable images without their paths; "
                         "unreadable files are counted again as they are met", state)
            return cls()
        return cls(state)

    def add(self, unreadable: Iterable[tuple[str, str]]) -> None:
        """Record `(path, reason)` pairs; warn (logger `fastdino.data`) for each path not seen before."""
        for path, reason in unreadable:
            if path not in self.paths:
                self.paths.add(path)
                self._news.add(path)
                log.warning("unreadable image %s (skipped): %s", path, reason)

    def news(self) -> list[str]:
        """The paths this process added since its last `merge` (or since it was built from a checkpoint), sorted:
        what it sends the others, instead of its whole record, so each save's exchange is as small as what is new."""
        return sorted(self._news)

    def merge(self, gathered: Iterable[Iterable[str] | None]) -> None:
        """Take every process's `news()` (an `all_gather_object` of it), without warning again: every process
        then holds the union of all records, and nothing in it is news any more."""
        for paths in gathered:
            self.paths.update(paths or ())
        self._news.clear()

    def state(self) -> list[str]:
        """The sorted paths: a list of str, loadable with `torch.load(weights_only=True)`."""
        return sorted(self.paths)

    def summary(self) -> str:
        """One line: how many files, and the first few paths."""
        shown = ", ".join(self.state()[:3]) + (", ..." if len(self) > 3 else "")
        return f"{len(self)} unreadable image file(s) were skipped: {shown}"

    def __len__(self) -> int:
        return len(self.paths)


class ImageFileDataset(Dataset):
    """Decodes indexed images (`decode_rgb`) and augments each one under `item_seed(seed, epoch, i)`.

    Items are `(views, label, unreadable)`: `views` is the transform's list of tensors (a single tensor
    becomes a list of one), `unreadable` a tuple of `(path, reason)` pairs for the files that failed to
    decode while filling the item. `on_unreadable` says what an unreadable file becomes:
    - "substitute" (training): the next readable index (i+1, i+2, ..., at most MAX_SUBSTITUTIONS, then
      DataError), with its label, so batches keep their size;
    - "skip" (evaluation): `views` is None and `collate_views` drops the item, so no image is scored under
      another's label.
    The dataset does not log: the main process records and warns once per file (`UnreadableImages`).
    """

    def __init__(
        self, index: ImageIndex, transform: Callable, seed: int = 0, on_unreadable: str = "substitute"
    ) -> None:
        if len(index) == 0:
            raise DataError("the image index is empty")
        if on_unreadable not in ON_UNREADABLE:
            raise ValueError(f"on_unreadable must be one of {ON_UNREADABLE}, got {on_unreadable!r}")
        self.index = index
        self.transform = transform
        self.seed = seed
        self.on_unreadable = on_unreadable
        self.epoch = 0
        self._bad: dict[str, str] = {}  # path -> reason, in this process: a known bad file is not decoded again

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's augmentations; call before building the epoch's loader (workers copy it)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def _decode(self, j: int) -> Image.Image | None:
        path = self.index.paths[j]
        if path not in self._bad:
            try:
                return decode_rgb(self.index.open(j))
            except DECODE_ERRORS as err:
                self._bad[path] = f"{type(err).__name__}: {err}"
        return None

    def _load(self, i: int) -> tuple[Image.Image | None, int, tuple[tuple[str, str], ...]]:
        """Image (None when skipped), label and the unreadable files met for slot `i`."""
        n = len(self.index)
        tries = 1 if self.on_unreadable == "skip" else min(n, MAX_SUBSTITUTIONS + 1)
        bad = []
        for k in range(tries):
            j = (i + k) % n
            img = self._decode(j)
            if img is not None:
                return img, self.index.labels[j], tuple(bad)
            bad.append((self.index.paths[j], self._bad[self.index.paths[j]]))
        if self.on_unreadable == "skip":
            return None, self.index.labels[i], tuple(bad)
        raise DataError(f"no readable image among {tries} files from {self.index.paths[i]}: check the data set")

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor] | None, int, tuple[tuple[str, str], ...]]:
        i = int(i)
        img, label, bad = self._load(i)
        if img is None:
            return None, label, bad
        # The slot's seed, not the substitute's: slots i and i+1 then draw different views of one image.
        with _seeded(item_seed(self.seed, self.epoch, i)):
            views = self.transform(img)
        if isinstance(views, torch.Tensor):
            views = [views]
        return views, label, bad


def collate_views(
    batch: Sequence[tuple[Sequence[torch.Tensor] | None, int, tuple[tuple[str, str], ...]]],
) -> tuple[list[torch.Tensor], torch.Tensor, list[tuple[str, str]]]:
    """Stack items crop by crop: views[j] is (B, 3, H_j, W_j), labels (B,) int64, plus the batch's unreadable
    `(path, reason)` pairs. Skipped items (views None) are dropped, so B may be smaller than the batch; when
    every item was skipped, views is [] and labels is empty."""
    kept = [item for item in batch if item[0] is not None]
    views = [torch.stack(crops) for crops in zip(*(item[0] for item in kept), strict=True)]
    labels = torch.tensor([item[1] for item in kept], dtype=torch.int64)
    return views, labels, [pair for item in batch for pair in item[2]]
