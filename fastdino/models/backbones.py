"""One way to build any backbone DINO trains: fastdino's ViTs, torchvision ResNets and any timm model.

DINO is architecture-free (Caron et al. 2021, Sec. 3.1: "DINO works on both convnets and ViTs without modifying
the architecture or internal normalizations"); the official `main_dino.py` trains torchvision models by name with
their classifier replaced by an identity (`MultiCropWrapper`: `backbone.fc = nn.Identity()`). Here:

- `vit_tiny | vit_small | vit_base` (models/vit.py): the class token after the final norm, (B, embed_dim);
- `resnet18 | resnet34 | resnet50 | resnet101 | resnet152`: torchvision's model with its default init and `fc`
  replaced by `nn.Identity()`, so its output is the globally average-pooled last stage, (B, 512 | 2048), and its
  state dict has torchvision's keys without `fc.*` (what the official code saves);
- `timm/<name>`: `timm.create_model(name, pretrained=False, num_classes=0)`, timm's pooled features,
  (B, model.head_hidden_size); needs the `timm` extra (`pip install 'fastdino[timm]'`). With num_classes=0 a timm
  model returns `forward_head(pre_logits=True)`, whose width timm names `head_hidden_size`: `num_features` (the last
  stage's channels) for most, but the conv head after pooling of MobileNetV3/V4, GhostNet and LCNet is wider
  (mobilenetv3_small_050: 288 channels, 1024 features).

Every builder gives `(module, feature_dim)`: the head's input size comes from here. This module imports nothing
from engine/, methods/ or data/ (DESIGN.md floor 2).
"""

from __future__ import annotations

import torch
from torch import nn

from fastdino.errors import ConfigError, MissingDependencyError
from fastdino.models.vit import build_backbone as build_vit
from fastdino.models.vit import model_names as vit_names

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
RESNET_BLOCKS = {"resnet18": ((2, 2, 2, 2), False), "resnet34": ((3, 4, 6, 3), False),
                 "resnet50": ((3, 4, 6, 3), True), "resnet101": ((3, 4, 23, 3), True),
                 "resnet152": ((3, 8, 36, 3), True)}
"""torchvision ResNet -> (blocks per stage, bottleneck blocks): how its weights and other tools' configs show it."""
TIMM_PREFIX = "timm/"
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def arch_names() -> tuple[str, ...]:
    """The fixed names (ViTs, torchvision ResNets); any `timm/<name>` timm builds is accepted too."""
    return vit_names() + TORCHVISION_RESNETS


def is_vit(arch: str) -> bool:
    """fastdino's own ViT (patch size, attention kernel, position embeddings apply), not a convnet or timm model."""
    return arch in vit_names()


def _timm():
    try:
        import timm
    except ImportError as exc:
        raise MissingDependencyError(f"needs the timm package ({exc}): pip install 'fastdino[timm]' (or timm)") \
            from exc
    return timm


def check_arch(arch: str) -> None:
    """Refuse a name no builder takes, before anything is built.

    Raises MissingDependencyError for `timm/...` without timm installed, ValueError (message without the key:
    the caller names it) for an unknown name."""
    if arch in arch_names():
        return
    if arch.startswith(TIMM_PREFIX):
        name = arch[len(TIMM_PREFIX):]
        if not _timm().is_model(name):
            raise ValueError(f"{arch!r}: timm has no model {name!r} (timm.list_models('*pattern*') lists its names)")
        return
    raise ValueError(f"{arch!r} is not one of {arch_names()} nor timm/<name> (any model timm builds)")


def build_backbone(arch: str, **vit_kwargs) -> tuple[nn.Module, int]:
    """The backbone `arch` names and its feature width: (module, D); module(x) maps (B, 3, H, W) float images to
    (B, D) features.

    vit_kwargs (img_size, patch_size, depth, drop_path_rate, attention, pos_embed_interp, grad_checkpointing) are
    passed to a ViT; a convnet takes none (the config refuses them, config.VIT_ONLY_KEYS) and a non-empty dict for
    one is a bug (TypeError). Raises what `check_arch` raises for an unknown name."""
    check_arch(arch)
    if is_vit(arch):
        model = build_vit(arch, **vit_kwargs)
        return model, model.embed_dim
    model, dim = _build_convnet(arch, vit_kwargs)
    model.feature_dim = dim  # what `feature_dim` reads back (evaluation heads)
    return model, dim


