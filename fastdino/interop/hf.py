"""Hugging Face transformers folders in and out: a `ViTModel` (`model.safetensors`, `config.json`) and the
image processor config that gives fastdino's evaluation transform (`preprocessor_config.json`).

Key names (transformers' models/vit/modeling_vit.py, and its DINO converter convert_dino_to_pytorch.py):
`embeddings.{cls_token, position_embeddings, patch_embeddings.projection}`, per block
`encoder.layer.{i}.{layernorm_before, attention.attention.{query, key, value}, attention.output.dense,
layernorm_after, intermediate.dense, output.dense}`, final `layernorm`. The official fused qkv is [q; k; v] by
rows. ViTConfig's layer_norm_eps defaults to 1e-12 while DINO's ViT uses 1e-6: the config says 1e-6.
A `ViTFor*` state dict (`vit.` prefix, `classifier.*`) reads as its backbone.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from fastdino.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
from fastdino.errors import CheckpointError
from fastdino.interop.restated import RestatedBlock, RestatedViT
from fastdino.interop.timm import eval_resize

log = logging.getLogger("fastdino")

WEIGHTS = "model.safetensors"
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


def hf_class_token(folder: Path, x: torch.Tensor, *, use_library: bool = True) -> torch.Tensor:
    """The class token (B, D) of the transformers folder on x (B, 3, S, S): `ViTModel.from_pretrained` when
    transformers is installed (and use_library), else the tensor restatement read from config.json."""
    if use_library:
        try:
            from transformers import ViTModel
            from transformers.utils import logging as hf_logging
        except ImportError:
            ViTModel = None
        if ViTModel is not None:
            bar = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # no "Loading weights" bar in the middle of `fastdino export`
            try:
                model = ViTModel.from_pretrained(folder, add_pooling_layer=False).eval()
            finally:
                if bar:
                    hf_logging.enable_progress_bar()
            return model(pixel_values=x).last_hidden_state[:, 0]
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    return restated_hf(load_file(folder / WEIGHTS), config).class_token(x)
