"""WebDataset tar shards as an image index: the same `ImageIndex` as a folder, read by seek, not streamed.

A shard set is a folder of `.tar` files, a file listing shard paths (one a line, relative to the list's
folder), one `.tar` file, or a brace pattern (`/data/train-{000000..001023}.tar`, `{a,b}` lists too). A
sample is the members sharing a key (WebDataset's rule: a member's path up to the first dot of its file
name): its image (a suffix `IMAGE_EXTENSIONS` holds) and, optionally, its class: `.cls` (an integer: an index
into the set's `classes.json` when there is one, else the label itself), `.txt` or `.json` (a class name).

The shards are scanned once into (shard, byte offset, size, class) per sample and cached as the folder index
is (`files.index_cache_dir()`), keyed by the shards' sizes and mtimes: a changed shard rebuilds it. A large
set's scan is spread over processes, one shard a task (`index_processes`, `tarscan._serve`), and processes
starting on one set at once scan it once: one builds the cache while the others wait (`files._build_lock`). Samples
are ordered by key, as the folder index orders the files `fastdino shards` (`write_shards`) made the keys
from, whatever order the shards hold them in; so a folder and its shards give the same index order, labels,
`image_ids` (the run's fingerprint) and bytes, and everything built on them (per-image seeds, sharding by
rank, resume) is unchanged. Each process reads members with `os.pread` on its own open files.

Not supported: compressed shards (`.tar.gz`, ...: no member can be reached without reading all before it;
refused in one line), streaming from object storage (use a mounted bucket), a shard that changes during a run.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fastdino.data.files import (
    _RACY_NS,
    DECODE_ERRORS,
    FLAT_CLASS,
    IMAGE_EXTENSIONS,
    INDEX_CACHE_ENV,
    DataError,
    ImageIndex,
    NamedBytes,
    UnknownClassesError,
    _build_lock,
    _extensions_key,
    decode_rgb,
    index_cache_dir,
    index_image_folder,
)
from fastdino.data.tarscan import (
    CLASSES_FILE,
    CompressedShard,
    _scan_tar,
    decode_key,
    encode_key,
)
from fastdino.errors import UserError
from fastdino.file_modes import fsync_path, umask

log = logging.getLogger("fastdino.data")

SHARD_SUFFIX = ".tar"
COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst")
MAX_OPEN_SHARDS = 64  # open shard files per process (LRU): ImageNet-scale sets have ~1,000 shards, ulimit -n is 1,024
INDEX_PROCESSES_ENV = "FASTDINO_INDEX_PROCESSES"
"""Environment variable: the most processes a first start's scan of a shard set uses (docs/data.md, "Tar shards");
1 scans in the calling process. Unset: the CPUs this process may run on (shared among the node's ranks when
they may all run on every CPU), at most `MAX_INDEX_PROCESSES`."""
MAX_INDEX_PROCESSES = 8  # the calling process merges, sorts and caches what they find, which more processes do
# not shorten (perf/RESULTS.md: 2.8 s of CPU for a million samples that take 12-14 s in one process)
PARALLEL_SCAN_BYTES = 2**26  # a smaller set is scanned in the calling process: 64 MiB of 1-KiB members (tar's
# smallest) take ~0.4 s on one core, of JPEGs a few ms; the processes start in ~0.1 s (perf/RESULTS.md)
_CACHE_MAGIC = b"fastdino shard index v1\n"
_BRACE = re.compile(r"\{([^{}]*)\}")
_ARRAYS = (("shard", np.int32), ("offset", np.int64), ("size", np.int64), ("cls", np.int64), ("name", np.int32))


# -- which shards ----------------------------------------------------------------------------------------------

def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar (zero-padded to the first bound's width);
    `{x,y}` lists; several braces multiply. Raises DataError for a malformed range."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
    if ".." in body:
        lo, _, hi = body.partition("..")
        if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
            raise DataError(f"shard pattern {pattern}: {{{body}}} is not a range of integers low..high")
        items = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [expanded for item in items for expanded in expand_braces(head + item + tail)]


def _refuse_compressed(path: str) -> None:
    if path.lower().endswith(COMPRESSED_SUFFIXES):
        raise DataError(f"shard {path} is compressed: fastdino reads shards by seeking to members, which a compressed "
                        "tar does not allow; decompress it to a .tar (e.g. gunzip) and index that")


def _listed_shards(folder: Path) -> list[str]:
    """The shards directly in `folder` (sorted), [] when it holds none (an image folder)."""
    names = sorted(e.name for e in os.scandir(folder) if not e.name.startswith(".") and e.is_file())
    for name in names:
        _refuse_compressed(str(folder / name))
    return [str(folder / name) for name in names if name.lower().endswith(SHARD_SUFFIX)]


def is_shard_set(path: str | Path) -> bool:
    """Whether `index_images` reads `path` as tar shards: a brace pattern, a file (shard list or one .tar), or a
    folder with .tar (or compressed tar) files at its top level."""
    text = str(path)
    if os.path.isdir(text):
        return any(not e.name.startswith(".") and e.is_file() and e.name.lower().endswith(
            (SHARD_SUFFIX, *COMPRESSED_SUFFIXES)) for e in os.scandir(text))
    return os.path.isfile(text) or (not os.path.exists(text) and _BRACE.search(text) is not None)


def resolve_shards(spec: str | Path) -> tuple[list[str], list[str], str]:
    """(shard paths in order, files whose mtime the index cache checks, where classes.json is looked for).

    Raises DataError naming the spec or the shard when a listed shard is missing, compressed, named twice, or
    none is found.
    """
    text = str(spec)
    watched: list[str] = []
    if os.path.isdir(text):
        shards = _listed_shards(Path(text))
        if any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(text)):
            raise DataError(f"{text} holds both .tar shards and sub-folders: put the shards in a folder of their own")
        watched.append(text)  # a shard added or removed changes the folder's mtime
    elif os.path.isfile(text) and not text.lower().endswith((SHARD_SUFFIX, *COMPRESSED_SUFFIXES)):
        base = os.path.dirname(text)
        try:
            with open(text, encoding="utf-8") as f:
                lines = [line.strip() for line in f]
        except UnicodeDecodeError:
            raise DataError(f"{text} is neither a shard list (text, one path a line) nor a .tar shard") from None
        shards = [line if os.path.isabs(line) else os.path.join(base, line)
                  for line in lines if line and not line.startswith("#")]
        if (odd := next((s for s in shards if not s.lower().endswith((SHARD_SUFFIX, *COMPRESSED_SUFFIXES))), None)):
            raise DataError(f"{text} is neither a shard list (one .tar path a line) nor a .tar shard: it lists "
                            f"{os.path.basename(odd)[:60]!r}")
        watched.append(text)
    else:
        shards = expand_braces(text)
    if not shards:
        raise DataError(f"shard set {text} lists no .tar shard")
    for shard in shards:
        _refuse_compressed(shard)
        if not os.path.isfile(shard):
            raise DataError(f"shard {shard} (of {text}) does not exist")
    seen: dict[str, str] = {}
    for shard in shards:  # a shard named twice would count each of its images twice
        if (first := seen.setdefault(os.path.realpath(shard), shard)) is not shard:
            raise DataError(f"shard set {text} names one shard twice ({first} and {shard}): list each shard once")
    classes_dir = text if os.path.isdir(text) else os.path.dirname(shards[0])
    return shards, watched, os.path.join(classes_dir, CLASSES_FILE)


# -- scanning ------------------------------------------------------------------------------------------------

@dataclass
class _ShardScan:
    """The samples of a shard set in index order, before labels: what the index cache stores."""

    shards: list[str]
    keys: list[str]  # WebDataset keys as the shards hold them
    arrays: dict[str, np.ndarray]  # per sample: shard (int32), offset, size (int64), cls (int64, -1: none),
    # name (int32 into `names`, -1: none)
    names: list[str]  # class names (.txt / .json, or classes.json for .cls)
    classes_json: list[str] | None
    problems: list[str] = field(default_factory=list)  # one line per sample left out, naming shard:key


def _read_classes_json(file: str) -> list[str] | None:
    if not os.path.isfile(file):
        return None
    try:
        classes = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{file} is not a JSON list of class names ({err})") from None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{file} is not a JSON list of class names")
    return classes


def index_processes(every_rank_scans: bool = False) -> int:
    """How many processes a first start's scan may use: `INDEX_PROCESSES_ENV`, else the CPUs this process may run
    on (`os.sched_getaffinity`), capped at `MAX_INDEX_PROCESSES`. With `every_rank_scans` (the index cache is off,
    or its lock could not be taken, so each rank a launcher started on this node scans at once) the CPUs are
    divided by those ranks (LOCAL_WORLD_SIZE: a job's CPU limit is often shared by its ranks, so they divide it
    even when each sees fewer CPUs than the node has); otherwise one process scans for all (`files._build_lock`).
    Raises UserError naming the variable for a value that is not a positive integer."""
    value = os.environ.get(INDEX_PROCESSES_ENV, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise UserError(f"{INDEX_PROCESSES_ENV}={value!r} is not a positive number of processes (1: scan shards "
                            "in the calling process; unset: as many as the CPUs allow, at most "
                            f"{MAX_INDEX_PROCESSES})")
        return int(value)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ranks = os.environ.get("LOCAL_WORLD_SIZE", "1")
    if every_rank_scans and ranks.isdigit() and int(ranks) > 1:
        cores //= int(ranks)
    return max(1, min(cores, MAX_INDEX_PROCESSES))


def _scan_processes(shards: list[str], total_bytes: int, limit: int) -> int:
    """Processes for scanning `shards`: 1 (this one) for one shard or a set under `PARALLEL_SCAN_BYTES`, else
    `limit`, at most one a shard."""
    if len(shards) < 2 or total_bytes < PARALLEL_SCAN_BYTES:
        return 1
    return min(limit, len(shards))


def _scan_tars(shards: list[str], classes_json: list[str] | None,
               processes: int) -> Iterator[tuple[list[tuple], list[str]]]:
    """`tarscan._scan_tar` of each shard, in the shards' order: in this process, or in `processes` others
    (`_scan_elsewhere`). Raises DataError for a compressed shard, with the message of a scan in this process."""
    if processes > 1 and not getattr(sys, "frozen", False) and sys.executable:  # else no Python to start
        yield from _scan_elsewhere(shards, classes_json, processes)
        return
    for sid, shard in enumerate(shards):
        try:
            yield _scan_tar(sid, shard, classes_json, IMAGE_EXTENSIONS)
        except CompressedShard as err:
            raise DataError(str(err)) from None


# Run as `python -I -S -c _SERVE ROOT`: isolated (no PYTHON* variables, no cwd, no user site) and without site, so
# nothing a site hook prints corrupts the replies on stdout and nothing shadows the standard library; tarscan needs
# the standard library only, and ROOT (where this fastdino is) goes last.
_SERVE = "import sys; sys.path.append(sys.argv[1]); from fastdino.data.tarscan import _serve; _serve()"


def _scan_elsewhere(shards: list[str], classes_json: list[str] | None,
                    processes: int) -> Iterator[tuple[list[tuple], list[str]]]:
    """`_scan_tar` of shard i in process i % `processes`, two shards asked ahead, the results yielded in the shards'
    order (the caller merges one while the processes scan the next). The processes are fresh interpreters
    (`tarscan._serve`), as multiprocessing's spawn starts, but importing tarscan alone: not torch, nor CUDA state
    nor the caller's main script (which spawn and forkserver run again, a hazard for a script without a main
    guard). Raises DataError for a compressed shard, RuntimeError when a process ends before it answers."""
    root = str(Path(__file__).resolve().parents[2])  # where this fastdino is imported from
    procs: list[subprocess.Popen] = []

    def ask(sid: int) -> None:
        if sid < len(shards):
            pickle.dump((sid, shards[sid]), procs[sid % processes].stdin, pickle.HIGHEST_PROTOCOL)
            procs[sid % processes].stdin.flush()

    try:
        try:
            for _ in range(processes):
                procs.append(subprocess.Popen([sys.executable, "-I", "-S", "-c", _SERVE, root], stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, env={**os.environ, INDEX_PROCESSES_ENV: "1"}))
        except OSError as err:  # sys.executable cannot be started here: the scan is only slower in this process
            log.warning("could not start shard-scanning processes (%s): scanning in this process", err)
            yield from _scan_tars(shards, classes_json, 1)
            return
        proc, doing = procs[0], "starting"
        try:
            for proc in procs:
                pickle.dump((classes_json, IMAGE_EXTENSIONS), proc.stdin, pickle.HIGHEST_PROTOCOL)
            for ahead in range(2 * processes):
                proc = procs[ahead % processes]
                ask(ahead)
            for sid, shard in enumerate(shards):
                proc, doing = procs[sid % processes], f"scanning {shard}"
                kind, value = pickle.load(proc.stdout)
                if kind == "compressed":
                    raise DataError(value)
                ask(sid + 2 * processes)
                yield value
        except (EOFError, OSError, pickle.UnpicklingError) as err:
            try:
                code = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = "none yet"
            raise RuntimeError(f"a shard-scanning process failed while {doing} ({type(err).__name__}, exit code "
                               f"{code}): its error is printed above") from None
    finally:
        for proc in procs:
            proc.kill()  # a process still running has nothing left to do, or its answer is no longer wanted
            proc.wait()
            with contextlib.suppress(OSError):  # unsent requests to a process that ended
                proc.stdin.close()
            proc.stdout.close()


def _scan(shards: list[str], classes_file: str, processes: int = 1) -> _ShardScan:
    """Every sample of `shards` in index order: each shard's own scan (`_scan_tars`, over `processes` processes),
    merged in the shards' order, so the result and its `problems`, in order, do not depend on `processes`."""
    classes_json = _read_classes_json(classes_file)
    problems: list[str] = []
    rows, first_shard = [], {}
    for sid, (found, lines) in enumerate(_scan_tars(shards, classes_json, processes)):
        problems += lines
        for row in found:
            if (key := row[1]) in first_shard:
                problems.append(f"{shards[sid]}:{key} repeats a key of {shards[first_shard[key]]}: left out")
                continue
            first_shard[key] = sid
            rows.append(row)
    rows.sort(key=lambda row: row[0])
    names = sorted({row[6] for row in rows if row[6] is not None})
    name_id = {name: i for i, name in enumerate(names)}
    arrays = {
        "shard": np.array([r[2] for r in rows], dtype=np.int32),
        "offset": np.array([r[3] for r in rows], dtype=np.int64),
        "size": np.array([r[4] for r in rows], dtype=np.int64),
        "cls": np.array([r[5] for r in rows], dtype=np.int64),
        "name": np.array([-1 if r[6] is None else name_id[r[6]] for r in rows], dtype=np.int32),
    }
    return _ShardScan(list(shards), [r[1] for r in rows], arrays, names, classes_json, problems)


