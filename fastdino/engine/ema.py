"""Teacher update by exponential moving average (Caron et al. 2021, Sec. 3.1 "Teacher network"; SPEC).

After each student optimizer step: theta_t <- m * theta_t + (1 - m) * theta_s, m on a cosine schedule from
0.996 to 1. `TeacherEMA` pairs the two networks' parameters by name once and updates them with the fused
Triton kernel (`kernels/ema.py`, one launch for the whole teacher) or with `torch._foreach_*` ops
(`ema_foreach_`, the reference and the CPU path). `ema.impl`: auto = triton on CUDA, foreach elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn

EMA_IMPLS = ("auto", "triton", "foreach")


def resolve_ema_impl(impl: str, device: torch.device) -> str:
    """`auto` means the Triton kernel on CUDA, the foreach ops elsewhere."""
    if impl not in EMA_IMPLS:
        raise ValueError(f"ema.impl must be one of {EMA_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "foreach"
    return impl


def _check_momentum(momentum: float | torch.Tensor) -> None:
    if isinstance(momentum, torch.Tensor):
        if momentum.numel() != 1 or not momentum.is_floating_point():
            raise ValueError(f"momentum tensor must hold one float, got {momentum.dtype} {tuple(momentum.shape)}")
    elif not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")


@torch.no_grad()
def ema_foreach_(teachers: list[torch.Tensor], students: list[torch.Tensor], momentum: float | torch.Tensor) -> None:
    """teachers[i] <- momentum * teachers[i] + (1 - momentum) * students[i] with torch._foreach_* ops (reference).

    teachers: float32 tensors, updated in place; students: same shapes, float32 (bf16 / fp16 are upcast to
    float32 temporaries first, so the math is fp32 either way). momentum: a Python float in [0, 1] (one
    `_foreach_lerp_`, weight 1 - m) or a 0-d float tensor on the tensors' device (no host sync:
    `_foreach_mul_` by m, then add (1 - m) * student). Bytes a fused pass must move, the floor:
    read students + read teachers + write teachers = sum numel * (4 + student itemsize + 4).
    """
    _check_momentum(momentum)
    if not teachers:
        return
    students = [s if s.dtype == t.dtype else s.to(t.dtype) for t, s in zip(teachers, students, strict=True)]
    if isinstance(momentum, torch.Tensor):
        m = momentum.to(teachers[0].dtype).reshape(())
        torch._foreach_mul_(teachers, m)
        torch._foreach_add_(teachers, torch._foreach_mul(students, 1.0 - m))
    else:
        torch._foreach_lerp_(teachers, students, 1.0 - float(momentum))


def _unwrap(module: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


def _names_differ(what: str, student: set[str], teacher: set[str]) -> str:
    only_s, only_t = sorted(student - teacher), sorted(teacher - student)
    return f"{what} differ by name: only in the student {only_s[:5]}, only in the teacher {only_t[:5]}"


class TeacherEMA:
    """The DINO teacher update over every teacher parameter, paired with the student's by name.

    Contract:
    - Construction: `TeacherEMA(student, teacher, impl)` after both models are built, initialised
      (teacher = copy of student: the method's job) and moved to their device; both on one device.
      DDP and torch.compile wrappers are stripped if passed. Parameters are paired by name
      (`named_parameters()`): the name sets, shapes and buffer names/shapes must be equal, else ValueError.
    - Policy, fixed at construction from the student's `requires_grad`:
        * trainable student parameter -> EMA; the teacher's copy must be float32 (an EMA step of
          1 - m = 4e-3 is below bf16 resolution; float64 too, for the float64 parity tests); the student's may be
          float32, bfloat16 or float16.
        * frozen student parameter (requires_grad False, e.g. the weight-norm gain g of DINOHead with
          norm_last_layer) -> copied exactly, teacher <- student, every update: equal stays equal, with no
          rounding drift from averaging two equal values. (Freezing by zeroing gradients, as DINO does for
          the last layer in epoch 1, keeps a parameter trainable: it is averaged.)
        * buffers -> the teacher's own (none in ViT / DINOHead; the BatchNorm running statistics of a
          convnet teacher come from the teacher's own forward in train mode, as in the official code, whose EMA
          moves `parameters()` only): never touched.
        * every teacher parameter gets requires_grad False (the teacher is never trained by gradients).
    - `update(m)` after each optimizer step; m a Python float in [0, 1] or a 0-d float tensor on the
      device (no host sync). Both impls give the same result to fp32 rounding.
    - Order: build models -> .to(device) -> TeacherEMA -> optimizer -> checkpoint load -> DDP wrap, as the
      trainer does; but this class changes no storage, so no later move or replacement of parameters
      breaks it: each update re-reads the parameters from their owning modules and re-checks their
      addresses (host only, about one `data_ptr()` per tensor), and the Triton launch table is rebuilt if
      any moved (`.to()`, `load_state_dict(assign=True)`, `param.data = ...`). Moving one model without
      the other is an error at the next update; replacing a whole submodule needs a new TeacherEMA. The
      impl chosen by `auto` is fixed at construction.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, impl: str = "auto"):
        student, teacher = _unwrap(student), _unwrap(teacher)
        s_params = dict(student.named_parameters())
        t_params = dict(teacher.named_parameters())
        if s_params.keys() != t_params.keys():
            raise ValueError(_names_differ("student and teacher parameters", set(s_params), set(t_params)))
        s_bufs = dict(student.named_buffers())
        t_bufs = dict(teacher.named_buffers())
        if s_bufs.keys() != t_bufs.keys():
            raise ValueError(_names_differ("student and teacher buffers", set(s_bufs), set(t_bufs)))
        for name, b in s_bufs.items():
            if b.shape != t_bufs[name].shape:
                raise ValueError(f"buffer {name}: student {tuple(b.shape)} != teacher {tuple(t_bufs[name].shape)}")
        devices = {p.device for p in s_params.values()} | {p.device for p in t_params.values()}
        if len(devices) > 1:
            raise ValueError(
                f"student and teacher must be on one device before TeacherEMA, got {sorted(map(str, devices))}"
            )
        self.device = devices.pop() if devices else torch.device("cpu")
        self.impl = resolve_ema_impl(impl, self.device)

        self._ema_slots: list[tuple[nn.Module, str, nn.Module, str]] = []  # (teacher owner, leaf, student owner, leaf)
        self._copy_slots: list[tuple[nn.Module, str, nn.Module, str]] = []
        for name, s in s_params.items():
            t = t_params[name]
            if t is s:
                raise ValueError(f"parameter {name} is shared by student and teacher: pass two separate networks")
            if t.shape != s.shape:
                raise ValueError(f"parameter {name}: student {tuple(s.shape)} != teacher {tuple(t.shape)}")
            owner, _, leaf = name.rpartition(".")
            slot = (teacher.get_submodule(owner), leaf, student.get_submodule(owner), leaf)
            if s.requires_grad:
                if t.dtype not in (torch.float32, torch.float64) or not s.is_floating_point():
                    raise ValueError(f"parameter {name}: the EMA needs a float32 (or float64) teacher, got {t.dtype} / "
                                     f"{s.dtype}")
                self._ema_slots.append(slot)
            else:
                self._copy_slots.append(slot)
        teacher.requires_grad_(False)
        self._plan = None
        if self.impl == "triton":
            from fastdino.kernels.ema import EMAPlan  # lazy: the foreach path needs no Triton

            self._plan_cls = EMAPlan
            self._plan = EMAPlan(*self._tensors(self._ema_slots))  # fail early (device, dtypes, layout)

    @staticmethod
    def _tensors(slots: list[tuple[nn.Module, str, nn.Module, str]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The parameters as registered now (a replaced parameter is seen, not the stale one)."""
        return [t_mod._parameters[t] for t_mod, t, _, _ in slots], [s_mod._parameters[s] for _, _, s_mod, s in slots]

    @torch.no_grad()
    def update(self, momentum: float | torch.Tensor) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student (trainable); teacher <- student (frozen)."""
        _check_momentum(momentum)
        if self._copy_slots:
            torch._foreach_copy_(*self._tensors(self._copy_slots))
        teachers, students = self._tensors(self._ema_slots)
        if self.impl == "foreach":
            ema_foreach_(teachers, students, momentum)
            return
        if not self._plan.matches(teachers, students):
            self._plan = self._plan_cls(teachers, students)
        self._plan.apply(momentum)
