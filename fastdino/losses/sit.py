"""SiT losses (Atito et al. 2021, arXiv 2104.03602, Sec. 3; SPEC "SiT"): L1 reconstruction, InfoNCE, and the
reference code's learned task weights.

Pure functions; math in fp32 whatever the input dtype. Under torch.distributed the contrastive losses use
the global batch: keys are all-gathered, and where keys carry gradients (`nt_xent_loss`) the gather's
backward sums every process's gradient into the local slice, so the DDP-averaged gradient equals the
gradient of the global-batch loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
              across_processes: bool = False) -> torch.Tensor:
    """Mean absolute error over the masked pixels (every channel of them), an fp32 scalar.

    pred, target: (B, C, H, W); mask: (B, 1, H, W) bool (the corrupted pixels) or None for every pixel (the
    reference code's nn.L1Loss). A batch without a masked pixel gives 0. The gradient reaches pred only.
    across_processes (every process must call it then: a collective): under torch.distributed, the sum over
    this process's masked pixels divided by the global count and multiplied by the world size, so the mean
    over processes (what DDP's gradient average takes) is the global batch's L1 whatever each process's
    count; processes' counts differ, so the mean of per-process means would not be.
    """
    diff = (pred.float() - target.detach().float()).abs()  # (B, C, H, W)
    if mask is None:
        return diff.mean()  # equal counts on every process: the mean of means is the global mean
    weight = mask.to(diff.dtype)
    count = weight.sum() * pred.shape[1]
    scale = 1.0
    if across_processes and _distributed():
        dist.all_reduce(count)  # a scalar, on the device: no host sync
        scale = float(dist.get_world_size())
    return scale * (diff * weight).sum() / count.clamp(min=1.0)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0; backward sums every process's gradient of the gathered tensor (an all-reduce)
    and keeps this process's slice (torch.distributed.nn.functional.all_gather does the same but is
    deprecated from torch 2.13)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_batch(x: torch.Tensor, with_grad: bool) -> tuple[torch.Tensor, int]:
    """(b, P) -> (world * b, P), rank-major, and the offset of this process's rows. Every process must hold
    the same b. Single process: x itself and 0."""
    if not _distributed():
        return x, 0
    offset = dist.get_rank() * x.shape[0]
    if with_grad:
        return _GatherWithGrad.apply(x), offset
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts), offset


def info_nce(query: torch.Tensor, keys: torch.Tensor, positive: torch.Tensor, temperature: float,
             exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the query rows of -log softmax(cos(q_i, keys) / T)[positive_i], fp32.

    query: (n, P); keys: (m, P); positive: (n,) int64 index of each row's positive key; exclude: (n,) int64
    index of a key left out of row i's softmax (itself, for NT-Xent) or None. Rows are L2-normalised here.
    """
    q = F.normalize(query.float(), dim=-1)
    k = F.normalize(keys.float(), dim=-1)
    logits = q @ k.T / temperature  # (n, m)
    if exclude is not None:
        left_out = torch.arange(k.shape[0], device=logits.device) == exclude[:, None]  # (n, m), no host sync
        logits = logits.masked_fill(left_out, float("-inf"))
    return F.cross_entropy(logits, positive)


def momentum_contrastive_loss(
    q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The paper's contrastive loss: student view 1 against the momentum encoder's view 2 and vice versa,
    the other images of the global batch as negatives (MoCo-style InfoNCE), averaged over both directions.

    q1, q2: (b, P) student projections of the two views (gradient); k1, k2: (b, P) momentum-encoder
    projections of the same views (no gradient), all-gathered across processes. Each process's loss is the
    mean over its own queries; DDP's gradient average makes that the global mean.
    """
    keys1, offset = gather_batch(k1.detach(), with_grad=False)  # (world*b, P)
    keys2, _ = gather_batch(k2.detach(), with_grad=False)
    positive = torch.arange(q1.shape[0], device=q1.device) + offset
    return (info_nce(q1, keys2, positive, temperature) + info_nce(q2, keys1, positive, temperature)) / 2


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """The reference code's NT-Xent (SimCLR) between two student views: each of the 2N global rows against the
    other 2N - 1, its other view the positive. z1, z2: (b, P) with gradient; keys all-gathered with gradient.
    Returns the mean over this process's 2b anchors.
    """
    b = z1.shape[0]
    keys1, offset = gather_batch(z1, with_grad=True)  # (N, P)
    keys2, _ = gather_batch(z2, with_grad=True)
    n = keys1.shape[0]
    keys = torch.cat((keys1, keys2))  # (2N, P)
    local = torch.arange(b, device=z1.device) + offset
    anchors = torch.cat((z1, z2))  # (2b, P): global rows local and n + local
    self_index = torch.cat((local, local + n))
    positive = torch.cat((local + n, local))
    return info_nce(anchors, keys, positive, temperature, exclude=self_index)


def uncertainty_weighted(losses: list[torch.Tensor], log_vars: torch.Tensor, adjust: list[float]) -> torch.Tensor:
    """The reference code's learned task weighting (after Kendall et al. 2018): sum over tasks t of
    adjust_t * exp(-s_t) * L_t + s_t / 2, with s = log_vars (T,) learned (adjust 0.5 for an L1 loss, 1
    otherwise)."""
    total = log_vars.new_zeros((), dtype=torch.float32)
    for t, (loss, adj) in enumerate(zip(losses, adjust, strict=True)):
        s = log_vars[t].float()
        total = total + adj * torch.exp(-s) * loss.float() + 0.5 * s
    return total
