"""torchrun / DDP backend, and the single process: the optimizer of optim.name (AdamW, SGD or LARS,
engine/optim.py), GradScaler under fp16, SPEC's clipping.

The step is the official DINO step (`main_dino.py`): backward of the (scaled) loss, unscale, clip each
parameter's gradient to norm `optim.clip_grad`, cancel the method's frozen parameters (DINO's last layer
in the first epochs: gradient None, so the optimizer neither moves nor decays it), optimizer step, scaler update.
A step whose loss or gradient norm is not finite is skipped on the device (the `found_inf` flag of fused AdamW /
SGD and of LARS; under fp16 the GradScaler's own check), so no host sync is needed to keep a NaN out of the
weights; optim.fused=false (torch's foreach AdamW / SGD) reads the flag on the host."""

from __future__ import annotations

from pathlib import Path

import torch

from fastdino.engine.backends.base import Backend
from fastdino.engine.checkpoint import CheckpointError
from fastdino.engine.distributed import wrap_ddp
from fastdino.engine.health import loss_scale
from fastdino.engine.optim import build_optimizer, clip_gradients_per_param, step_skipping_nonfinite
from fastdino.methods.base import Method
from fastdino.telemetry import phase


class DDPBackend(Backend):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def wrap(self, method: Method) -> None:
        """optim.name over the unwrapped student's parameter groups, then DDP when there are several processes."""
        self.method = method
        self.optimizer = build_optimizer(method.student_module(), self.cfg.optim.name, self.cfg.optim.fused)
        method.student = wrap_ddp(method.student, self.dist, self.device)

    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()

    def step(self, epoch: int, loss_finite: torch.Tensor) -> torch.Tensor:
        with phase("clip"):  # per parameter, on unscaled gradients; then the method's frozen parameters
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            grad_norm = clip_gradients_per_param(params, self.cfg.optim.clip_grad)
            self.method.before_optimizer_step(epoch)
        with phase("optimizer"):
            if self.scaler.is_enabled():  # fp16: the scaler skips a step whose gradients overflowed
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                step_skipping_nonfinite(self.optimizer, loss_finite & torch.isfinite(grad_norm))
        return grad_norm

    def loss_scale(self) -> torch.Tensor | None:
        return loss_scale(self.scaler)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, ckpt: dict, path: Path) -> None:
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path} does not match this run (train.engine=ddp): {exc}") from exc
