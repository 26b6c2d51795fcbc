"""One way to build any backbone DINO trains: fastdino's ViTs, torchvision ResNets and any timm model.

DINO is architecture-free (Caron et al. 2021, Sec. 3.1: "DINO works on both convnets and ViTs without modifying
the architecture or internal normalizations"); the official `main_dino.py` trains torchvision models by name with
their classifier replaced by an identity (`MultiCropWrapper`: `backbone.fc = nn.Identity()`). Here:

- `vit_tiny | vit_small | vit_base` (models/vit.py): the class token after the final norm, (B, embed_dim);
- `resnet18 | resnet34 | resnet50 | resnet101 | resnet152`: torchvision's model with its default init and `fc`
  replaced by `nn.Identity()`, so its output is the globally average-pooled last stage, (B, 512 | 2048), and its
  state dict has torchvision's keys without `fc.*` (what the official code saves);
- `timm/<name>`: `timm.create_model(name, pretrained=False, num_classes=0)`, timm's pooled features,
  (B, model.num_features); needs the `timm` extra (`pip install 'fastdino[timm]'`).

Every builder gives `(module, feature_dim)`: the head's input size comes from here. This module imports nothing
from engine/, methods/ or data/ (DESIGN.md floor 2).
"""

from __future__ import annotations

from torch import nn

from fastdino.errors import MissingDependencyError
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
    return model, int(model.num_features)


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


def arch_label(arch: str, patch_size: int) -> str:
    """How reports name a backbone: vit_small/16 (with its patch), resnet50 or timm/<name> (none)."""
    return f"{arch}/{patch_size}" if is_vit(arch) else arch


def has_batchnorms(module: nn.Module) -> bool:
    """Whether any BatchNorm layer is inside (the official `utils.has_batchnorms`: then SyncBatchNorm across GPUs)."""
    return any(isinstance(m, BN_TYPES) for m in module.modules())
