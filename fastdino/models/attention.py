"""Multi-head self-attention with a switchable kernel (ViT, Dosovitskiy et al. 2021, Sec. 3.1).

`sdpa` (default) is torch.nn.functional.scaled_dot_product_attention, which picks flash / memory-efficient
kernels on the GPU; `xformers` calls xformers.ops.memory_efficient_attention when installed; `math` is
the explicit softmax(QK^T / sqrt(d)) V used as the test reference and to read attention maps.
"""

from __future__ import annotations

import torch
from torch import nn

from fastdino.errors import MissingDependencyError

ATTENTION_IMPLS = ("sdpa", "xformers", "math")


def check_attention_impl(impl: str) -> None:
    """Refuse an unknown impl, or xformers when it is not installed, before any model is built."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except Exception as exc:  # not installed, or installed but broken (any error while importing)
            raise MissingDependencyError(
                "model.attention=xformers needs the 'xformers' package (pip install xformers, matching your "
                f"torch build; importing it failed: {type(exc).__name__}: {exc}); use model.attention=sdpa otherwise"
            ) from exc


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v: (B, H, N, d). Returns (out (B, H, N, d), attention weights (B, H, N, N))."""
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    attn = attn.softmax(dim=-1)
    return attn @ v, attn


class Attention(nn.Module):
    """Parameter names (qkv, proj) match the official DINO ViT so its checkpoints load."""

    def __init__(self, dim: int, num_heads: int, impl: str = "sdpa"):
        super().__init__()
        check_attention_impl(impl)
        self.num_heads = num_heads
        self.impl = impl
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)  # (B, N, 3, H, d)
        attn = None
        if self.impl == "xformers" and not return_attention:
            import xformers.ops

            q, k, v = qkv.unbind(2)  # (B, N, H, d) each: xformers' layout
            out = xformers.ops.memory_efficient_attention(q, k, v).reshape(b, n, c)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d) each
            if self.impl == "sdpa" and not return_attention:
                out = nn.functional.scaled_dot_product_attention(q, k, v)
            else:
                out, attn = attention_math(q, k, v)
            out = out.transpose(1, 2).reshape(b, n, c)
        out = self.proj(out)
        return (out, attn) if return_attention else out
