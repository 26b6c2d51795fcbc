"""Hugging Face transformers folders in and out: a `ViTModel` (`model.safetensors`, `config.json`) and the
image processor config that gives fastdino's evaluation transform (`preprocessor_config.json`).

Key names (transformers' models/vit/modeling_vit.py, and its DINO converter convert_dino_to_pytorch.py):
`embeddings.{cls_token, position_embeddings, patch_embeddings.projection}`, per block
`encoder.layer.{i}.{layernorm_before, attention.attention.{query, key, value}, attention.output.dense,
layernorm_after, intermediate.dense, output.dense}`, final `layernorm`. The official fused qkv is [q; k; v] by
rows. ViTConfig's layer_norm_eps defaults to 1e-12 while DINO's ViT uses 1e-6: the config says 1e-6.
A `ViTFor*` state dict (`vit.` prefix, `classifier.*`) reads as its backbone.

Convnets. A torchvision ResNet goes out as a `ResNetModel` (models/resnet/modeling_resnet.py): `conv1` / `bn1`
are `embedder.embedder.{convolution, normalization}`, block `layer{s}.{j}` is `encoder.stages.{s-1}.layers.{j}`
with `conv{n}` / `bn{n}` as `layer.{n-1}.{convolution, normalization}` and `downsample.{0, 1}` as
`shortcut.{convolution, normalization}`. The config puts the stride where torchvision does (v1.5):
`downsample_in_bottleneck` false puts it on the 3x3 conv, `downsample_in_first_stage` false keeps stage 1 at
stride 1 (its 1x1 shortcut still projects 64 -> 256 channels in a bottleneck ResNet); the features are
`pooler_output` (B, D, 1, 1) flattened. A `timm/<name>` backbone goes out as the timm folder (interop/timm.py)
with `model_type: timm_wrapper`, which `AutoModel` builds as transformers' `TimmWrapperModel` (features:
`pooler_output`, (B, D)) and `AutoImageProcessor` reads from config.json; its state dict keys gain a
`timm_model.` prefix only inside transformers.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from fastdino.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
from fastdino.errors import CheckpointError
from fastdino.interop.restated import RestatedBlock, RestatedViT
from fastdino.interop.timm import eval_resize, from_timm, timm_convnet_config
from fastdino.models.backbones import RESNET_BLOCKS, TORCHVISION_RESNETS
from fastdino.models.backbones import build_backbone as build_any_backbone

log = logging.getLogger("fastdino")

WEIGHTS = "model.safetensors"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
LAYER_NORM_EPS = 1e-6  # models/vit.py, the official vision_transformer.py
PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as image processor configs spell it

_BLOCK = {  # official block key -> transformers' key (after encoder.layer.{i}.)
    "norm1": "layernorm_before", "attn.proj": "attention.output.dense", "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
}
_QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
_TOP = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}


def is_hf_state(state: dict) -> bool:
    return any(k.startswith(("embeddings.", "vit.embeddings.")) for k in state)


def hf_config(*, embed_dim: int, depth: int, heads: int, patch_size: int, img_size: int) -> dict:
    """config.json of a ViTModel with DINO's ViT settings."""
    return {
        "architectures": ["ViTModel"], "model_type": "vit", "hidden_size": embed_dim, "num_hidden_layers": depth,
        "num_attention_heads": heads, "intermediate_size": 4 * embed_dim, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
        "layer_norm_eps": LAYER_NORM_EPS, "image_size": img_size, "patch_size": patch_size, "num_channels": 3,
        "qkv_bias": True, "encoder_stride": patch_size, "dtype": "float32",
    }


def hf_preprocessor_config(img_size: int) -> dict:
    """preprocessor_config.json: fastdino's evaluation transform (data/multicrop.py `eval_transform`): short side
    to size * 256/224 (bicubic), centre crop, ImageNet mean / std. transformers' PIL backend gives the same
    pixels (`AutoImageProcessor.from_pretrained(DIR, backend="pil")`); its default torchvision backend resizes
    the uint8 tensor and differs by a few grey levels."""
    return {
        "image_processor_type": "BitImageProcessor", "do_convert_rgb": True,
        "do_resize": True, "size": {"shortest_edge": eval_resize(img_size)}, "resample": PIL_BICUBIC,
        "do_center_crop": True, "crop_size": {"height": img_size, "width": img_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD),
    }


