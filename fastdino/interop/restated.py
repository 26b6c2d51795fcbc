"""A ViT written from tensors alone, to check an export when its target library is not installed.

The forward is the DINO ViT's (Caron et al. 2021, App. "Architecture"; Dosovitskiy et al. 2021, Eq. 1-4):
patch embedding, class token, position embeddings at the stored grid, pre-norm blocks (multi-head attention,
GELU MLP), final LayerNorm; it shares no code with models/vit.py. Each format says how its library reads its
own key names (`from_fused_qkv` for the official and timm layout, hf.py for transformers' split q / k / v and
its config's eps), so a wrong mapping (q and k swapped, another LayerNorm eps) changes the class token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

Pair = tuple[torch.Tensor, torch.Tensor]  # (weight, bias)


@dataclass
class RestatedBlock:
    norm1: Pair
    q: Pair  # (D, D), (D,)
    k: Pair
    v: Pair
    proj: Pair
    norm2: Pair
    fc1: Pair  # (4D, D), (4D,)
    fc2: Pair


@dataclass
class RestatedViT:
    cls_token: torch.Tensor  # (1, 1, D)
    pos_embed: torch.Tensor  # (1, 1 + N, D)
    patch: Pair  # (D, 3, p, p), (D,)
    blocks: list[RestatedBlock]
    norm: Pair
    heads: int
    eps: float

    def class_token(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) float32 at the stored grid (H = W = p * sqrt(N)) -> class token after the final norm,
        (B, D) float32."""
        weight, bias = self.patch
        t = F.conv2d(x, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2)  # (B, N, D)
        b, n, d = t.shape
        t = torch.cat((self.cls_token.expand(b, -1, -1), t), dim=1) + self.pos_embed  # (B, 1 + N, D)
        head_dim = d // self.heads
        for blk in self.blocks:
            h = F.layer_norm(t, (d,), *blk.norm1, eps=self.eps)
            q, k, v = (F.linear(h, *w).reshape(b, n + 1, self.heads, head_dim).transpose(1, 2)
                       for w in (blk.q, blk.k, blk.v))  # (B, H, 1 + N, d)
            attn = torch.softmax(q @ k.transpose(-2, -1) * head_dim ** -0.5, dim=-1)
            t = t + F.linear((attn @ v).transpose(1, 2).reshape(b, n + 1, d), *blk.proj)
            h = F.layer_norm(t, (d,), *blk.norm2, eps=self.eps)
            t = t + F.linear(F.gelu(F.linear(h, *blk.fc1)), *blk.fc2)
        return F.layer_norm(t[:, 0], (d,), *self.norm, eps=self.eps)


def from_fused_qkv(state: dict[str, torch.Tensor], heads: int, eps: float = 1e-6) -> RestatedViT:
    """The official DINO / timm ViT layout (`blocks.{i}.attn.qkv` fused as [q; k; v] rows, as their attention
    reshapes it to (B, N, 3, H, d)), keys without prefix. Raises KeyError for a missing tensor."""
    def pair(name: str) -> Pair:
        return state[f"{name}.weight"].float(), state[f"{name}.bias"].float()

    blocks = []
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}"
        weight, bias = pair(f"{p}.attn.qkv")  # (3D, D), (3D,)
        (qw, kw, vw), (qb, kb, vb) = weight.chunk(3), bias.chunk(3)
        blocks.append(RestatedBlock(norm1=pair(f"{p}.norm1"), q=(qw, qb), k=(kw, kb), v=(vw, vb),
                                    proj=pair(f"{p}.attn.proj"), norm2=pair(f"{p}.norm2"), fc1=pair(f"{p}.mlp.fc1"),
                                    fc2=pair(f"{p}.mlp.fc2")))
    return RestatedViT(state["cls_token"].float(), state["pos_embed"].float(), pair("patch_embed.proj"), blocks,
                       pair("norm"), heads, eps)
