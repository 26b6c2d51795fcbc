"""Checkpoints: atomic writes, weights-only loads, and the RNG states that make a resume exact."""

from __future__ import annotations

import errno
import os
import pickle
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from fastdino.errors import CheckpointError
from fastdino.file_modes import plain_mode


class CheckpointWriteError(RuntimeError):
    """A file of the run (a checkpoint, DeepSpeed's files, metrics.jsonl, summary.json, curves.png, ...) could not be
    written (disk full, quota, I/O); the message names it and what last.pt holds (CLI exit code 5)."""


# What a write that fails for want of space or a working disk raises: the run stops (exit code 5).
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`.

    A crash at any point leaves either the old file or the new one, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                torch.save(state, f)
            except RuntimeError as exc:  # torch.save's writer wraps what the file raised: a full disk, Ctrl-C
                raise os_error_of(exc) or exc from None
            f.flush()
            os.fsync(f.fileno())
        plain_mode(tmp)  # mkstemp makes it 0600: give it the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def os_error_of(exc: BaseException) -> OSError | KeyboardInterrupt | None:
    """The OSError or KeyboardInterrupt in `exc`'s chain: torch.save's C++ writer turns what the file raised (a full
    disk, Ctrl-C) into `RuntimeError: [enforce fail at inline_container.cc]` with it as the context; None if none."""
    seen = exc
    while seen is not None:
        if isinstance(seen, (OSError, KeyboardInterrupt)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def temporary_files(path: Path) -> list[Path]:
    """The temporary files `save_checkpoint` leaves when its process is killed mid-write (`.last.pt.*.tmp`)."""
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def load_checkpoint(path: str | Path) -> dict:
    """torch.load with weights_only=True (no pickled code runs); errors name the file."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder: name the checkpoint file (e.g. {path / 'last.pt'})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):  # garbage, not a refused object
            raise CheckpointError(f"checkpoint {path} is unreadable: not a torch checkpoint file") from None
        raise CheckpointError(
            f"checkpoint {path} holds pickled objects other than tensors, which fastdino never loads (they could "
            "run code): it is not a fastdino checkpoint; an official DINO file starts a run with train.init_from"
        ) from None
    except Exception as exc:  # torch raises many types for corrupt files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {first})") from exc
    if not isinstance(state, dict) or "config" not in state:
        raise CheckpointError(f"checkpoint {path} is not a fastdino checkpoint (no 'config' entry)")
    return state


def rng_state() -> dict:
    """Every RNG the training step draws from, as tensors and plain values (weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
