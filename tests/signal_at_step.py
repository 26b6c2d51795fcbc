"""`fastdino` that sends itself a signal at a chosen iteration, for tests under a launcher (torchrun FILE ...).

FASTDINO_TEST_SIGNAL="RANK:ITERATION:NAME[,RANK:ITERATION:NAME...]": the process of that rank sends itself the signal
while the step of that iteration (0-based) runs, as a scheduler's signal lands in the step in flight; RANK * means
every process. FASTDINO_TEST_KNN_SIGNAL=NAME: the signal comes inside the first k-NN pass instead.
FASTDINO_TEST_HANG_SAVE=N:MARKER: the N-th checkpoint write (1-based) writes its temporary file whole, then writes
the iteration it holds to the file MARKER and sleeps, for a test that SIGKILLs the process there.
"""

import os
import signal
import sys
import time
from pathlib import Path

import torch

import fastdino.engine.checkpoint as checkpoint
import fastdino.engine.trainer as trainer
from fastdino.cli import main


def _plan() -> dict[int, int]:
    rank, plan = os.environ.get("RANK", "0"), {}
    for item in filter(None, os.environ.get("FASTDINO_TEST_SIGNAL", "").split(",")):
        who, at, name = item.split(":")
        if who in ("*", rank):
            plan[int(at)] = getattr(signal, name)
    return plan


def install() -> None:
    plan = _plan()
    step = trainer.Trainer.train_step

    def train_step(self, views, epoch, with_signals=False):
        if self.step in plan:
            os.kill(os.getpid(), plan[self.step])
        return step(self, views, epoch, with_signals)

    trainer.Trainer.train_step = train_step
    if name := os.environ.get("FASTDINO_TEST_KNN_SIGNAL"):
        knn = trainer.knn_evaluate

        def knn_evaluate(*args, **kwargs):
            os.kill(os.getpid(), getattr(signal, name))
            return knn(*args, **kwargs)

        trainer.knn_evaluate = knn_evaluate
    if hang := os.environ.get("FASTDINO_TEST_HANG_SAVE"):
        nth, marker = hang.split(":", 1)
        save, calls = torch.save, []

        def hanging_save(obj, f, *args, **kwargs):
            calls.append(1)
            save(obj, f, *args, **kwargs)
            if len(calls) == int(nth):
                f.flush()
                Path(marker).write_text(str(obj["step"]))
                time.sleep(120)

        checkpoint.torch.save = hanging_save


if __name__ == "__main__":
    install()
    sys.exit(main())
