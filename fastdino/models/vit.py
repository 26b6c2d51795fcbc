"""Vision Transformer backbone as used by DINO (Caron et al. 2021, Sec. 3.1 and App. "Architecture").

Pre-norm blocks (LayerNorm eps 1e-6, MLP ratio 4, GELU, qkv bias), a class token and learned position
embeddings interpolated bicubically to any crop size (the official rule by default, see
`interpolate_pos_encoding`). Parameter names follow the official DINO
`vision_transformer.py` so its released state dicts load with `load_state_dict`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastdino.models.attention import Attention

POS_EMBED_INTERP = ("official", "exact")
_REGISTRY: dict[str, Callable[..., VisionTransformer]] = {}


def register_model(fn: Callable[..., VisionTransformer]) -> Callable[..., VisionTransformer]:
    _REGISTRY[fn.__name__] = fn
    return fn


def model_names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def build_backbone(arch: str, **kwargs) -> VisionTransformer:
    if arch not in _REGISTRY:
        raise ValueError(f"model.arch must be one of {model_names()}, got {arch!r}")
    return _REGISTRY[arch](**kwargs)


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al. 2016): drop the residual branch, rescale the survivors."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, attention: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, impl=attention)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        if return_attention:
            return self.attn(self.norm1(x), return_attention=True)[1]
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class VisionTransformer(nn.Module):
    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        attention: str = "sdpa",
        pos_embed_interp: str = "official",
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if pos_embed_interp not in POS_EMBED_INTERP:
            raise ValueError(f"pos_embed_interp must be one of {POS_EMBED_INTERP}, got {pos_embed_interp!r}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.pos_embed_interp = pos_embed_interp
        self.grad_checkpointing = grad_checkpointing
        """Recompute each block in the backward pass (torch.utils.checkpoint, non-reentrant; the RNG state is
        replayed, so stochastic depth drops the same paths): activation memory of one block, not of all."""
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r, attention) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def interpolate_pos_encoding(self, n_patches: int, h: int, w: int) -> torch.Tensor:
        """Position embeddings for an (h, w) input: (1, 1 + (h/patch)*(w/patch), D), the stored ones when the
        grid matches.

        `official` (default) resizes the stored side x side grid bicubically with the scale factor
        ((h/patch + 0.1) / side, (w/patch + 0.1) / side), as the official DINO `interpolate_pos_encoding`
        does: the +0.1 keeps floor(side * scale) at the target grid, and the scale itself (not the grid
        ratio) sets where each output position samples the stored grid, so this is what official
        checkpoints were trained and evaluated with. `exact` resizes to the exact output size instead
        (source positions from the grid ratio), which samples slightly different points.
        """
        n_stored = self.pos_embed.shape[1] - 1
        grid_h, grid_w = h // self.patch_size, w // self.patch_size
        if n_patches == n_stored and grid_h == grid_w:
            return self.pos_embed
        side = int(math.sqrt(n_stored))
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()  # (1, D, side, side)
        if self.pos_embed_interp == "official":
            scale = ((grid_h + 0.1) / side, (grid_w + 0.1) / side)
            patch_pos = nn.functional.interpolate(patch_pos, scale_factor=scale, mode="bicubic", align_corners=False)
        else:
            patch_pos = nn.functional.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat((cls_pos, patch_pos), dim=1)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        x = self.patch_embed(x)  # (B, N, D)
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)  # (B, N+1, D)
        return x + self.interpolate_pos_encoding(x.shape[1] - 1, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) -> class token after the final norm, (B, D)."""
        return self.forward_tokens(x)[:, 0]

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) -> every token after the final norm, (B, 1 + N, D): the class token, then the
        patches row by row (what SiT's reconstruction decoder reads)."""
        x = self.prepare_tokens(x)
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        return self.norm(x)

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights of the last block, (B, H, N+1, N+1), for attention maps."""
        x = self.prepare_tokens(x)
        for block in self.blocks[:-1]:
            x = block(x)
        return self.blocks[-1](x, return_attention=True)

    def get_intermediate_class_tokens(self, x: torch.Tensor, n: int) -> list[torch.Tensor]:
        """Normed class tokens of the last n blocks (the ViT-S linear-probe features)."""
        x = self.prepare_tokens(x)
        out = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if len(self.blocks) - i <= n:
                out.append(self.norm(x)[:, 0])
        return out


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


@register_model
def vit_tiny(**kwargs) -> VisionTransformer:
    return VisionTransformer(**{"embed_dim": 192, "depth": 12, "num_heads": 3, **kwargs})


@register_model
def vit_small(**kwargs) -> VisionTransformer:
    return VisionTransformer(**{"embed_dim": 384, "depth": 12, "num_heads": 6, **kwargs})


@register_model
def vit_base(**kwargs) -> VisionTransformer:
    return VisionTransformer(**{"embed_dim": 768, "depth": 12, "num_heads": 12, **kwargs})
