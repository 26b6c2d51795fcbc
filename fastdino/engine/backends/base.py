"""The Backend interface: how the student is wrapped, backpropagated and stepped (DESIGN.md floor 5).

The trainer's step calls one small interface, whatever runs underneath:

    backend.wrap(method)             build the optimizer over the student, wrap it (DDP, DeepSpeed engine)
    backend.set_schedules(lr, wd)    this iteration's closed-form learning rate and weight decay
    with backend.autocast(): ...     mixed precision of the forward pass (teacher, student, loss)
    backend.backward(loss)           gradients of the loss (scaled under fp16), reduced over processes
    backend.step(epoch, loss_finite) unscale, clip per parameter (SPEC), cancel the method's frozen
                                     parameters, optimizer step, skipped when `loss_finite` (a device
                                     bool) is false or the gradients are not finite; returns the
                                     gradient norm before clipping (inf for a skipped fp16 overflow)
    backend.state_dict() / load_state_dict(ckpt, path)   optimizer and loss-scale state for checkpoints

`ddp.py` (torchrun / DDP, and the single process) and `deepspeed.py` (ZeRO stage 1 and 2) implement it;
`train.engine=ddp|deepspeed` chooses. The EMA teacher, the center and the schedules stay in the trainer
and the method: one source of truth for both backends.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from fastdino.config import Config
from fastdino.engine.distributed import DistInfo
from fastdino.methods.base import Method


def autocast_for(precision: str, device: torch.device) -> AbstractContextManager:
    """torch autocast in bf16 / fp16, nothing for fp32: the forward pass of every backend."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


class Backend:
    """The engine interface of the training step; see the module docstring for the order of calls."""

    optimizer: torch.optim.Optimizer
    """The optimizer whose param_groups carry lr / weight_decay (AdamW, SGD or LARS over engine/optim.py's groups)."""
    checkpoint_dir: Path | None = None
    """Where `state_dict` writes files of its own (DeepSpeed), named when a write there fails; None: none."""

    def __init__(self, cfg: Config, dist: DistInfo, device: torch.device, precision: str, output_dir: Path):
        self.cfg, self.dist, self.device, self.precision, self.output_dir = cfg, dist, device, precision, output_dir

    def wrap(self, method: Method) -> None:
        raise NotImplementedError

    def set_schedules(self, lr: float, weight_decay: float) -> None:
        from fastdino.engine.optim import set_schedules

        set_schedules(self.optimizer, lr, weight_decay)

    def autocast(self) -> AbstractContextManager:
        return autocast_for(self.precision, self.device)

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self, epoch: int, loss_finite: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss_scale(self) -> torch.Tensor | None:
        """fp16 only: the loss scale the next step uses (a device scalar); None otherwise."""
        return None

    def state_dict(self) -> dict:
        """Entries for the run's checkpoint; called on every rank (DeepSpeed writes its own files here)."""
        raise NotImplementedError

    def load_state_dict(self, ckpt: dict, path: Path) -> None:
        """Restore what `state_dict` saved, after `wrap`; raises CheckpointError naming `path`."""
        raise NotImplementedError