def preprocessor_crop(folder: Path) -> int | None:
    """The square centre crop a transformers folder's preprocessor_config.json declares (`crop_size`: {height,
    width} or an int), the image size its model is evaluated at; None when the file, or a square crop, is not
    there (then a ResNet folder is read at 224, the official evaluation crop). An unreadable file counts as none:
    it is only a default."""
    try:
        crop = json.loads((folder / PREPROCESSOR_CONFIG).read_text()).get("crop_size")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(crop, dict) and crop.get("height") == crop.get("width"):
        crop = crop.get("height")
    return crop if isinstance(crop, int) and not isinstance(crop, bool) and crop > 0 else None


def to_hf(backbone: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official / fastdino backbone state dict -> ViTModel's (q, k, v split from the fused qkv)."""
    out = {hf: backbone[ours].contiguous() for ours, hf in _TOP.items()}
    depth = len({k.split(".")[1] for k in backbone if k.startswith("blocks.")})
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for ours, hf in _BLOCK.items():
            for p in ("weight", "bias"):
                out[f"{dst}{hf}.{p}"] = backbone[f"{src}{ours}.{p}"].contiguous()
        for p in ("weight", "bias"):
            for name, part in zip(_QKV, backbone[f"{src}attn.qkv.{p}"].chunk(3)):  # rows [q; k; v]
                out[f"{dst}{name}.{p}"] = part.contiguous()
    return out


def from_hf(state: dict[str, torch.Tensor], config: dict | None, source: str) -> dict[str, torch.Tensor]:
    """ViTModel / ViTFor* state dict (+ its config.json, when there is one) -> official backbone names; the
    pooler and a classifier are not part of the backbone and are dropped.

    Raises CheckpointError naming `source` for a config fastdino's ViT cannot express (another activation, an
    MLP not 4x wide), a missing tensor, or a tensor with no place in fastdino's ViT (nothing is dropped
    silently). A layer_norm_eps other than DINO's 1e-6 is read with a warning: fastdino's ViT computes with 1e-6.
    """
    config = config or {}
    if config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{source}: hidden_act {config['hidden_act']!r}; fastdino's ViT uses exact GELU")
    eps = config.get("layer_norm_eps", LAYER_NORM_EPS)
    if eps != LAYER_NORM_EPS:
        log.warning("%s: layer_norm_eps %g; fastdino's ViT (as DINO's) uses %g: its features differ slightly from "
                    "the transformers model's", source, eps, LAYER_NORM_EPS)
    state = {k.removeprefix("vit."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(("classifier.", "pooler."))}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return state[key]

    try:
        out = {ours: take(hf) for ours, hf in _TOP.items()}
        depth = len({k.split(".")[2] for k in state if k.startswith("encoder.layer.")})
        for i in range(depth):
            src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
            for ours, hf in _BLOCK.items():
                for p in ("weight", "bias"):
                    out[f"{dst}{ours}.{p}"] = take(f"{src}{hf}.{p}")
            for p in ("weight", "bias"):
                out[f"{dst}attn.qkv.{p}"] = torch.cat([take(f"{src}{name}.{p}") for name in _QKV])
    except KeyError as exc:
        raise CheckpointError(f"{source}: transformers ViT weights without {exc.args[0]} (fastdino reads ViTs with "
                              "qkv bias)") from None
    unused = sorted(state.keys() - used)
    if unused:
        raise CheckpointError(f"{source}: tensors fastdino's ViT has no place for: {', '.join(unused[:3])}"
                              + (f" (+{len(unused) - 3} more)" if len(unused) > 3 else ""))
    width = out["norm.weight"].numel()
    if config.get("intermediate_size", 4 * width) != 4 * width:
        raise CheckpointError(f"{source}: intermediate_size {config['intermediate_size']} is not 4 x hidden_size "
                              f"{width}, fastdino's ViT MLP ratio")
    return out


def restated_hf(state: dict[str, torch.Tensor], config: dict) -> RestatedViT:
    """transformers' ViTModel read from its own key names and config (eps, heads), as tensors alone."""
    def pair(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return state[f"{name}.weight"].float(), state[f"{name}.bias"].float()

    blocks = [
        RestatedBlock(**{ours.replace("attn.", "").replace("mlp.", ""): pair(f"encoder.layer.{i}.{hf}")
                         for ours, hf in _BLOCK.items()},
                      **{n: pair(f"encoder.layer.{i}.{hf}") for n, hf in zip("qkv", _QKV)})
        for i in range(config["num_hidden_layers"])
    ]
    return RestatedViT(state["embeddings.cls_token"].float(), state["embeddings.position_embeddings"].float(),
                       pair("embeddings.patch_embeddings.projection"), blocks, pair("layernorm"),
                       config["num_attention_heads"], config["layer_norm_eps"])


def _from_pretrained(name: str, folder: Path, **kwargs):
    """transformers' `name`.from_pretrained(folder, **kwargs) in eval mode, without its "Loading weights" bar in
    the middle of `fastdino export`; None when transformers is not installed."""
    try:
        import transformers
        from transformers.utils import logging as hf_logging
    except ImportError:
        return None
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return getattr(transformers, name).from_pretrained(folder, **kwargs).eval()
    finally:
        if bar:
            hf_logging.enable_progress_bar()


def hf_class_token(folder: Path, x: torch.Tensor, *, use_library: bool = True) -> torch.Tensor:
    """The class token (B, D) of the transformers folder on x (B, 3, S, S): `ViTModel.from_pretrained` when
    transformers is installed (and use_library), else the tensor restatement read from config.json."""
    if use_library and (model := _from_pretrained("ViTModel", folder, add_pooling_layer=False)) is not None:
        return model(pixel_values=x).last_hidden_state[:, 0]
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    return restated_hf(load_file(folder / WEIGHTS), config).class_token(x)


# -- convnets ---------------------------------------------------------------------------------------------------
TIMM_WRAPPER = "timm_wrapper"  # transformers' model_type for a timm model (configuration_timm_wrapper.py)
_TV_BLOCK = re.compile(r"layer(\d)\.(\d+)\.(?:(conv|bn)(\d)|downsample\.([01]))\.(\w+)")
_HF_BLOCK = re.compile(r"encoder\.stages\.(\d)\.layers\.(\d+)\.(?:layer\.(\d)\.|shortcut\.)"
                       r"(convolution|normalization)\.(\w+)")
_STEM = {"conv1": "embedder.embedder.convolution", "bn1": "embedder.embedder.normalization"}


def hf_resnet_config(arch: str, backbone: dict[str, torch.Tensor]) -> dict:
    """config.json of a ResNetModel that is torchvision's `arch` (resnet18..152), widths read from its tensors."""
    depths, bottleneck = RESNET_BLOCKS[arch]
    last = "conv3" if bottleneck else "conv2"
    return {
        "architectures": ["ResNetModel"], "model_type": "resnet", "num_channels": 3,
        "embedding_size": backbone["conv1.weight"].shape[0],
        "hidden_sizes": [backbone[f"layer{s}.0.{last}.weight"].shape[0] for s in range(1, 5)],
        "depths": list(depths), "layer_type": "bottleneck" if bottleneck else "basic", "hidden_act": "relu",
        "downsample_in_first_stage": False, "downsample_in_bottleneck": False, "dtype": "float32",
    }


def hf_timm_wrapper_config(arch: str, num_features: int, img_size: int) -> dict:
    """config.json of a `timm/<name>` backbone for transformers' TimmWrapperModel: timm's folder config (with its
    preprocessing at img_size), typed."""
    return {**timm_convnet_config(arch, num_features, img_size), "model_type": TIMM_WRAPPER}


def _to_hf_key(key: str) -> str:
    stem, _, param = key.partition(".")
    if stem in _STEM:
        return f"{_STEM[stem]}.{param}"
    m = _TV_BLOCK.fullmatch(key)
    if m is None:
        raise KeyError(key)
    stage, block, kind, n, down, param = m.groups()
    prefix = f"encoder.stages.{int(stage) - 1}.layers.{block}."
    if down is not None:
        return f"{prefix}shortcut.{('convolution', 'normalization')[int(down)]}.{param}"
    return f"{prefix}layer.{int(n) - 1}.{'convolution' if kind == 'conv' else 'normalization'}.{param}"


def _from_hf_key(key: str) -> str | None:
    for ours, hf in _STEM.items():
        if key.startswith(f"{hf}."):
            return f"{ours}.{key[len(hf) + 1:]}"
    m = _HF_BLOCK.fullmatch(key)
    if m is None:
        return None
    stage, block, n, part, param = m.groups()
    prefix = f"layer{int(stage) + 1}.{block}."
    if n is None:
        return f"{prefix}downsample.{0 if part == 'convolution' else 1}.{param}"
    return f"{prefix}{'conv' if part == 'convolution' else 'bn'}{int(n) + 1}.{param}"


def to_hf_resnet(backbone: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision ResNet backbone state dict (no `fc`) -> ResNetModel's (module docstring)."""
    return {_to_hf_key(k): v.contiguous() for k, v in backbone.items()}


def from_hf_resnet(state: dict[str, torch.Tensor], config: dict, source: str) -> dict[str, torch.Tensor]:
    """ResNetModel / ResNetForImageClassification state dict (+ config.json) -> torchvision's key names; the
    classifier is not part of the backbone and is dropped.

    Raises CheckpointError naming `source` for a config whose network is not torchvision's (the stride on the
    bottleneck's 1x1 conv or in stage 1, another activation) or a tensor no torchvision ResNet has."""
    for key, want in (("downsample_in_bottleneck", False), ("downsample_in_first_stage", False),
                      ("hidden_act", "relu")):
        if config.get(key, want) != want:
            raise CheckpointError(f"{source}: {key} {config[key]!r}; fastdino's torchvision ResNets have {want!r} "
                                  "(the stride on the 3x3 conv, from stage 2, ReLU)")
    state = {k.removeprefix("resnet."): v for k, v in state.items() if not k.startswith("classifier.")}
    out = {k: (_from_hf_key(k), v) for k, v in state.items()}
    stray = sorted(k for k, (ours, _) in out.items() if ours is None)
    if stray:
        raise CheckpointError(f"{source}: tensors a torchvision ResNet has no place for: {', '.join(stray[:3])}"
                              + (f" (+{len(stray) - 3} more)" if len(stray) > 3 else ""))
    return dict(out.values())


def from_hf_timm_wrapper(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TimmWrapperModel state dict (keys with or without `timm_model.`) -> timm's, less a classifier."""
    return from_timm({k.removeprefix("timm_model."): v for k, v in state.items()})


def hf_convnet_features(folder: Path, arch: str, x: torch.Tensor, *, use_library: bool = True) -> torch.Tensor:
    """The pooled features (B, D) of a convnet transformers folder on x (B, 3, H, W), any H, W: `AutoModel`
    (ResNetModel or TimmWrapperModel) `pooler_output` flattened when transformers is installed (and
    use_library), else fastdino's backbone `arch` loaded strictly from the folder's tensors mapped back."""
    if use_library and (model := _from_pretrained("AutoModel", folder)) is not None:
        return model(pixel_values=x).pooler_output.flatten(1)
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    state = load_file(folder / WEIGHTS)
    model, _ = build_any_backbone(arch)
    model.load_state_dict(from_hf_resnet(state, config, str(folder)) if arch in TORCHVISION_RESNETS
                          else from_hf_timm_wrapper(state))  # strict: every key and shape
    return model.eval()(x)
