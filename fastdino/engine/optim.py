"""AdamW parameter groups and gradient clipping as in the official DINO code (`utils.py`)."""

from __future__ import annotations

import torch
from torch import nn


def param_groups(module: nn.Module) -> list[dict]:
    """Two groups: regularized (weights), and not (biases and every 1-D parameter such as norms).

    Frozen parameters (requires_grad False, e.g. the fixed weight-norm gain) are left out.
    """
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [
        {"params": decay, "regularized": True},
        {"params": no_decay, "regularized": False, "weight_decay": 0.0},
    ]


def build_optimizer(module: nn.Module, fused: bool, device: torch.device) -> torch.optim.AdamW:
    """AdamW; torch's fused kernel (one launch for every parameter, CUDA and CPU) when `fused`. Only the fused
    kernel takes a device-side `found_inf` flag, which lets a non-finite step be skipped without a host sync
    (`step_skipping_nonfinite`)."""
    return torch.optim.AdamW(param_groups(module), lr=0.0, weight_decay=0.0, fused=fused or None)


def step_skipping_nonfinite(optimizer: torch.optim.Optimizer, ok: torch.Tensor) -> None:
    """optimizer.step() unless the device bool `ok` is false; then no parameter, moment or step count changes.

    A fused torch optimizer reads the flag on the device (its `found_inf` input, as under a GradScaler): no host
    sync. Any other optimizer reads it on the host (one sync)."""
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = (~ok).float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif bool(ok):
        optimizer.step()


def set_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group["regularized"]:
            group["weight_decay"] = weight_decay


@torch.no_grad()
def clip_gradients_per_param(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale each parameter's gradient so its own L2 norm is at most max_norm (official DINO clipping:
    per parameter, not global). No host sync: the coefficients stay on the device.

    Returns the global gradient norm before clipping (for logging), a device scalar.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)
    total = torch.linalg.vector_norm(torch.stack(norms))
    if max_norm > 0:
        coefs = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
        torch._foreach_mul_(grads, coefs)
    return total