# -- the index cache -----------------------------------------------------------------------------------------

def _encode(texts: Sequence[str]) -> bytes:
    return "\0".join(texts).encode("utf-8", "surrogateescape")


def _decode(blob: bytes) -> list[str]:
    return blob.decode("utf-8", "surrogateescape").split("\0") if blob else []


def _stamp(path: str) -> list | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _cache_file(cache_dir: Path, spec: str, shards: list[str]) -> Path:
    key = "\0".join(["shards", spec, *(os.path.realpath(s) for s in shards)]).encode("utf-8", "surrogateescape")
    return cache_dir / f"{hashlib.blake2b(key, digest_size=16).hexdigest()}.idx"


def _write_cache(file: Path, spec: str, scan: _ShardScan, stamps: dict[str, list | None]) -> None:
    parts = [_encode(scan.keys), _encode(scan.names)] + [scan.arrays[name].tobytes() for name, _ in _ARRAYS]
    payload = b"".join(parts)
    header = {"spec": spec, "shards": scan.shards, "stamps": sorted(stamps.items()), "extensions": _extensions_key(),
              "lengths": [len(p) for p in parts], "classes_json": scan.classes_json, "problems": scan.problems,
              "digest": hashlib.blake2b(payload).hexdigest()}
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(_CACHE_MAGIC + json.dumps(header).encode() + b"\n" + payload)
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)


