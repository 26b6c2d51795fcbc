"""The run folder (train.output_dir): one run at a time, nothing left behind by a killed one, never two runs' reports
mixed, never inside the data it trains on. Checked at the start of a run, before any step (Trainer.__init__)."""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from fastdino.engine.checkpoint import temporary_files
from fastdino.errors import UserError

log = logging.getLogger("fastdino")

LOCK = ".fastdino.lock"
# What a run writes into its folder: a fresh run (no checkpoint of this folder to continue) must not meet them.
RUN_FILES = ("last.pt", "metrics.jsonl", "summary.json", "curves.png", "health.json", "deepspeed", "tb")


class RunFolderError(UserError):
    """train.output_dir is in use by another run, holds another run's files, or lies inside the data folder."""


_held: dict[Path, RunLock] = {}  # real folder -> this process's lock on it


class RunLock:
    """An advisory lock (flock) on `folder/.fastdino.lock`, held while a run uses the folder.

    The kernel drops a flock when its process ends, however it ends (SIGKILL included), so a lock can only be held by
    a live process; the file keeps the holder's pid, host and start time for the refusal message, and a file whose
    holder is gone (not released: the process was killed) is reported as taken over. One process may open its own
    folder again (a second Trainer in the same process shares the lock). On a file system without flock (some network
    mounts) no lock is taken, with a warning.
    """

    def __init__(self, folder: Path):
        self.folder, self.path, self.fd = folder, folder / LOCK, None

    def acquire(self) -> None:
        """Raises RunFolderError naming the process that holds the folder."""
        key = self.folder.resolve()
        if key in _held:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunFolderError(
                f"train.output_dir {self.folder} is in use by another run ({holder}): wait for it to end, or give this "
                "run another train.output_dir") from None
        except OSError as exc:  # no flock here: run unlocked rather than not at all
            log.warning("could not lock %s (%s): two runs started into this folder would not be stopped", self.path,
                        exc.strerror or exc)
            os.close(fd)
            return
        previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if previous:
            log.warning("took over the lock of a run that ended without releasing it (%s; it is no longer running)",
                        previous)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}, started {stamp} UTC\n".encode(), 0)
        self.fd = fd
        _held[key] = self

    def release(self) -> None:
        if self.fd is None:
            return
        _held.pop(self.folder.resolve(), None)
        os.ftruncate(self.fd, 0)  # released cleanly: the next run takes it over without a word
        os.close(self.fd)  # closing drops the flock
        self.fd = None


@atexit.register
def _release_all() -> None:
    for lock in list(_held.values()):
        lock.release()


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker) closes its copy of the lock's descriptor: a flock lasts while any copy is
    open, and a worker outliving its killed parent by a few seconds must not keep the folder locked."""
    for lock in _held.values():
        if lock.fd is not None:
            os.close(lock.fd)
            lock.fd = None
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def lock_run_folder(folder: Path) -> RunLock:
    lock = RunLock(folder)
    lock.acquire()
    return lock


def remove_temporary_checkpoints(folder: Path) -> None:
    """The temporary files a run killed inside a checkpoint write left (save_checkpoint's `.last.pt.*.tmp`): only
    the run holding the folder's lock may remove them."""
    for tmp in temporary_files(folder / "last.pt"):
        tmp.unlink(missing_ok=True)
        log.warning("removed %s: a temporary checkpoint file left by a run killed while writing it", tmp)


def check_fresh_start(folder: Path, resume: str, resumes: bool) -> None:
    """A run that starts afresh (`resumes` false: no checkpoint to continue) must not mix its report with the files
    of another run in its folder.

    train.resume=none: refused (RunFolderError), the user chose a fresh start and which files to keep is theirs to
    say. train.resume=auto found no last.pt: the files (of a run stopped before its first checkpoint) are moved
    aside into `folder/previous-<UTC time>/`, with a warning. A resume (from this folder's last.pt or from a
    checkpoint path) continues a run: its records of an iteration replace the earlier ones (reports/plots.py).
    """
    if resumes:
        return
    found = [name for name in RUN_FILES if (folder / name).exists()]
    if not found:
        return
    if resume == "none":
        raise RunFolderError(
            f"train.output_dir {folder} holds another run's files ({', '.join(found)}): with train.resume=none this "
            "run's summary and curves would mix with them; give this run another train.output_dir, remove those "
            "files, or continue that run with train.resume=auto")
    aside = folder / time.strftime("previous-%Y%m%d-%H%M%S", time.gmtime())
    aside.mkdir()
    for name in found:
        shutil.move(str(folder / name), aside / name)
    log.warning("moved %s of an earlier run without a checkpoint to %s: this run starts afresh", ", ".join(found),
                aside)


def check_outside_data(folder: Path, data_folders: list[Path]) -> None:
    """The run folder inside a data folder would be indexed as images (its curves.png as a class `runs`)."""
    out = folder.resolve()
    for data in data_folders:
        data = data.resolve()
        if out == data or data in out.parents:
            raise RunFolderError(
                f"train.output_dir {folder} lies inside the data folder {data}: the run's own pictures (curves.png, "
                "...) would be read as training images; put the run folder outside data.path")
