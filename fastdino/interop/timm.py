"""timm folders in and out: `model.safetensors` + `config.json`, what `timm.create_model("local-dir:DIR",
pretrained=True)` reads (timm >= 1.0, models/_hub.py `load_model_config_from_path`).

timm's VisionTransformer names its tensors as the official DINO ViT does (timm's `vit_small_patch16_224.dino`
is the official release file), so the weights go out and come in without renaming; `config.json` says which
timm model to build (`architecture` plus `model_args` for the patch, image size, width, depth and heads) and
how to preprocess (`pretrained_cfg`: fastdino's evaluation transform). A classifier's `head.*` is not part of
the backbone and is dropped on the way in.

Convnets: timm's `resnet18 .. resnet152` are torchvision's ResNets (v1.5: the stride on the bottleneck's 3x3
conv, timm models/resnet.py `Bottleneck.conv2`; the same key names, `fc` an identity at num_classes 0), so a
torchvision backbone goes out under its own name with no model_args; a `timm/<name>` backbone goes out as
`<name>`, its state dict as timm made it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastdino.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
from fastdino.interop.restated import from_fused_qkv
from fastdino.models.backbones import TIMM_PREFIX, TORCHVISION_RESNETS
from fastdino.models.backbones import build_backbone as build_any_backbone

WEIGHTS = "model.safetensors"
TIMM_ARCH = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224",
             "vit_base": "vit_base_patch16_224"}
"""fastdino architecture -> the timm model of that width (model_args set its patch, image size and depth)."""


def eval_resize(size: int) -> int:
    """The short side fastdino's evaluation transform resizes to before its centre crop of `size` (256 for 224)."""
    return int(size * 256 / 224)


def timm_config(arch: str, *, embed_dim: int, depth: int, heads: int, patch_size: int, img_size: int) -> dict:
    """config.json for a fastdino ViT backbone (no classifier: num_classes 0, the class token as features)."""
    return {
        "architecture": TIMM_ARCH[arch],
        "num_classes": 0,
        "num_features": embed_dim,
        "global_pool": "token",
        "model_args": {"img_size": img_size, "patch_size": patch_size, "embed_dim": embed_dim, "depth": depth,
                       "num_heads": heads, "global_pool": "token", "class_token": True, "qkv_bias": True},
        "pretrained_cfg": {"tag": "fastdino", **_preprocessing(img_size), "fixed_input_size": True, "num_classes": 0,
                           "first_conv": "patch_embed.proj", "classifier": "head"},
    }


def _preprocessing(img_size: int) -> dict:
    """pretrained_cfg's preprocessing: fastdino's evaluation transform at img_size."""
    return {"input_size": [3, img_size, img_size], "interpolation": "bicubic",
            "crop_pct": img_size / eval_resize(img_size),  # timm resizes to floor(size / crop_pct), then crops
            "crop_mode": "center", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def timm_convnet_architecture(arch: str) -> str:
    """fastdino convnet name -> timm model name: a torchvision ResNet is timm's model of that name (module
    docstring), `timm/<name>` is `<name>`."""
    return arch.removeprefix(TIMM_PREFIX)


def timm_convnet_config(arch: str, num_features: int, img_size: int) -> dict:
    """config.json for a convnet backbone (resnet18..152 or timm/<name>): timm's model of that name with its
    default arguments, no classifier (num_classes 0: the pooled features), fastdino's evaluation preprocessing at
    img_size, the crop the run trained on (data.global_size; 224 for an official file, the official eval_knn.py
    crop), as a ViT folder declares its img_size; any input size works (fixed_input_size false)."""
    cfg = {"tag": "fastdino", **_preprocessing(img_size), "fixed_input_size": False, "num_classes": 0}
    if arch in TORCHVISION_RESNETS:
        cfg.update(first_conv="conv1", classifier="fc")
    return {"architecture": timm_convnet_architecture(arch), "num_classes": 0, "num_features": num_features,
            "pretrained_cfg": cfg}


def to_timm(backbone: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fastdino / official backbone state dict -> timm's (the same names), contiguous for safetensors."""
    return {k: v.contiguous() for k, v in backbone.items()}


def from_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ViT or ResNet state dict -> the official backbone names: the same, less a classifier (`head.*` of a
    ViT, `fc.*` of a ResNet), which is not part of the backbone."""
    return {k: v for k, v in state.items() if k not in ("head.weight", "head.bias", "fc.weight", "fc.bias")}


def timm_folder_arch(config: dict, state: dict[str, torch.Tensor]) -> str | None:
    """The fastdino architecture a timm folder (config.json, state dict) holds, where its keys do not tell: None
    for a ViT (read from its tensors) and for a torchvision-depth ResNet with default arguments (read from its
    keys: timm's ResNet is torchvision's), else `timm/<architecture>`."""
    name = config.get("architecture")
    if "cls_token" in state or not isinstance(name, str):
        return None
    if name in TORCHVISION_RESNETS and not config.get("model_args"):
        return None
    return f"{TIMM_PREFIX}{name}"


def _timm_from_folder(folder: Path):
    """timm's model from the folder (`timm.create_model("local-dir:DIR", pretrained=True)`) in eval mode; None when
    timm is not installed."""
    try:
        import timm
    except ImportError:
        return None
    return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()


def timm_class_token(folder: Path, x: torch.Tensor, *, use_library: bool = True) -> torch.Tensor:
    """The class token (B, D) of the timm folder on x (B, 3, S, S): built by timm when installed (and
    use_library), else by the tensor restatement of timm's ViT read from config.json."""
    if use_library and (model := _timm_from_folder(folder)) is not None:
        return model(x)
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    heads = config["model_args"]["num_heads"]
    return from_fused_qkv(load_file(folder / WEIGHTS), heads).class_token(x)


def timm_convnet_features(folder: Path, arch: str, x: torch.Tensor, *, use_library: bool = True) -> torch.Tensor:
    """The pooled features (B, D) of a convnet timm folder on x (B, 3, H, W), any H, W: built by timm from the
    folder when installed (and use_library), else fastdino's backbone `arch` (torchvision's ResNet; timm/<name>
    needs timm anyway) loaded strictly from the folder's tensors as timm names them."""
    if use_library and (model := _timm_from_folder(folder)) is not None:
        return model(x)
    from safetensors.torch import load_file

    model, _ = build_any_backbone(arch)
    model.load_state_dict(from_timm(load_file(folder / WEIGHTS)))  # strict: every key and shape
    return model.eval()(x)
