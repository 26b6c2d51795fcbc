"""A scheduler's stop (SLURM, Kubernetes, torchrun): the signal is noted in its handler, the loop acts on it.

The handler only records the first stop signal (a second one, or any later one, changes nothing: the checkpoint
being written is not cut short). The loop finishes the step in flight, agrees with the other processes on the
iteration to stop at (trainer.py: folded into the all-reduce its log steps already make, so no collective and no
host sync is added to the step), writes `last.pt` there and raises `Stopped`, which the CLI turns into one line and
exit code 128 + the signal's number (143 for SIGTERM, 138 for SIGUSR1): the code a shell reports for a process
ended by that signal, so wrapper scripts that already treat it as "stopped by the scheduler, requeue" keep working,
and it is apart from every failure code (1-6) and from Ctrl-C's 130. docs/preemption.md says why no Python handler
runs while a process waits inside an NCCL collective and what lead time to ask the scheduler for.

Forked children (DataLoader workers) ignore the stop signals: a scheduler or launcher that signals the whole process
group must not end the workers while the loop still needs batches for the steps before the agreed iteration; they
end with their parent as usual (the DataLoader shuts them down, or they see their parent gone within 5 s).
"""

from __future__ import annotations

import os
import signal
import threading


class Stopped(Exception):
    """A stop signal ended the run at `iteration`, after `last.pt` was written there (CLI: one line, exit code
    128 + signal number)."""

    def __init__(self, message: str, signum: int, iteration: int, signals: tuple[int, ...] = ()):
        super().__init__(message)
        self.signum, self.iteration, self.signals = signum, iteration, signals

    def ignore_signals(self) -> None:
        """The process is ending with its line: from now on the stop signals are ignored (the interpreter's teardown
        resets Python handlers to the default, which would end the process with -signal, but keeps SIG_IGN)."""
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                signal.signal(signum, signal.SIG_IGN)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _ignore(signum, frame) -> None:
    pass


_active: StopSignals | None = None  # the installed instance, for forked children


def _in_child() -> None:
    """A forked child (a DataLoader worker) ignores the stop signals and never reports; see the module docstring."""
    global _active
    stops, _active = _active, None
    if stops is None:
        return
    try:
        for signum in stops.signals:
            signal.signal(signum, signal.SIG_IGN)
    except ValueError:  # forked from another thread than the main one: handlers cannot be set there
        pass
    stops.received = None


os.register_at_fork(after_in_child=_in_child)


class StopSignals:
    """The stop signals of one run: `install` (main thread only; elsewhere a no-op), `received` (the first signal's
    number, or None), `restore`."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)):
        self.signals = signals
        self.received: int | None = None
        self._old: dict[int, object] = {}

    def install(self) -> StopSignals:
        global _active
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in self.signals:
            old = signal.signal(signum, self._note)
            self._old[signum] = old if old is not None else signal.SIG_DFL
        _active = self
        return self

    def _note(self, signum, frame) -> None:
        """Only notes: an exception raised here could land in a finaliser or inside torch.save and be lost."""
        if self.received is None:
            self.received = signum
            # DataLoader's SIGCHLD handler raises wherever the main thread is once a worker dies (a launcher may
            # signal the workers too); a Python no-op, not SIG_DFL, or a SIGCHLD already caught would raise
            # `Signal 17 ignored due to race condition`
            if threading.current_thread() is threading.main_thread() and signal.SIGCHLD not in self._old:
                self._old[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, _ignore) or signal.SIG_DFL

    def restore(self) -> None:
        """The handlers ours replaced go back (the CLI keeps ours while it reports a stop: see Trainer.fit)."""
        global _active
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, old in self._old.items():
            signal.signal(signum, old)
        self._old.clear()
        if _active is self:
            _active = None