def _read_cache(file: Path, spec: str, shards: list[str], stamps: dict[str, list | None]) -> _ShardScan | None:
    """The cached scan, or None when missing, corrupt or out of date (a shard's or a watched file's size or
    mtime changed, another Pillow's image suffixes)."""
    try:
        data = file.read_bytes()
    except OSError:
        return None
    try:
        if not data.startswith(_CACHE_MAGIC):
            raise ValueError("not a fastdino shard index")
        end = data.index(b"\n", len(_CACHE_MAGIC))
        header = json.loads(data[len(_CACHE_MAGIC):end])
        payload = memoryview(data)[end + 1:]
        if (header["spec"], header["shards"], header["extensions"]) != (spec, shards, _extensions_key()):
            return None
        if dict((k, v) for k, v in header["stamps"]) != stamps:
            log.info("index cache %s is out of date (a shard or its list changed): re-indexing %s", file, spec)
            return None
        if hashlib.blake2b(payload).hexdigest() != header["digest"]:
            raise ValueError("checksum mismatch")
        parts, start = [], 0
        for length in header["lengths"]:
            parts.append(payload[start:start + length])
            start += length
        arrays = {name: np.frombuffer(part, dtype=dtype) for (name, dtype), part in zip(_ARRAYS, parts[2:],
                                                                                           strict=True)}
        keys = _decode(bytes(parts[0]))
        if any(len(a) != len(keys) for a in arrays.values()):
            raise ValueError("sample count mismatch")
        return _ShardScan(shards, keys, arrays, _decode(bytes(parts[1])), header["classes_json"], header["problems"])
    except (ValueError, KeyError, TypeError, IndexError, UnicodeError) as err:
        log.warning("index cache %s is corrupt (%s): re-indexing %s", file, err, spec)
        return None


