"""timm folders in and out: `model.safetensors` + `config.json`, what `timm.create_model("local-dir:DIR",
pretrained=True)` reads (timm >= 1.0, models/_hub.py `load_model_config_from_path`).

timm's VisionTransformer names its tensors as the official DINO ViT does (timm's `vit_small_patch16_224.dino`
is the official release file), so the weights go out and come in without renaming; `config.json` says which
timm model to build (`architecture` plus `model_args` for the patch, image size, width, depth and heads) and
how to preprocess (`pretrained_cfg`: fastdino's evaluation transform). A classifier's `head.*` is not part of
the backbone and is dropped on the way in.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastdino.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
from fastdino.interop.restated import from_fused_qkv

WEIGHTS = "model.safetensors"
TIMM_ARCH = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224",
             "vit_base": "vit_base_patch16_224"}
"""fastdino architecture -> the timm model of that width (model_args set its patch, image size and depth)."""


def eval_resize(size: int) -> int:
    """The short side fastdino's evaluation transform resizes to before its centre crop of `size` (256 for 224)."""
    return int(size * 256 / 224)


def timm_config(arch: str, *, embed_dim: int, depth: int, heads: int, patch_size: int, img_size: int) -> dict:
    """config.json for a fastdino ViT backbone (no classifier: num_classes 0, the class token as features)."""
    crop_pct = img_size / eval_resize(img_size)  # timm resizes to floor(size / crop_pct), then centre-crops
    return {
        "architecture": TIMM_ARCH[arch],
        "num_classes": 0,
        "num_features": embed_dim,
        "global_pool": "token",
        "model_args": {"img_size": img_size, "patch_size": patch_size, "embed_dim": embed_dim, "depth": depth,
                       "num_heads": heads, "global_pool": "token", "class_token": True, "qkv_bias": True},
        "pretrained_cfg": {
            "tag": "fastdino", "input_size": [3, img_size, img_size], "fixed_input_size": True,
            "interpolation": "bicubic", "crop_pct": crop_pct, "crop_mode": "center",
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "num_classes": 0,
            "first_conv": "patch_embed.proj", "classifier": "head",
        },
    }


def to_timm(backbone: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fastdino / official backbone state dict -> timm's (the same names), contiguous for safetensors."""
    return {k: v.contiguous() for k, v in backbone.items()}


def from_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ViT state dict -> the official backbone names: the same, less a classifier (`head.weight`,
    `head.bias`), which is not part of the backbone."""
    return {k: v for k, v in state.items() if k not in ("head.weight", "head.bias")}


def timm_class_token(folder: Path, x: torch.Tensor, *, use_library: bool = True) -> torch.Tensor:
    """The class token (B, D) of the timm folder on x (B, 3, S, S): built by timm when installed (and
    use_library), else by the tensor restatement of timm's ViT read from config.json."""
    if use_library:
        try:
            import timm
        except ImportError:
            timm = None
        if timm is not None:
            model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
            return model(x)
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    heads = config["model_args"]["num_heads"]
    return from_fused_qkv(load_file(folder / WEIGHTS), heads).class_token(x)
