"""The optimizers, parameter groups and gradient clipping of the official DINO code (`main_dino.py`, `utils.py`).

`optim.name` as the official `--optimizer`: adamw (torch AdamW, its defaults), sgd (torch SGD, momentum 0.9, the
official ResNet-50 recipe) or lars (`LARS` below, a restatement of the official `utils.LARS`). All take the same
two parameter groups and the same closed-form lr / weight-decay schedules (`set_schedules`, each iteration).
"""

from __future__ import annotations

import torch
from torch import nn

from fastdino.config import OPTIMIZERS

SGD_MOMENTUM = 0.9  # official: torch.optim.SGD(params_groups, lr=0, momentum=0.9)


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


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You et al. 2017) as the official DINO `utils.LARS` (itself from Barlow Twins).

    For every parameter p with a gradient g, in each group (lr, weight_decay, momentum, eta):
      p not 1-D:  d = g + weight_decay * p;  q = eta * |p| / |d| (1 where |p| or |d| is 0);  d = q * d
      p 1-D:      d = g  (no weight decay, no adaptation: biases and norm parameters)
      mu = momentum * mu + d  (mu starts at zeros);  p = p - lr * mu
    with |.| the L2 norm of the whole tensor. Parameters without a gradient are skipped. The arithmetic is
    torch._foreach_* over each group (the official code loops over parameters; same operations, same order).

    A `found_inf` attribute (a device float, 1 = skip), set by `step_skipping_nonfinite`, skips the step on the
    device: every parameter and `mu` keeps its value (a torch.where per tensor), with no host read.
    """

    takes_found_inf = True

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = SGD_MOMENTUM,
                 eta: float = 0.001):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "eta": eta})

    @torch.no_grad()
    def step(self, closure=None):
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            updates = [p.grad for p in params]
            adapt = [i for i, p in enumerate(params) if p.ndim != 1]
            if adapt:
                weights = [params[i] for i in adapt]
                decayed = torch._foreach_add([updates[i] for i in adapt], weights, alpha=group["weight_decay"])
                p_norm = torch.stack(torch._foreach_norm(weights))  # (n,) one norm per parameter
                d_norm = torch.stack(torch._foreach_norm(decayed))
                one = torch.ones_like(p_norm)
                trust = torch.where(p_norm > 0.0, torch.where(d_norm > 0, group["eta"] * p_norm / d_norm, one), one)
                torch._foreach_mul_(decayed, list(trust.unbind()))
                for i, d in zip(adapt, decayed):
                    updates[i] = d
            mus = [self.state[p].setdefault("mu", torch.zeros_like(p)) for p in params]
            if found_inf is None:
                torch._foreach_mul_(mus, group["momentum"])
                torch._foreach_add_(mus, updates)
                torch._foreach_add_(params, mus, alpha=-group["lr"])
                continue
            new_mus = torch._foreach_mul(mus, group["momentum"])
            torch._foreach_add_(new_mus, updates)
            new_params = torch._foreach_add(params, new_mus, alpha=-group["lr"])
            keep = found_inf.to(params[0].device) != 0
            for old, new in zip(mus + params, new_mus + new_params):
                old.copy_(torch.where(keep, old, new))


def build_optimizer(module: nn.Module, name: str, fused: bool) -> torch.optim.Optimizer:
    """`make_optimizer` over `param_groups(module)`."""
    return make_optimizer(name, param_groups(module), fused)


def make_optimizer(name: str, groups: list[dict], fused: bool) -> torch.optim.Optimizer:
    """The optimizer `optim.name` names over `groups` (lr and weight decay 0 until `set_schedules`).

    adamw: torch AdamW (betas, eps: torch's defaults, as the official code); sgd: torch SGD, momentum 0.9, no
    dampening or Nesterov; both with torch's fused kernel (one launch for every parameter, CUDA and CPU) when
    `fused`, which takes the device-side `found_inf` flag of `step_skipping_nonfinite`. Fused SGD starts its
    momentum buffers at zeros here: its own first step fills them without writing them when skipped (uninitialised
    memory after a skipped first step), and takes no buffer for a parameter that joins later (DINO's last layer after
    its freeze); m * 0 + g = g is torch's first-step buffer exactly. lars: `LARS`. Raises ValueError for another
    name (the config refuses it first)."""
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, fused=fused or None)
    if name == "sgd":
        opt = torch.optim.SGD(groups, lr=0.0, momentum=SGD_MOMENTUM, weight_decay=0.0, fused=fused or None)
        if fused:
            for group in opt.param_groups:
                for p in group["params"]:
                    opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return opt
    if name == "lars":
        return LARS(groups)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def takes_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` reads a device-side `found_inf` flag (torch's fused kernels, LARS)."""
    return bool(optimizer.defaults.get("fused")) or getattr(optimizer, "takes_found_inf", False)


def step_skipping_nonfinite(optimizer: torch.optim.Optimizer, ok: torch.Tensor) -> None:
    """optimizer.step() unless the device bool `ok` is false; then no parameter, moment or step count changes.

    An optimizer that `takes_found_inf` reads the flag on the device (as under a GradScaler): no host sync. Any
    other optimizer (torch's foreach AdamW / SGD, optim.fused=false) reads it on the host (one sync)."""
    if takes_found_inf(optimizer):
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