def _scan_cached(spec: str, shards: list[str], watched: list[str], classes_file: str) -> _ShardScan:
    """`_scan` of the set, read from the index cache while every shard and watched file keeps its size and mtime.
    Processes starting on one set at once (a node's ranks) scan it once: one builds the cache while the others wait
    for it (`files._build_lock`), so that one may use every CPU."""
    stamps = {path: _stamp(path) for path in [*shards, *watched, classes_file]}
    cache_dir = index_cache_dir()
    file = None if cache_dir is None else _cache_file(cache_dir, spec, shards)
    if file is None:
        return _scan_logged(spec, shards, classes_file, stamps, index_processes(every_rank_scans=True))
    if (scan := _read_cache(file, spec, shards, stamps)) is not None:
        log.info("%s: index read from the cache %s", spec, file)
        return scan
    with _build_lock(file, spec) as sole:
        if not sole and (scan := _read_cache(file, spec, shards, stamps)) is not None:
            log.info("%s: index read from the cache %s, built by another process", spec, file)
            return scan
        started = time.time_ns()
        scan = _scan_logged(spec, shards, classes_file, stamps, index_processes(every_rank_scans=not sole))
        if {path: _stamp(path) for path in stamps} != stamps:
            return scan  # changed while scanned: not cached
        if all(s is None or s[1] < started - _RACY_NS for s in stamps.values()):
            try:
                _write_cache(file, spec, scan, stamps)
            except OSError as err:
                log.warning("cannot write the index cache %s (%s): set %s to a writable folder, or to off",
                            file, err, INDEX_CACHE_ENV)
    return scan


def _scan_logged(spec: str, shards: list[str], classes_file: str, stamps: dict[str, list | None],
                 limit: int) -> _ShardScan:
    processes = _scan_processes(shards, sum(stamps[s][0] for s in shards if stamps[s] is not None), limit)
    log.info("%s: indexing %d shards (%d process%s)", spec, len(shards), processes, "" if processes == 1 else "es")
    return _scan(shards, classes_file, processes)


# -- reading members -----------------------------------------------------------------------------------------

