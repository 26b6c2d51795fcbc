"""SiT's reconstruction decoder (Atito et al. 2021, Sec. 3.1; SPEC "SiT": "a lightweight decoder ... then a
fold back to pixels").

The backbone's patch tokens (B, N, D) go through a light per-token stack and a linear layer to the p*p*C
pixels of their patch, then fold back to the image (B, C, gh*p, gw*p). Kinds: `linear` (the reference
code's ConvTranspose2d with kernel = stride = patch is exactly this), `mlp` (Linear, GELU, Linear) and
`transformer` (`depth` pre-norm ViT blocks at the backbone's width before the linear layer).
"""

from __future__ import annotations

import torch
from torch import nn

from fastdino.models.vit import Block, _init_weights

DECODER_KINDS = ("linear", "mlp", "transformer")


def fold_patches(pixels: torch.Tensor, grid_h: int, grid_w: int, channels: int = 3) -> torch.Tensor:
    """(B, gh*gw, C*p*p), each token's pixels channel-major as (C, p, p) -> the image (B, C, gh*p, gw*p)."""
    b, n, d = pixels.shape
    p = int(round((d / channels) ** 0.5))
    if n != grid_h * grid_w or channels * p * p != d:
        raise ValueError(f"cannot fold {tuple(pixels.shape)} to a {grid_h}x{grid_w} grid of {channels}-channel patches")
    x = pixels.view(b, grid_h, grid_w, channels, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, gh, p, gw, p)
    return x.reshape(b, channels, grid_h * p, grid_w * p)


class ReconstructionDecoder(nn.Module):
    """Patch tokens (B, gh*gw, D) -> reconstructed image (B, C, gh*p, gw*p) in the input's normalised space.

    kind: linear | mlp (hidden_dim wide) | transformer (depth blocks of width D, D // 64 heads at least 1,
    `attention` as the backbone's). Raises ValueError for an unknown kind.
    """

    def __init__(
        self, embed_dim: int, patch_size: int, kind: str = "mlp", hidden_dim: int = 1024, depth: int = 2,
        in_chans: int = 3, attention: str = "sdpa",
    ):
        super().__init__()
        if kind not in DECODER_KINDS:
            raise ValueError(f"decoder kind must be one of {DECODER_KINDS}, got {kind!r}")
        self.patch_size, self.in_chans = patch_size, in_chans
        out = in_chans * patch_size * patch_size
        if kind == "linear":
            self.blocks, self.head = nn.ModuleList(), nn.Linear(embed_dim, out)
        elif kind == "mlp":
            self.blocks = nn.ModuleList()
            self.head = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out))
        else:
            heads = max(1, embed_dim // 64)
            self.blocks = nn.ModuleList(Block(embed_dim, heads, 4.0, 0.0, attention) for _ in range(depth))
            self.head = nn.Sequential(nn.LayerNorm(embed_dim, eps=1e-6), nn.Linear(embed_dim, out))
        self.apply(_init_weights)

    def forward(self, tokens: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens)
        return fold_patches(self.head(tokens), grid_h, grid_w, self.in_chans)  # (B, C, H, W)
