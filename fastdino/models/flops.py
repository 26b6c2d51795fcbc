"""FLOP counts (2 per multiply-add) of the backbones and the DINO head, for MFU figures.

The ViT and the heads are counted analytically: the matrix products (patch embedding, qkv, attention scores and
values, projection, MLP, head); norms, softmax and elementwise work are left out, as in the usual MFU convention.
Any other backbone (torchvision, timm convnets) is counted by torch's FlopCounterMode (`counted_forward_flops`:
convolutions and matrix products, the same convention, fvcore-style) on a meta-device copy.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def vit_forward_flops(tokens_side: int, dim: int, depth: int, patch: int, mlp_ratio: float = 4.0) -> float:
    """One image through the backbone at a grid of tokens_side x tokens_side patches."""
    n = tokens_side * tokens_side + 1  # + class token
    per_block = 2 * n * dim * 3 * dim + 4 * n * n * dim + 2 * n * dim * dim + 4 * n * dim * int(dim * mlp_ratio)
    patch_embed = 2 * (n - 1) * 3 * patch * patch * dim
    return depth * per_block + patch_embed


def counted_forward_flops(module: nn.Module, size: int) -> float:
    """Forward FLOPs of `module` on one (1, 3, size, size) image, as torch.utils.flop_counter.FlopCounterMode
    counts them (convolutions, matrix products, attention; 2 per multiply-add), run on a copy on the meta device:
    shapes only, no compute and no memory. `module` itself is untouched."""
    meta = copy.deepcopy(module).to("meta").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta(torch.empty(1, 3, size, size, device="meta"))
    return float(counter.get_total_flops())


def backbone_forward_flops(backbone: nn.Module, size: int) -> float:
    """One image of side `size` through any backbone: analytic for fastdino's ViT, counted otherwise."""
    from fastdino.models.vit import VisionTransformer

    if isinstance(backbone, VisionTransformer):
        return vit_forward_flops(size // backbone.patch_size, backbone.embed_dim, len(backbone.blocks),
                                 backbone.patch_size)
    return counted_forward_flops(backbone, size)


def head_forward_flops(dim: int, hidden: int, bottleneck: int, out_dim: int) -> float:
    return 2 * (dim * hidden + hidden * hidden + hidden * bottleneck + bottleneck * out_dim)


def dino_train_flops_per_image(
    *, dim: int, depth: int, patch: int, global_size: int, local_size: int, n_local: int,
    hidden: int, bottleneck: int, out_dim: int,
) -> float:
    """Student forward + backward (3x forward) over every crop, teacher forward over the 2 global crops.

    ViT-S/16, 2x224 + 10x96, K=65536: about 124 GFLOP per image.
    """
    head = head_forward_flops(dim, hidden, bottleneck, out_dim)
    glob = vit_forward_flops(global_size // patch, dim, depth, patch) + head
    local = vit_forward_flops(local_size // patch, dim, depth, patch) + head
    return 3 * (2 * glob + n_local * local) + 2 * glob


def sit_train_flops_per_image(
    *, dim: int, depth: int, patch: int, size: int, decoder: str, decoder_hidden: int, decoder_depth: int,
    proj_hidden: int, proj_dim: int, momentum: bool, mlp_ratio: float = 4.0,
) -> float:
    """SiT: student forward + backward (3x forward) of backbone, projection head and decoder over both views;
    with momentum targets, the EMA encoder's forward (backbone + projection) over both clean views too."""
    side = size // patch
    n = side * side
    backbone = vit_forward_flops(side, dim, depth, patch, mlp_ratio)
    proj = 2 * (dim * proj_hidden + proj_hidden * proj_dim) if proj_hidden else 2 * dim * proj_dim
    pixels = 3 * patch * patch
    if decoder == "linear":
        dec = 2 * n * dim * pixels
    elif decoder == "mlp":
        dec = 2 * n * (dim * decoder_hidden + decoder_hidden * pixels)
    else:  # transformer blocks over the N patch tokens, then the linear layer
        block = 2 * n * dim * 3 * dim + 4 * n * n * dim + 2 * n * dim * dim + 4 * n * dim * int(dim * mlp_ratio)
        dec = decoder_depth * block + 2 * n * dim * pixels
    student = backbone + proj + dec
    return 2 * (3 * student + ((backbone + proj) if momentum else 0))