class _MemberNames(Sequence):
    """`shard:key` of each sample, made when asked (a million Python strings cost seconds to build)."""

    def __init__(self, shards: list[str], shard: np.ndarray, keys: Sequence[str]) -> None:
        self.shards, self.shard, self.keys = shards, shard, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, j: int | slice) -> str | list[str]:
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(len(self)))]
        return f"{self.shards[self.shard[j]]}:{self.keys[j]}"

    def __iter__(self) -> Iterator[str]:
        return (f"{self.shards[s]}:{k}" for s, k in zip(self.shard.tolist(), self.keys, strict=True))


class ShardMembers:
    """Reads sample j's image member: `os.pread` of (offset, size) on its shard, opened once per process (at most
    `MAX_OPEN_SHARDS` at a time); a DataLoader worker opens its own files, never shares the parent's."""

    def __init__(self, shards: list[str], keys: Sequence[str], shard: np.ndarray, offset: np.ndarray,
                 size: np.ndarray) -> None:
        self.shards, self.keys, self.shard, self.offset, self.size = shards, keys, shard, offset, size
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()

    def names(self) -> _MemberNames:
        return _MemberNames(self.shards, self.shard, self.keys)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": OrderedDict(), "_pid": None}

    def _fd(self, s: int) -> int:
        if self._pid != os.getpid():  # a forked worker: the inherited descriptors stay the parent's
            self._fds, self._pid = OrderedDict(), os.getpid()
        fd = self._fds.get(s)
        if fd is None:
            fd = self._fds[s] = os.open(self.shards[s], os.O_RDONLY)
            if len(self._fds) > MAX_OPEN_SHARDS:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(s)
        return fd

    def read(self, j: int) -> bytes:
        s, offset, size = int(self.shard[j]), int(self.offset[j]), int(self.size[j])
        data = os.pread(self._fd(s), size, offset)
        if len(data) != size:
            raise OSError(f"shard {self.shards[s]} ends {len(data)} bytes into this {size}-byte member: it was "
                          "truncated after indexing")
        return data

    def take(self, keep: Sequence[int]) -> ShardMembers:
        idx = np.asarray(keep, dtype=np.int64)
        return ShardMembers(self.shards, [self.keys[i] for i in keep], self.shard[idx], self.offset[idx],
                            self.size[idx])

    def image_ids(self) -> Iterator[str]:
        return (decode_key(key) for key in self.keys)

    def files(self) -> list[str]:
        return [self.shards[s] for s in np.unique(self.shard).tolist()]

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._fds.values():
                os.close(fd)


# -- the index -----------------------------------------------------------------------------------------------

CLASS_FOLDER_SAMPLES = 1000
"""How many keys, evenly spread, `_check_class_folders` compares: a classes.json from another conversion mislabels
most samples, and the check runs at every start (a cached start of a million samples stays well under a second)."""


def _check_class_folders(scan: _ShardScan, spec: str, classes_file: str) -> None:
    """Refuse a classes.json from another conversion. `fastdino shards` keys each image by its path, class folder
    first (`red/000%2Ejpg`), and numbers its classes in its own classes.json: when every key looked at starts with
    one of the set's class names, a sample whose .cls names another class (a copy of the training set's
    classes.json over separately converted validation shards) would score images under the wrong class. Keys of
    other writers (no class folder in them) are not checked. Raises DataError naming a sample and the file."""
    picked = np.unique(np.linspace(0, len(scan.keys) - 1, min(len(scan.keys), CLASS_FOLDER_SAMPLES)).astype(int))
    folders = [decode_key(scan.keys[j]).split("/", 1)[0] if "/" in scan.keys[j] else None for j in picked]
    known = set(scan.classes_json or ())
    if not all(f in known for f in folders):
        return
    name = scan.arrays["name"]
    for j, folder in zip(picked.tolist(), folders, strict=True):
        if scan.names[name[j]] != folder:
            raise DataError(f"{scan.shards[scan.arrays['shard'][j]]}:{scan.keys[j]} lies in class folder {folder!r} "
                            f"but its .cls names {scan.names[name[j]]!r} in {classes_file}: that classes.json is not "
                            f"the one of the conversion that wrote {spec}; put that conversion's classes.json there")


