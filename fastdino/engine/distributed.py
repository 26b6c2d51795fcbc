"""torchrun / DDP set-up, and which process is gone when a collective fails (PeerWatch). Models never see this:
the engine wraps the student here."""

from __future__ import annotations

import datetime
import os
import signal
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastdino.errors import UserError
from fastdino.models.backbones import has_batchnorms


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device, timeout_s: int = 600) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); single process otherwise.

    timeout_s (train.dist_timeout): how long a collective waits for a missing peer before it raises."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def close_process_group(agreed: bool = True) -> None:
    """Close the default process group at a run's end: NCCL warns at exit that "destroy_process_group() was not
    called" otherwise (torch >= 2.4, docs "Shutdown").

    agreed: every process ends at this same point (a finished run, an agreed stop, a user mistake every process
    meets). False (a failure one process may meet alone, a lost peer): closed only in a group of one, since
    destroying a communicator whose peers are gone or still stepping can hang, and the process is ending anyway."""
    if dist.is_initialized() and (agreed or dist.get_world_size() == 1):
        dist.destroy_process_group()


def wrap_ddp(module: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    if info.world_size == 1:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


def sync_batchnorm(module: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """BatchNorm layers computed over the global batch when several CUDA processes train, as the official code
    does for a network that `has_batchnorms` (a ResNet, a head with dino.head_bn): torch's SyncBatchNorm.

    CPU fallback: torch's SyncBatchNorm runs on GPUs only (its forward refuses CPU tensors), so CPU processes (gloo)
    keep plain BatchNorm: each normalises by its own batch's statistics. The student's running statistics are
    rank 0's after every forward (DDP broadcasts buffers); each teacher keeps its own, and checkpoints hold rank
    0's. Call before TeacherEMA is built: the conversion replaces modules.
    """
    if info.world_size == 1 or device.type != "cuda" or not has_batchnorms(module):
        return module
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)


# -- a lost process: which rank, in one line ------------------------------------------------------------------


class PeerLostError(RuntimeError):
    """Another process of the run died or stopped responding; the message names its rank (CLI exit code 6)."""


class Terminated(Exception):
    """A stop signal reached a process of a multi-process run whose collective then failed while every peer is alive:
    no checkpoint could be agreed on (CLI exit code 128 + signal number, as for engine/preempt.Stopped)."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.signum = signum


def _is_collective_error(exc: BaseException) -> bool:
    """A failure of torch.distributed: its typed errors, and gloo's, which arrive as plain RuntimeErrors naming
    gloo's source file (`.../third_party/gloo/gloo/transport/tcp/pair.cc: Connection closed by peer`)."""
    text = str(exc).lower()
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and ("gloo" in text or "nccl" in text))


class PeerWatch:
    """Heartbeats in the process group's key-value store, to name the rank that is gone when a collective fails.

    A collective that fails does not say which process is missing (gloo names a socket address, NCCL nothing).
    Every process of a multi-process run keeps a counter `fastdino/beat/<rank>` in the c10d store (torchrun's
    agent holds it, else rank 0's process) and adds 1 to it every `period_s` from a daemon thread. When the loop
    meets an error (a failed collective, or another), `failure` reads the other ranks' counters until each has
    moved again or `window_s` has passed: those that did not move belong to processes that are gone (their thread
    stopped with them); an unreachable store means its host is gone. A process that hangs keeps beating: then the
    other rank of a 2-process run is named, or none when there are more.

    Signals are engine/preempt.StopSignals' (`stops`): torchrun's agent and the DeepSpeed launcher send SIGTERM to the
    survivors of a dead worker, then SIGKILL 30 s later; the signal is noted and the next failed collective is
    reported here, as a lost rank or, when every peer is alive, as Terminated. Single-process runs get no thread:
    `failure` returns None at once.
    """

    def __init__(self, info: DistInfo, stops=None, period_s: float = 1.0, window_s: float = 5.0):
        self.info, self.stops, self.period_s, self.window_s = info, stops, period_s, window_s
        self.store = None
        if info.world_size > 1 and dist.is_initialized():
            store = dist.distributed_c10d._get_default_store()
            # a connection of its own (torch >= 2.8): a store call of the main thread holds the shared one's lock
            self.store = store.clone() if hasattr(store, "clone") else store
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PeerWatch:
        if self.store is not None:
            self._thread = threading.Thread(target=self._beat, name="fastdino-heartbeat", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """End the heartbeat, and wait (at most `window_s`) for its thread to leave the store call it is in.

        A daemon thread still inside a store call when the interpreter exits aborts the process ("terminate called
        without an active exception", exit -6): CPython ends such threads with pthread_exit when they next take the
        GIL, and that unwinds through the binding's noexcept GIL guard."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.window_s)

    @staticmethod
    def _key(rank: int) -> str:
        return f"fastdino/beat/{rank}"

    def _beat(self) -> None:
        while True:
            try:
                self.store.add(self._key(self.info.rank), 1)
            except RuntimeError:  # the store's host is gone: `failure` finds that out for itself
                return
            if self._stop.wait(self.period_s):
                return

    def lost_ranks(self) -> list[int] | None:
        """The other ranks whose counter does not move within `window_s` (sorted); None: the store is unreachable."""
        others = [r for r in range(self.info.world_size) if r != self.info.rank]
        try:
            first = {r: self.store.add(self._key(r), 0) for r in others}
            deadline = time.monotonic() + self.window_s
            waiting = set(others)
            while waiting and time.monotonic() < deadline:
                time.sleep(self.period_s / 4)
                waiting = {r for r in waiting if self.store.add(self._key(r), 0) == first[r]}
        except RuntimeError:
            return None
        return sorted(waiting)

    def failure(self, exc: BaseException, step: int, checkpoint: str) -> BaseException | None:
        """The one-line error that replaces `exc`, raised in the loop at iteration `step`; None: `exc` is no
        process-group failure (a bug of this process, which keeps its traceback).

        Any error but a user mistake (UserError, the same on every process) is looked into, not only a
        collective's: a process whose peer died may first meet something else (its DataLoader workers stopped by
        the launcher beside it: a RuntimeError, or an OSError from their queue).
        checkpoint: what the last complete checkpoint is and how to continue, appended to the message.
        Returns PeerLostError naming the lost rank(s), or Terminated when a stop signal came while every peer is
        alive.
        """
        if self.store is None or isinstance(exc, UserError):  # a user mistake is one on every process
            return None
        signum = self.stops.received if self.stops is not None else None
        terminated = signum is not None
        n = self.info.world_size
        lost = self.lost_ranks()
        if lost == [] and not terminated and not _is_collective_error(exc):
            return None
        if lost is None:
            host = "torchrun's agent" if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else None
            who = (f"the process holding the run's key-value store ({host})" if host else
                   f"rank 0 of {n} (its process holds the run's key-value store, which is gone)")
        elif lost:
            who = f"rank{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))} of {n}"
        elif terminated:
            name = signal.Signals(signum).name
            return Terminated(f"{name} at iteration {step} (the launcher or scheduler stopped this process, rank "
                              f"{self.info.rank} of {n}; a collective failed before the processes agreed on a "
                              f"checkpoint); {checkpoint}", signum)
        elif n == 2:
            who = f"rank {1 - self.info.rank} of 2"
        else:
            who = f"one of the {n - 1} other processes (all are alive: one hangs, which one is not known here)"
        return PeerLostError(f"{who} stopped responding at iteration {step} (its process died or hangs); {checkpoint}")
