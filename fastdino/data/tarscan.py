"""A tar shard's samples from its headers alone, for `fastdino.data.shards`'s first-start scan.

Standard library only, and kept apart from shards.py (which imports torch through files.py): the processes a
large shard set's first scan is spread over (`_serve`) are fresh interpreters that import this module alone, so
they start in ~0.1 s (perf/RESULTS.md, the shard index) and hold no torch, CUDA or DataLoader state.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import pickle
import signal
import sys
from collections.abc import Collection, Iterator
from typing import BinaryIO

CLASSES_FILE = "classes.json"
_LABEL_SUFFIXES = ("cls", "txt", "json")  # a sample's class members, in the order one is chosen


class CompressedShard(Exception):
    """A shard that is a compressed tar whatever its name; `shards` raises it as a DataError, message unchanged."""


# -- keys (exported by fastdino.data.shards) ------------------------------------------------------------------

def encode_key(relative_path: str) -> str:
    """A WebDataset key for an image's path relative to its data set: '%' and '.' escaped (%25, %2E), so the
    key holds no dot (WebDataset cuts the key at the first dot of a member's name) and decodes back."""
    return relative_path.replace(os.sep, "/").replace("%", "%25").replace(".", "%2E")


def decode_key(key: str) -> str:
    """The relative path `encode_key` made `key` from (a key it did not make comes back as it is)."""
    return key.replace("%2E", ".").replace("%25", "%")


def _order(key: str) -> tuple[str, ...]:
    """Sort key: the folder index's order of the path the key names (class folder name, then the path within)."""
    return tuple(decode_key(key).split("/", 1))


# -- one shard ------------------------------------------------------------------------------------------------

def _split_member(name: str) -> tuple[str, str] | None:
    """(key, extension) by WebDataset's rule, None for a member name without an extension."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _class_of(ext: str, data: bytes, classes_json: list[str] | None) -> tuple[int, str | None]:
    """(.cls integer or -1, class name or None) of a label member; raises ValueError for a bad one."""
    text = data.decode("utf-8").strip()
    if ext == "cls":
        value = int(text)
        if classes_json is None:
            return value, None
        if not 0 <= value < len(classes_json):
            raise ValueError(f".cls {value} is outside {CLASSES_FILE}'s {len(classes_json)} classes")
        return -1, classes_json[value]
    if ext == "json":
        value = json.loads(text)
        if isinstance(value, int) and not isinstance(value, bool):
            return _class_of("cls", str(value).encode(), classes_json)
        if not isinstance(value, str):
            raise ValueError(".json is neither a class name (string) nor a label (integer)")
        text = value
    if not text:
        raise ValueError(f".{ext} is empty")
    return -1, text


class _TarDamage(Exception):
    """A shard's tar structure ends or breaks: `member` names the member cut short, if one was."""

    def __init__(self, message: str, member: str | None = None) -> None:
        super().__init__(message)
        self.member = member


def _tar_number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256, for members of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _tar_text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _tar_members(mm: mmap.mmap | bytes, file_size: int) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each regular file of a tar, header by header (ustar, GNU long names, PAX
    path and size records), without reading the data: 10-20x faster than `tarfile` on a million tiny members.
    Raises _TarDamage at a bad header checksum or where the file ends inside a header or member."""
    pos, long_name, pax = 0, None, {}
    while pos + 512 <= file_size:
        block = mm[pos:pos + 512]
        if not any(block):  # the end-of-archive blocks
            return
        try:  # the checksum only where the ustar magic is missing (old v7 tars, or not a header at all)
            if block[257:262] != b"ustar" and sum(block) - sum(block[148:156]) + 256 != _tar_number(block[148:156]):
                raise ValueError("bad checksum")
            size = _tar_number(block[124:136])
        except ValueError as err:
            raise _TarDamage(f"bad header at byte {pos}: {err}") from None
        kind, data = block[156:157], pos + 512
        if kind == b"L":  # GNU: the next member's long name
            long_name = _tar_text(mm[data:data + size])
        elif kind == b"x":  # PAX: records "LEN key=value\n" for the next member
            records, at = bytes(mm[data:data + size]), 0
            while at < len(records) and (space := records.find(b" ", at)) > 0:
                length = int(records[at:space])
                key, _, value = records[space + 1:at + length - 1].partition(b"=")
                pax[key] = value
                at += length
        elif kind != b"g":
            if b"size" in pax:
                size = int(pax[b"size"])
            if b"path" in pax:
                name = pax[b"path"].decode("utf-8", "surrogateescape")
            elif long_name is not None:
                name = long_name
            else:
                name = _tar_text(block[0:100])
                if block[257:263] == b"ustar\0" and block[345]:
                    name = _tar_text(block[345:500]) + "/" + name
            if kind in (b"0", b"\0", b"7"):
                if data + size > file_size:
                    raise _TarDamage(f"the file ends {file_size - data} bytes into this {size}-byte member", name)
                yield name, data, size
            long_name, pax = None, {}
        pos = data + -(-size // 512) * 512
    if pos < file_size:
        raise _TarDamage(f"the file ends inside a header at byte {pos}")


def _scan_tar(sid: int, path: str, classes_json: list[str] | None,
              image_extensions: Collection[str]) -> tuple[list[tuple], list[str]]:
    """The samples of shard number `sid` at `path`, in its order, as (`_order(key)`, key, sid, offset, size, .cls
    integer or -1, class name or None), and one line per sample left out (a member without an image, a bad
    label, a truncated end, an unreadable shard). Members whose suffix (".jpg") `image_extensions` holds are
    images. Raises CompressedShard for a gzip-compressed shard."""
    samples: dict[str, dict] = {}
    problems: list[str] = []
    try:
        with open(path, "rb") as f:
            if f.read(2) == b"\x1f\x8b":
                raise CompressedShard(f"shard {path} is gzip-compressed: fastdino reads shards by seeking to members, "
                                      "which a compressed tar does not allow; decompress it and index the .tar")
            file_size = os.fstat(f.fileno()).st_size
            with contextlib.ExitStack() as stack:
                mm = stack.enter_context(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)) if file_size else b""
                for name, offset, size in _tar_members(mm, file_size):
                    if (parts := _split_member(name)) is None:
                        continue
                    key, ext = parts
                    sample = samples.setdefault(key, {})
                    if "." + ext in image_extensions and "image" not in sample:
                        sample["image"] = (offset, size)
                    elif ext in _LABEL_SUFFIXES and ext not in sample:
                        sample[ext] = bytes(mm[offset:offset + size])
                    elif "." + ext not in image_extensions and ext not in _LABEL_SUFFIXES:
                        sample.setdefault("other", []).append(ext)  # named if the sample has no image
    except _TarDamage as err:
        cut = None if err.member is None else _split_member(err.member)
        if cut is not None:
            samples.pop(cut[0], None)
            problems.append(f"{path}:{cut[0]}: the shard is truncated inside this sample ({err}): left out")
        else:
            problems.append(f"shard {path} is damaged after {len(samples)} samples ({err}): the rest is left out")
    except OSError as err:
        problems.append(f"shard {path} cannot be read ({err.strerror or err}): its images are left out")
        return [], problems
    out = []
    for key, sample in samples.items():
        if "image" not in sample:
            held = sorted({*(e for e in _LABEL_SUFFIXES if e in sample), *sample.get("other", ())})
            problems.append(f"{path}:{key} has no image member (it holds .{', .'.join(held)}; an image's suffix must "
                            "be one Pillow reads: .jpg, .png, ...): left out")
            continue
        cls, name = -1, None
        ext = next((e for e in _LABEL_SUFFIXES if e in sample), None)
        if ext is not None:
            try:
                cls, name = _class_of(ext, sample[ext], classes_json)
            except (ValueError, UnicodeError) as err:
                problems.append(f"{path}:{key}: unreadable class member .{ext} ({err}): left out")
                continue
        out.append((_order(key), key, sid, *sample["image"], cls, name))
    return out, problems


# -- a scan process ------------------------------------------------------------------------------------------

def _serve(requests: BinaryIO | None = None, replies: BinaryIO | None = None) -> None:
    """A scan process (`fastdino.data.shards._scan_elsewhere` starts it): reads the pickle of (classes_json, image
    suffixes), then (sid, path) requests until its input ends, and answers each with the pickle of ("ok",
    `_scan_tar`'s result) or ("compressed", the message). Ctrl-C is left to the process that started it."""
    requests = requests or sys.stdin.buffer
    replies = replies or sys.stdout.buffer
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    classes_json, image_extensions = pickle.load(requests)
    while True:
        try:
            sid, path = pickle.load(requests)
        except EOFError:
            return
        try:
            reply = ("ok", _scan_tar(sid, path, classes_json, image_extensions))
        except CompressedShard as err:
            reply = ("compressed", str(err))
        try:
            pickle.dump(reply, replies, pickle.HIGHEST_PROTOCOL)
            replies.flush()
        except BrokenPipeError:  # the caller stopped reading (it ended, or no longer wants this answer): end quietly
            if replies is sys.stdout.buffer:  # nothing left for the interpreter's exit to flush into the closed pipe
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return