def _labels(
    scan: _ShardScan, spec: str, classes: Sequence[str] | None, classes_file: str,
) -> tuple[list[int], list[str]]:
    cls, name = scan.arrays["cls"], scan.arrays["name"]
    named, numbered = name >= 0, cls >= 0
    if named.all():
        found = scan.classes_json if scan.classes_json is not None else scan.names
        classes = list(found if classes is None else classes)
        label_of = {c: i for i, c in enumerate(classes)}
        lut = np.array([label_of.get(n, -1) for n in scan.names], dtype=np.int64)
        labels = lut[name]
        if (labels < 0).any():
            unknown = sorted({scan.names[i] for i in np.unique(name[labels < 0]).tolist()})
            raise UnknownClassesError(f"shard set {spec} has classes {unknown} that are not in the given classes",
                                      unknown)
        if scan.classes_json is not None:
            _check_class_folders(scan, spec, classes_file)
        return labels.tolist(), classes
    if numbered.all():
        if classes is not None and list(classes) != [str(c) for c in range(len(classes))]:
            shown = f"{list(classes[:4])}" + (f" (and {len(classes) - 4} more)" if len(classes) > 4 else "")
            raise DataError(f"{classes_file} is missing, so the .cls integers of {spec} name no class and cannot be "
                            f"matched to the training classes {shown} by name: put there the classes.json of the "
                            "conversion that wrote these shards (fastdino shards writes one beside each split), or "
                            "a copy of the training set's if these integers index its classes")
        classes = list(classes) if classes is not None else [str(c) for c in range(int(cls.max()) + 1)]
        if int(cls.max()) >= len(classes):
            j = int(np.argmax(cls))
            raise DataError(f"{scan.shards[scan.arrays['shard'][j]]}:{scan.keys[j]} has .cls {int(cls[j])}, beyond the "
                            f"{len(classes)} classes it is indexed in ({classes_file} is missing: add it, naming "
                            "this set's classes in label order)")
        return cls.tolist(), classes
    if not (named | numbered).any():
        classes = [FLAT_CLASS] if classes is None else list(classes)
        if FLAT_CLASS not in classes:
            raise DataError(f"shard set {spec} has no class labels (no .cls, .txt or .json members) but the training "
                            f"images have classes: label these samples")
        return [classes.index(FLAT_CLASS)] * len(scan.keys), classes
    j = int(np.argmin(named | numbered))
    raise DataError(f"{scan.shards[scan.arrays['shard'][j]]}:{scan.keys[j]} has no class (.cls, .txt or .json "
                    f"member) while other samples of {spec} have one: label every sample or none")


def index_shards(spec: str | Path, classes: Sequence[str] | None = None) -> ImageIndex:
    """Index a shard set (see the module docstring) into an `ImageIndex` whose `members` read the images.

    Labels follow the set's classes (`classes.json` beside the shards, else the sorted class names, else the
    .cls integers; no class members at all: the one class `FLAT_CLASS`, as a folder without class folders).
    Pass the training index's `classes` when indexing validation shards (one label space): their labels are
    matched by class name, so shards whose only labels are .cls integers (no `classes.json`) are refused when
    those classes are names, not the bare integers of training shards like them (which match by integer), as
    integers from another conversion would silently score images under the wrong class. Samples left out
    at indexing (no image member, a bad class member, a truncated or unreadable shard, a repeated key) are
    warned about in one line each, naming `shard:key`, at every start. Raises DataError naming the spec or the
    shard for a missing or compressed shard, an empty set, classes outside `classes`, a set labelled in part, or
    .cls integers without `classes.json` for `classes` that are names.
    """
    spec = str(spec)
    index_processes()  # a bad value is refused at every start, not only at a first one
    shards, watched, classes_file = resolve_shards(spec)
    scan = _scan_cached(spec, shards, watched, classes_file)
    for line in scan.problems:
        log.warning("%s", line)
    if not scan.keys:
        raise DataError(f"shard set {spec} holds no images: each sample needs an image member (.jpg, .png, ...: "
                        "any still-image format Pillow reads)")
    labels, classes = _labels(scan, spec, classes, classes_file)
    members = ShardMembers(scan.shards, scan.keys, scan.arrays["shard"], scan.arrays["offset"], scan.arrays["size"])
    return ImageIndex(members.names(), labels, classes, members)


def index_images(path: str | Path, classes: Sequence[str] | None = None) -> ImageIndex:
    """A folder of images (`files.index_image_folder`) or a shard set (`index_shards`), as `is_shard_set` tells:
    the one entry point above data/, for which both look the same."""
    if is_shard_set(path):
        return index_shards(path, classes)
    return index_image_folder(path, classes)


def index_in_classes_of(path: str | Path, train: str | Path, train_index: ImageIndex) -> ImageIndex:
    """`index_images(path)` in the classes of the training set `train` (indexed as `train_index`): the
    validation images of k-NN, linear probes and fine-tuning, in one label space with their training images.

    Raises DataError as `index_images` does; for validation classes the training set lacks, the line names the
    set at fault: `train` when it is a shard set whose classes are only its bare .cls integers (its
    classes.json is missing), else `path`, with the training set's classes and where they came from."""
    try:
        return index_images(path, classes=train_index.classes)
    except UnknownClassesError as exc:
        unknown, classes = exc.unknown, train_index.classes
        shown = f"{classes[:8]}" if len(classes) <= 8 else f"{classes[:8]} (and {len(classes) - 8} more)"
        if is_shard_set(train):
            classes_file = resolve_shards(train)[2]
            if not os.path.isfile(classes_file) and classes == [str(c) for c in range(len(classes))]:
                raise DataError(f"{classes_file} is missing, so the training shards {train} name their classes by "
                                f"their bare .cls integers {shown}, among which the classes of {path} "
                                f"({unknown[:8]}) are not: write the class names in label order there (fastdino "
                                "shards does)") from None
            source = f"training shards {train} ({classes_file})"
        else:
            source = f"training images {train}"
        raise DataError(f"{path} has classes {unknown[:8]} that the {source} lack (they have {shown}): validation "
                        "classes must be training classes") from None


# -- writing shards ------------------------------------------------------------------------------------------

SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
              "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'1GB' -> 10**9 bytes ('500MB', '1GiB', '123'); raises ValueError for anything else."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size such as 1GB, 500MB or 1GiB")
    size = int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])
    if size < 1:
        raise ValueError(f"{text!r} is not a positive size")
    return size


@dataclass
class WrittenSplit:
    folder: Path
    images: int
    shards: int
    bytes: int
    unreadable: list[str]  # files that could not be read: kept as empty members (training skips them)
    corrupt: list[str] = field(default_factory=list)  # images that do not decode (`image_problem`): kept


PARTIAL = ".partial-"  # `write_shards` writes OUT into `.OUT.partial-XXXXXXXX` beside it, renamed to OUT when whole


JPEG_END = b"\xff\xd9"  # a JPEG's end-of-image marker (EOI)
JPEG_TAIL = 32  # bytes at a JPEG's end searched for it: an encoder may pad a few after it


def image_problem(data: bytes, name: str) -> str | None:
    """Why training would skip the image bytes `data` (`name` names it in the reason), or None: a cheap check for
    `write_shards`, which must stay I/O bound (perf/RESULTS.md). Cheap: an empty file; the header Pillow opens
    (a text file named .jpg, an unknown format); Pillow's `verify()` (a PNG's chunks and checksums); a JPEG's
    end-of-image marker in its last bytes (a file cut short lacks it). A file that fails one is decoded as
    training decodes it (`decode_rgb`), so the reason is training's own and a file training reads (a PNG
    missing its end chunk) is not named. Damage inside the compressed data of a file that ends well is not
    found: only a full decode of every image would find it, which training does anyway (and skips it)."""
    if not data:
        return "an empty file (0 bytes)"
    try:
        with Image.open(NamedBytes(data, name)) as img:
            if img.format in ("JPEG", "MPO"):  # verify() checks nothing in a JPEG
                whole = JPEG_END in data[-JPEG_TAIL:]
            else:
                img.verify()
                whole = True
        if whole:
            return None
    except DECODE_ERRORS:
        pass  # decoded below for training's own reason: Pillow may read what verify() refuses
    try:
        decode_rgb(NamedBytes(data, name))
    except DECODE_ERRORS as err:
        return f"{type(err).__name__}: {err}"
    return None