def _build_convnet(arch: str, vit_kwargs: dict) -> tuple[nn.Module, int]:
    if vit_kwargs:
        raise TypeError(f"{arch} is a convnet: ViT settings {sorted(vit_kwargs)} do not apply")
    if arch in TORCHVISION_RESNETS:
        import torchvision

        model = getattr(torchvision.models, arch)(weights=None)
        dim = model.fc.in_features
        model.fc = nn.Identity()  # as the official MultiCropWrapper: the pooled features, no ImageNet classifier
        return model, dim
    model = _timm().create_model(arch[len(TIMM_PREFIX):], pretrained=False, num_classes=0)
    # the pre-logits width (module docstring); timm < 1.0 has no head_hidden_size and names that width num_features
    return model, int(getattr(model, "head_hidden_size", None) or model.num_features)


def same_network(a: str, b: str) -> bool:
    """Whether two architecture names build the same network with the same state-dict keys: equal names, or a
    torchvision ResNet and timm's model of that name (`resnet50` and `timm/resnet50`: timm's ResNet is torchvision's
    v1.5 network, stride on the 3x3 conv, same key names), so weights saved as one load into the other."""
    def plain(name: str) -> str:
        return name[len(TIMM_PREFIX):] if name[len(TIMM_PREFIX):] in TORCHVISION_RESNETS else name

    return a == b or plain(a) == plain(b)


def feature_dim(backbone: nn.Module) -> int:
    """The width D of a backbone's (B, D) features: a ViT's embed_dim, a convnet's pooled width."""
    return int(backbone.feature_dim) if hasattr(backbone, "feature_dim") else backbone.embed_dim


def check_crop_sizes(backbone: nn.Module, arch: str, sizes: dict[str, int]) -> None:
    """Refuse crop sizes a convnet or timm backbone cannot take, before any step: one forward of two zero images
    (2, 3, S, S) per size on the backbone's device, in eval mode under no_grad, for each `key -> S` of `sizes`
    (the config keys of the crops the method feeds it). A model whose layers shrink a small crop below a kernel, or
    a timm ViT built for one image size, fails there; the first step would otherwise end in a traceback.

    Leaves the backbone as it was: its train/eval flags are restored, eval mode updates no BatchNorm running stats,
    and the forward runs under a forked RNG (nothing a bitwise resume compares changes). fastdino's own ViT is
    skipped (any multiple of its patch works; the config checks that). Raises ConfigError naming the key."""
    if is_vit(arch) or not sizes:
        return
    device = next(backbone.parameters()).device
    modes = [(m, m.training) for m in backbone.modules()]
    backbone.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for key, size in sizes.items():
                try:
                    backbone(torch.zeros(2, 3, size, size, device=device))
                except torch.OutOfMemoryError:
                    raise
                except (RuntimeError, AssertionError, ValueError) as exc:
                    if _is_device_failure(exc):
                        raise
                    raise ConfigError(f"{key}={size}: {arch} cannot take {size} px crops ({_short(exc)}); "
                                      f"{_size_hint(backbone, key)}", key) from None
    finally:
        backbone.train()  # through every module's own train(): timm's LeViT / EfficientFormer / TinyViT / EfficientViT
        for m, training in modes:  # drop the attention-bias cache their eval forward filled with these weights
            m.training = training


def _is_device_failure(exc: BaseException) -> bool:
    """A failure of the device or an allocator, not of the crop size: a CUDA error (torch.AcceleratorError), a
    cuDNN / cuBLAS status (often memory), the CPU allocator. Shape errors are raised by ATen's checks before any
    library runs."""
    accelerator = getattr(torch, "AcceleratorError", None)
    text = str(exc)
    return ((accelerator is not None and isinstance(exc, accelerator))
            or text.startswith(("CUDA error", "cuDNN error", "CUBLAS", "CUDNN")) or "CUBLAS_STATUS" in text
            or "CUDNN_STATUS" in text or "DefaultCPUAllocator" in text)


def _short(exc: BaseException, limit: int = 160) -> str:
    """A library's error message as a short clause of one line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _size_hint(backbone: nn.Module, key: str) -> str:
    """What to change: a timm model built for one input size takes only that size, another wants larger crops."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    if cfg.get("fixed_input_size") and cfg.get("input_size"):
        return f"it takes only {cfg['input_size'][-1]} px images: use a model that takes any size"
    return f"use a larger {key}"


def arch_label(arch: str, patch_size: int) -> str:
    """How reports name a backbone: vit_small/16 (with its patch), resnet50 or timm/<name> (none)."""
    return f"{arch}/{patch_size}" if is_vit(arch) else arch


def has_batchnorms(module: nn.Module) -> bool:
    """Whether any BatchNorm layer is inside (the official `utils.has_batchnorms`: then SyncBatchNorm across GPUs)."""
    return any(isinstance(m, BN_TYPES) for m in module.modules())
