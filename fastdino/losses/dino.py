"""DINO cross-entropy between teacher and student views (Caron et al. 2021, Sec. 3.1, Alg. 1).

`dino_loss_ref` is the pure-PyTorch reference and the CPU path; `kernels/dino_loss.py` is the fused
Triton kernel with the same signature and semantics. `dino_loss` picks one of them from `impl`.
The loss is a pure function: the center lives in `TeacherCenter`, updated by the method afterwards.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

LOSS_IMPLS = ("auto", "triton", "torch")


def _check_shapes(student_logits: torch.Tensor, teacher_logits: torch.Tensor, center: torch.Tensor) -> tuple[int, int]:
    """Return (batch, n_crops) after checking the multi-crop layout."""
    if student_logits.dim() != 2 or teacher_logits.dim() != 2:
        raise ValueError("student and teacher logits must be 2-D (rows, K)")
    n_teacher, k = teacher_logits.shape
    if n_teacher % 2 or n_teacher == 0:
        raise ValueError(f"teacher logits must hold 2 global crops of B rows each, got {n_teacher} rows")
    batch = n_teacher // 2
    if student_logits.shape[1] != k or center.numel() != k:
        raise ValueError(f"K mismatch: student {student_logits.shape[1]}, teacher {k}, center {center.numel()}")
    if student_logits.shape[0] % batch or student_logits.shape[0] < n_teacher:
        raise ValueError(f"student rows {student_logits.shape[0]} are not n_crops >= 2 times the batch {batch}")
    return batch, student_logits.shape[0] // batch


def dino_loss_ref(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over all (teacher view t, student view v != t) pairs of H(P_t, P_s), averaged over the batch.

    student_logits: (n_crops*B, K), crop-major; rows [0, 2B) are the two global crops.
    teacher_logits: (2*B, K), the same two global crops through the teacher (no gradient).
    center: (K,) float32.
    Returns (loss: fp32 scalar, teacher_sum: (K,) fp32 column sum of the raw teacher logits for the
    center update). Math is fp32 whatever the input dtype (fp64 for fp64 logits: the float64 parity tests); the
    gradient reaches student_logits only.

    A student row's partners share one mixture (SPEC note): global crop 0 pairs with P_t[1], global
    crop 1 with P_t[0], each local crop with P_t[0] + P_t[1]. Bytes a fused pass must move: read S and
    T once, write dS once: (n_crops + 2) * B * K * itemsize + n_crops * B * K * itemsize.
    """
    batch, n_crops = _check_shapes(student_logits, teacher_logits, center)
    k = teacher_logits.shape[1]
    teacher = _wide(teacher_logits.detach())  # (2B, K)
    p_t = F.softmax((teacher - _wide(center)) / teacher_temp, dim=-1).view(2, batch, k)
    log_p_s = F.log_softmax(_wide(student_logits) / student_temp, dim=-1).view(n_crops, batch, k)

    cross = (p_t[1] * log_p_s[0]).sum() + (p_t[0] * log_p_s[1]).sum()
    if n_crops > 2:
        cross = cross + (p_t.sum(0) * log_p_s[2:].sum(0)).sum()
    n_pairs = 2 * n_crops - 2
    loss = -cross / (batch * n_pairs)
    return loss, teacher.sum(0)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """fp32, or fp64 kept as it is."""
    return x if x.dtype == torch.float64 else x.float()


def resolve_loss_impl(impl: str, device: torch.device) -> str:
    """`auto` means the Triton kernel on CUDA, the reference elsewhere."""
    if impl not in LOSS_IMPLS:
        raise ValueError(f"loss.impl must be one of {LOSS_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return impl


def dino_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
    impl: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to the reference (`torch`) or the fused kernel (`triton`); same contract as dino_loss_ref."""
    if impl == "triton":
        from fastdino.kernels.dino_loss import dino_loss_triton

        return dino_loss_triton(student_logits, teacher_logits, center, student_temp, teacher_temp)
    return dino_loss_ref(student_logits, teacher_logits, center, student_temp, teacher_temp)


class TeacherCenter(nn.Module):
    """Running center c <- m c + (1 - m) mean(teacher logits) over the global batch (SPEC: Centering)."""

    def __init__(self, dim: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(dim))

    @torch.no_grad()
    def update(self, teacher_sum: torch.Tensor, n_rows: int) -> None:
        """teacher_sum: (K,) column sum over this process's n_rows teacher rows.

        When distributed, the sums and the row counts are all-reduced together (one call), so the mean is the
        global batch's also when processes hold different numbers of rows (a last, smaller batch)."""
        total = _wide(teacher_sum)
        total_rows = float(n_rows)
        if dist.is_available() and dist.is_initialized():
            both = torch.cat([total, total.new_full((1,), float(n_rows))])
            dist.all_reduce(both)
            total, total_rows = both[:-1], both[-1]
        self.center.mul_(self.momentum).add_(total / total_rows, alpha=1 - self.momentum)