def _tar_bytes(size: int) -> int:
    return 512 + -(-size // 512) * 512  # header + data padded to whole blocks (a PAX header may add 1,024)


def _closed_size(filled: int) -> int:
    return -(-(filled + 1024) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE  # end blocks, padded to whole records


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: the same images give the same bytes
    tar.addfile(info, io.BytesIO(data))


def write_shards(image_folder: str | Path, out_dir: str | Path, shard_size: int = 10**9, seed: int = 0,
                 progress: bool = True) -> list[WrittenSplit]:
    """Write the images of a class-folder tree as WebDataset shards (tarfile, PAX): `out_dir/shard-000000.tar`, ...

    A folder with train/ (and val/) sub-folders gives out_dir/train/ (and out_dir/val/, in train's classes).
    Each image keeps its bytes, under the key `encode_key(its path relative to the split)`, with its class as
    `key.cls` (an index into the split's `classes.json`; neither for a folder without class folders). The order
    is one permutation seeded by `seed`, so each shard mixes classes; a shard is closed before it would pass
    `shard_size` bytes (at least one image each). Every image `index_image_folder` indexes is written, so the
    shards hold the folder's index, fingerprint and batches and a run moves between the two: one training would
    skip (empty, not an image, cut short: `image_problem`) is warned about in one line naming it and kept, listed
    in `WrittenSplit.corrupt`; a file that cannot be read (a dangling link, no permission) is warned about and
    kept as an empty member under its key, listed in `WrittenSplit.unreadable` (training skips both, on the
    folder as on the shards, warning once with the file or `shard:key`).

    Everything is written into `.OUT.partial-XXXXXXXX` beside out_dir, fsynced, and renamed to out_dir (an
    empty out_dir is replaced) only when complete: out_dir holds a whole set or none. An error or Ctrl-C
    removes the partial folder (and the folders made to hold it); one a killed conversion left is named in a
    warning. Raises DataError before
    writing when out_dir exists and is not empty, lies inside image_folder or cannot be created, or when
    image_folder is not a folder.
    """
    from tqdm import tqdm

    src, out = Path(image_folder), Path(out_dir)
    if not src.is_dir():
        raise DataError(f"image folder {src} does not exist or is not a folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} exists and is not an empty folder: shards are written to a new or empty folder only "
                        "(a conversion that stopped leaves none): name another, or remove it to convert again")
    if Path(os.path.realpath(out)).is_relative_to(os.path.realpath(src)):
        raise DataError(f"{out} is inside the image folder {src}: write the shards elsewhere")
    splits = [("", src)]
    if (src / "train").is_dir():
        splits = [("train", src / "train")] + ([("val", src / "val")] if (src / "val").is_dir() else [])
    if is_shard_set(splits[0][1]):
        raise DataError(f"{splits[0][1]} holds tar shards already: train on it as it is (data.path={src})")
    # indexed (names only, no image read) before anything is made: a refusal leaves nothing behind
    indexes = [index_image_folder(splits[0][1])]
    for _, folder in splits[1:]:
        try:
            indexes.append(index_image_folder(folder, classes=indexes[0].classes))
        except UnknownClassesError as err:
            raise DataError(f"{folder} has classes {err.unknown} that {splits[0][1]} lacks: k-NN scores validation "
                            "images by the training classes; add them to train/ or remove them from val/") from None
    target = Path(os.path.realpath(out))  # an empty out_dir reached through a link: the folder it names is replaced
    before = target.stat() if target.is_dir() else None
    if before is not None and (os.path.ismount(target) or before.st_dev != target.parent.stat().st_dev):
        raise DataError(f"{out} is a mount point: the shard set is built beside it and renamed onto it when complete, "
                        f"which Linux refuses there; name a new folder inside it, e.g. {out / 'shards'}")
    for left in sorted(target.parent.glob(f".{glob.escape(target.name)}{PARTIAL}*")):
        log.warning("%s is left by a conversion to %s that was killed (or still runs): remove it once none runs "
                    "(a partial shard set, never read)", left, out)
    made = []  # folders made to hold out_dir, innermost first: removed again (if empty) unless the set is published
    while not os.path.lexists(missing := (made[-1] if made else target).parent):
        made.append(missing)
    published = False
    try:
        try:  # before any image is read: a path through a file, or a read-only place, fails here
            if made:
                target.parent.mkdir(parents=True)
            stage = Path(tempfile.mkdtemp(prefix=f".{target.name}{PARTIAL}", dir=target.parent))
        except OSError as exc:
            raise DataError(f"cannot create the shard folder {out}: {exc.strerror or exc}") from None
        try:
            if before is None:
                os.chmod(stage, 0o777 & ~umask())  # mkdtemp's 0700: as a plain mkdir makes it
            else:  # the empty folder it replaces keeps its mode (setgid, a shared group's bits) and group
                os.chmod(stage, stat.S_IMODE(before.st_mode))
                with contextlib.suppress(OSError):
                    os.chown(stage, -1, before.st_gid)
            labelled = indexes[0].classes != [FLAT_CLASS]
            written = []
            with tqdm(total=sum(len(i) for i in indexes), unit="img", disable=not progress, desc="shards") as bar:
                for (name, folder), index in zip(splits, indexes, strict=True):
                    written.append(_write_split(folder, stage / name, out / name, index, labelled, shard_size, seed,
                                                bar))
            for name, _ in splits:
                if name:
                    fsync_path(stage / name)  # the split's entries
            fsync_path(stage)
            os.replace(stage, target)  # rename(2) replaces an empty folder whole
            published = True
            fsync_path(target.parent)
        finally:
            shutil.rmtree(stage, ignore_errors=True)  # gone already once renamed
    finally:
        for folder in made if not published else ():
            with contextlib.suppress(OSError):
                folder.rmdir()
    return written


def _write_split(folder: Path, stage: Path, out: Path, index: ImageIndex, labelled: bool, shard_size: int,
                 seed: int, bar) -> WrittenSplit:
    """Write the split `folder` (indexed as `index`) into `stage`, its files fsynced; described as `out`, where
    it is renamed to."""
    stage.mkdir(exist_ok=True)
    if labelled:
        with open(stage / CLASSES_FILE, "w", encoding="utf-8") as f:
            f.write(json.dumps(index.classes, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    order = np.random.default_rng(seed).permutation(len(index)).tolist()
    result = WrittenSplit(out, 0, 0, 0, [])
    file, tar, filled = None, None, 0

    def close() -> None:
        tar.close()  # the end blocks; `file` stays open
        file.flush()
        os.fsync(file.fileno())
        result.bytes += file.tell()
        result.shards += 1
        file.close()

    try:
        for j in order:
            path = index.paths[j]
            try:
                data = index.read(j)
            except OSError as err:  # the folder index keeps it too: an empty member keeps the same index
                data = b""
                result.unreadable.append(path)
                log.warning("cannot read %s (%s): kept in the shards as an empty member, which training skips as it "
                            "skips this file on the folder", path, err.strerror or err)
            else:
                if (problem := image_problem(data, path)) is not None:
                    result.corrupt.append(path)
                    log.warning("corrupt image %s (%s): kept in the shards, where training skips it as on the folder",
                                path, problem)
            key = encode_key(os.path.relpath(path, folder))
            need = _tar_bytes(len(data)) + (_tar_bytes(8) if labelled else 0)
            if tar is not None and _closed_size(filled + need) > shard_size:
                close()
                tar = None
            if tar is None:
                file = open(stage / f"shard-{result.shards:06d}.tar", "wb")  # closed by close(), or below
                tar = tarfile.open(fileobj=file, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                                   errors="surrogateescape")
                filled = 0
            _member(tar, f"{key}.{os.path.splitext(path)[1][1:].lower()}", data)
            if labelled:
                _member(tar, f"{key}.cls", str(index.labels[j]).encode())
            filled += need
            result.images += 1
            bar.update(1)
        if tar is not None:
            close()
            tar = None
    finally:
        if tar is not None:  # an error or Ctrl-C: the caller removes the partial folder
            file.close()
    return result
