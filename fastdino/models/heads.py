"""DINO projection head (Caron et al. 2021, Sec. 3.1 and App. "Projection head").

3-layer MLP (hidden 2048, GELU, no batch norm) to a 256-wide bottleneck, L2 normalisation, then a
weight-normalised linear layer to K outputs without bias. With norm_last_layer the weight-norm gain is
fixed at 1, so the output is a cosine similarity to K learned prototypes.

`use_bn` puts BatchNorm after both hidden layers (the official code's `use_bn_in_head`, off in the SPEC's
ViT recipe). It keeps the head's output image-dependent however little the backbone's is: on a few hundred
iterations from random init, where most of the class token's variation is view-specific, the student
otherwise learns a constant output and the teacher collapses to uniform (docs/demo.md).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
        use_bn: bool = False,
    ):
        super().__init__()
        def norm() -> list[nn.Module]:
            return [nn.BatchNorm1d(hidden_dim)] if use_bn else []

        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            *norm(),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            *norm(),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0  # (K, 1): the weight-norm g
        gain.data.fill_(1.0)
        gain.requires_grad = not norm_last_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)  # (B, bottleneck)
        x = nn.functional.normalize(x, dim=-1, p=2)
        return self.last_layer(x)  # (B, K)
