"""Official DINO checkpoints in and out (facebookresearch/dino: `main_dino.py`'s save_dict, `utils.py`'s
`load_pretrained_weights` / `restart_from_checkpoint`, `vision_transformer.py`'s ViT and DINOHead).

Three kinds of file are read, all through `torch.load(weights_only=True)`: no pickled code runs, and the only
global allowed beyond tensors and containers is `argparse.Namespace` (the official `args`, a bag of plain
attributes whose construction runs no code from the file). A file that needs more is refused, naming it.
- fastdino checkpoints (`config`, `student`, `teacher`, `center`, ...), written by engine/trainer.py;
- official full training checkpoints (main_dino.py): `student` (behind DDP: `module.backbone.*`,
  `module.head.*`), `teacher` (`backbone.*`, `head.*`; `module.` too when the head has BatchNorm, the only
  case where the official code wraps the teacher in DDP), `dino_loss` {`center`: (1, K)}, `optimizer`,
  `epoch`, `fp16_scaler`, `args`. Its head's last layer has the old-style weight norm (`weight_g` (K, 1),
  `weight_v` (K, bottleneck)); fastdino's has torch's parametrization (`parametrizations.weight.original0` /
  `original1`): the same two tensors under other names;
- official backbone-only release files: a ViT or torchvision ResNet state dict, possibly under `teacher` /
  `student`, possibly with `module.` / `backbone.` prefixes; timm ViT and ResNet state dicts are the same (a
  classifier `head.*` / `fc.*` is dropped). Other timm models cannot be told from their tensors: they are read
  from fastdino checkpoints (model.arch) and timm / transformers folders (config.json) only;
- the formats of other tools (interop/timm.py, interop/hf.py): a timm or transformers model folder
  (`config.json` + `model.safetensors` or `pytorch_model.bin`), or a `.safetensors` file; a transformers state
  dict (split q / k / v) is recognised by its key names in any file.

Every file becomes a `DinoWeights` (networks in fastdino's key names) whose architecture is read from tensor
shapes (`NetworkSpec`). The ViT's parameter names are the official ones (models/vit.py), so only prefixes and
the weight norm are mapped. `load_teacher_backbone` is the one entry point for evaluation commands. Writing
these layouts (and timm's, transformers') is interop/export.py's.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastdino.errors import CheckpointError, UserError
from fastdino.interop.hf import (
    TIMM_WRAPPER,
    from_hf,
    from_hf_resnet,
    from_hf_timm_wrapper,
    is_hf_state,
    preprocessor_crop,
)
from fastdino.interop.timm import from_timm, timm_folder_arch
from fastdino.models.backbones import (
    RESNET_BLOCKS,
    TIMM_PREFIX,
    TORCHVISION_RESNETS,
    arch_label,
    is_vit,
    same_network,
)
from fastdino.models.backbones import build_backbone as build_any_backbone
from fastdino.models.vit import VisionTransformer, build_backbone, model_names

log = logging.getLogger("fastdino")

SAFE_GLOBALS = [argparse.Namespace]
"""Allowed in a file beyond tensors and containers: the official checkpoints' pickled `args`."""
BACKBONE_KINDS = ("official-backbone", "timm", "hf")
"""DinoWeights kinds that hold a backbone alone (no head, no student, no center)."""
MODEL_FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HEAD_LINEAR_LAYERS = 3  # fastdino's DINOHead: the official default nlayers=3

_OFFICIAL_G, _OFFICIAL_V = "head.last_layer.weight_g", "head.last_layer.weight_v"
_OURS_G = "head.last_layer.parametrizations.weight.original0"  # (K, 1): the weight-norm gain g
_OURS_V = "head.last_layer.parametrizations.weight.original1"  # (K, bottleneck): the direction v
_TO_OURS = {_OFFICIAL_G: _OURS_G, _OFFICIAL_V: _OURS_V}
_TO_OFFICIAL = {v: k for k, v in _TO_OURS.items()}


@dataclass(frozen=True)
class NetworkSpec:
    """A DINO network's architecture as its tensors show it; head fields are None for a backbone alone, and
    `norm_last_layer` is None when nothing tells (a gain of all ones fits both settings)."""

    arch: str
    patch_size: int | None
    img_size: int | None
    depth: int | None
    """None, None, None for a convnet (none of them applies)."""
    out_dim: int | None = None
    hidden_dim: int | None = None
    bottleneck_dim: int | None = None
    head_bn: bool | None = None
    norm_last_layer: bool | None = None


CONFIG_KEYS = {"arch": "model.arch", "patch_size": "model.patch_size", "img_size": "model.img_size",
               "depth": "model.depth", "out_dim": "dino.out_dim", "hidden_dim": "dino.hidden_dim",
               "bottleneck_dim": "dino.bottleneck_dim", "head_bn": "dino.head_bn",
               "norm_last_layer": "dino.norm_last_layer"}
"""The config key that sets each NetworkSpec field."""


@dataclass
class DinoWeights:
    """One checkpoint file in fastdino's key names (the MultiCropNetwork's `backbone.*`, `head.*`).

    kind: "fastdino" | "official" (a full training checkpoint) | one of BACKBONE_KINDS: "official-backbone",
    "timm", "hf" (a backbone alone: `teacher` holds `backbone.*` keys only, `student` and `center` are None).
    center: (K,) float32, or None when the file has none. image_size: the crop size it was trained on
    (fastdino: data.global_size; timm / transformers folders: their config's input size, a transformers ResNet's
    preprocessor_config.json crop; otherwise a ViT's stored position-embedding grid, 224 px for the released
    models and for a convnet file, whose tensors do not say).
    """

    path: Path
    kind: str
    teacher: dict[str, torch.Tensor]
    student: dict[str, torch.Tensor] | None
    center: torch.Tensor | None
    spec: NetworkSpec
    image_size: int


@dataclass
class TeacherBackbone:
    """What `load_teacher_backbone` returns: the model (eval mode, CPU), the crop size it was trained on, the
    kind of file (as DinoWeights.kind) and the architecture read from it."""

    model: VisionTransformer
    image_size: int
    kind: str
    spec: NetworkSpec


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def read_weights_file(path: str | Path) -> Any:
    """torch.load(weights_only=True) with SAFE_GLOBALS allowed, on the CPU.

    Raises CheckpointError naming the file when it is missing, unreadable, or holds pickled objects other
    than SAFE_GLOBALS (loading those would run code from the file).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if unsafe:
            raise CheckpointError(
                f"checkpoint {path} holds a pickled Python object ({unsafe.group(1)}) that fastdino will not load (it "
                "could run code from the file); re-save only its tensors (state dicts) with code you trust"
            ) from None
        raise CheckpointError(f"checkpoint {path} is not a file torch can read: {_unreadable_why(path, exc)}") from exc


def _unreadable_why(path: Path, exc: BaseException) -> str:
    """Why torch.load refused a file, in a few words: torch's own weights_only text (600+ characters on why its
    default changed in 2.6) says nothing useful about a file that is no torch.save output at all (an image, a
    YAML file): a pickle opcode it does not know means just that."""
    why = _one_line(exc)
    if path.stat().st_size == 0:
        return "it is empty"
    if re.search(r"WeightsUnpickler error: Unsupported operand", why):
        with path.open("rb") as f:
            head = f.read(8)
        return f"neither a torch.save archive nor a pickle (it starts with {head!r})"
    why = re.sub(r".*WeightsUnpickler error:\s*", "", why)
    why = re.sub(r"\s*Check the documentation of torch\.load.*", "", why)
    return f"{type(exc).__name__}: {why[:160] + ' ...' if len(why) > 160 else why}"


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file's tensors on the CPU (the format holds tensors only: nothing to refuse); raises
    CheckpointError naming the file when it is unreadable."""
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as exc:  # safetensors raises its own error types for a bad header or a truncated file
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(exc).__name__}: "
                              f"{_one_line(exc)})") from None


def _read_model_folder(path: Path) -> tuple[str, dict[str, torch.Tensor], int | None, str | None]:
    """A timm or transformers model folder -> (kind, backbone state dict in official / torchvision / timm names,
    image size, the architecture when its tensors do not tell: a `timm/<name>` convnet)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        last = path / "last.pt"  # a run's output folder (train.output_dir): its checkpoint is last.pt
        hint = f"; did you mean {last}?" if last.is_file() else ""
        raise CheckpointError(f"{path} is a folder without config.json: name a checkpoint file, or a timm or "
                              f"transformers model folder{hint}")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_file} is not JSON ({_one_line(exc)})") from None
    weights = next((path / n for n in MODEL_FOLDER_WEIGHTS if (path / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"model folder {path} has no weights: expected {' or '.join(MODEL_FOLDER_WEIGHTS)}")
    state = read_safetensors(weights) if weights.suffix == ".safetensors" else read_weights_file(weights)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{weights} holds no state dict of tensors")
    model_type = config.get("model_type") if isinstance(config, dict) else None
    arch = None
    if model_type == "vit":
        kind, backbone = "hf", from_hf(state, config, f"model folder {path}")
        heads, size = config.get("num_attention_heads"), config.get("image_size")
    elif model_type == "resnet":
        kind, backbone = "hf", from_hf_resnet(state, config, f"model folder {path}")
        heads, size = None, preprocessor_crop(path)
    elif model_type == TIMM_WRAPPER or (isinstance(config, dict) and model_type is None and "architecture" in config):
        kind, backbone = ("hf", from_hf_timm_wrapper(state)) if model_type else ("timm", from_timm(state))
        arch = timm_folder_arch(config, backbone)
        heads = (config.get("model_args") or {}).get("num_heads")  # transformers saves `model_args: null`
        size = ((config.get("pretrained_cfg") or {}).get("input_size") or [None])[-1]
    else:
        raise CheckpointError(f"{config_file} describes neither a transformers ViT or ResNet (model_type vit, resnet, "
                              f"{TIMM_WRAPPER}) nor a timm model (architecture)")
    if isinstance(heads, int):
        _check_heads(backbone, heads, f"model folder {path}")
    return kind, backbone, size if isinstance(size, int) else None, arch


@cache
def arch_heads(arch: str) -> int:
    """The number of attention heads of a registered architecture (not visible in the tensors)."""
    return build_backbone(arch, depth=1, img_size=16, patch_size=16).blocks[0].attn.num_heads


def _check_heads(backbone: dict[str, torch.Tensor], heads: int, source: str) -> None:
    width = backbone["norm.weight"].numel() if "norm.weight" in backbone else None
    arch = _arch_by_width().get(width)
    if arch is not None and heads != arch_heads(arch):
        raise CheckpointError(f"{source}: {heads} attention heads; fastdino's {arch} (width {width}) has "
                              f"{arch_heads(arch)}")


@cache
def _arch_by_width() -> dict[int, str]:
    """embed dim -> registry name, asked of the registry's own constructors (a zero-block model is cheap)."""
    return {build_backbone(name, depth=0, img_size=16, patch_size=16).embed_dim: name for name in model_names()}


def network_spec(state: dict[str, torch.Tensor], source: str, norm_last_layer: bool | None = None,
                 arch: str | None = None) -> NetworkSpec:
    """The architecture of a network state dict in fastdino's key names, read from tensor shapes.

    state: `backbone.*` (and `head.*` when there is a head). source names the file in errors. norm_last_layer:
    what the file's settings say, if anything; else it is inferred from the gain g, which stays at 1 when it
    is fixed (False when any g != 1, None when all are 1). arch: the architecture the file's settings name, if any
    (a fastdino checkpoint's model.arch: how a timm convnet is known). Raises CheckpointError for a backbone
    that is neither a ViT nor a convnet `convnet_arch` knows, an embed dim no registered architecture has, or a
    head whose MLP does not have 3 linear layers.
    """
    convnet = convnet_arch(state, source, arch)
    if convnet is not None:
        spec = {"arch": convnet, "patch_size": None, "img_size": None, "depth": None}
        return _with_head(spec, state, source, norm_last_layer)
    required = ("backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed.proj.weight")
    if not all(k in state for k in required):
        raise CheckpointError(f"{source} holds neither a ViT backbone (cls_token, pos_embed, patch_embed.proj.weight) "
                              "nor a torchvision ResNet's (conv1, layer1..4); fastdino reads ViT-T/S/B and "
                              "ResNet-18..152 files, and timm/<name> backbones from fastdino checkpoints and timm or "
                              "transformers folders")
    proj = state["backbone.patch_embed.proj.weight"]  # (D, 3, p, p)
    n_patches = state["backbone.pos_embed"].shape[1] - 1
    side = math.isqrt(n_patches)
    if proj.dim() != 4 or proj.shape[-1] != proj.shape[-2] or side * side != n_patches:
        raise CheckpointError(f"{source}: patch embedding {tuple(proj.shape)} or position grid of {n_patches} is not "
                              "square; fastdino's ViT needs both square")
    dim, patch = proj.shape[0], proj.shape[-1]
    arch = _arch_by_width().get(dim)
    if arch is None:
        known = ", ".join(f"{name} {width}" for width, name in sorted(_arch_by_width().items()))
        raise CheckpointError(f"{source}: embed dim {dim} is no fastdino architecture's ({known})")
    depth = len({k.split(".")[2] for k in state if k.startswith("backbone.blocks.")})
    spec = {"arch": arch, "patch_size": patch, "img_size": side * patch, "depth": depth}
    return _with_head(spec, state, source, norm_last_layer)


def _with_head(spec: dict, state: dict[str, torch.Tensor], source: str, norm_last_layer: bool | None) -> NetworkSpec:
    """The backbone's spec plus the head's fields read from `head.*` (none for a backbone alone)."""
    if _OURS_V in state:
        linears = sorted((int(m.group(1)), v) for k, v in state.items()
                         if (m := re.fullmatch(r"head\.mlp\.(\d+)\.weight", k)) and v.dim() == 2)
        if len(linears) != HEAD_LINEAR_LAYERS:
            raise CheckpointError(f"{source}: the head's MLP has {len(linears)} linear layers; fastdino's DINO head "
                                  f"has {HEAD_LINEAR_LAYERS} (the official nlayers=3)")
        if norm_last_layer is None and _OURS_G in state and not bool((state[_OURS_G] == 1).all()):
            norm_last_layer = False
        spec.update(out_dim=state[_OURS_V].shape[0], hidden_dim=linears[0][1].shape[0],
                    bottleneck_dim=linears[-1][1].shape[0], norm_last_layer=norm_last_layer,
                    head_bn=any(k.startswith("head.mlp.") and k.endswith(".running_mean") for k in state))
    return NetworkSpec(**spec)


# -- convnets (issue 22): torchvision ResNets by their keys, any backbone by a fastdino checkpoint's model.arch ----
CONVNET_EVAL_SIZE = 224  # the official evaluation crop of a convnet file (its tensors do not say)
_RESNET_DEPTHS = {shape: name for name, shape in RESNET_BLOCKS.items()}
"""torchvision ResNets by (blocks per stage, bottleneck blocks)."""


def convnet_arch(state: dict[str, torch.Tensor], source: str, arch: str | None = None) -> str | None:
    """The convnet a `backbone.*` state dict holds: `arch` when the file's settings name a non-ViT, else a
    torchvision ResNet read from its keys (official ResNet files, e.g. dino_resnet50_pretrain.pth), else None (a
    ViT, or nothing known: network_spec refuses it). Raises CheckpointError for ResNet keys of no torchvision depth.
    """
    if arch is not None and not is_vit(arch):
        return arch
    if "backbone.conv1.weight" not in state or "backbone.layer1.0.conv1.weight" not in state:
        return None
    blocks = tuple(len({k.split(".")[2] for k in state if k.startswith(f"backbone.layer{i}.")}) for i in range(1, 5))
    found = _RESNET_DEPTHS.get((blocks, "backbone.layer1.0.conv3.weight" in state))
    if found is None:
        raise CheckpointError(f"{source}: a ResNet with {blocks} blocks per stage is no torchvision ResNet "
                              f"({', '.join(TORCHVISION_RESNETS)})")
    return found


def _without_fc(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("backbone.fc.")}


def _has_batchnorm(state: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith(".running_mean") for k in state)


def spec_differences(found: NetworkSpec, wanted: NetworkSpec) -> list[str]:
    """'config.key: file X vs config Y' for each field both specs know and disagree on (architectures that build
    the same network, `resnet50` and `timm/resnet50`, agree: backbones.same_network)."""
    return [
        f"{CONFIG_KEYS[f.name]}: file {a!r} vs config {b!r}"
        for f in fields(NetworkSpec)
        if (a := getattr(found, f.name)) is not None and (b := getattr(wanted, f.name)) is not None and a != b
        and not (f.name == "arch" and same_network(a, b))
    ]


def _official_network(state: Any, path: Path) -> dict[str, torch.Tensor]:
    """An official network or backbone state dict -> fastdino's key names (prefixes, weight norm)."""
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} holds no ViT state dict (expected tensors, or `teacher` / `student` "
                              "entries holding them)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if is_hf_state(state):
        state = from_hf(state, None, f"checkpoint {path}")
    if not any(k.startswith("backbone.") for k in state):  # a backbone alone (release file, timm state dict)
        return {f"backbone.{k}": v for k, v in from_timm(state).items()}
    return {_TO_OURS.get(k, k): v for k, v in state.items()}


def read_dino_weights(path: str | Path) -> DinoWeights:
    """Read any checkpoint fastdino understands (module docstring) into fastdino's key names.

    The teacher is `teacher` when present (as the official eval scripts' default checkpoint_key), else
    `student`, else the file itself. Raises CheckpointError naming the file for anything else.
    """
    path = Path(path)
    if path.is_dir():
        kind, backbone, size, arch = _read_model_folder(path)
        teacher = {f"backbone.{k}": v for k, v in backbone.items()}
        spec = network_spec(teacher, f"model folder {path}", arch=arch)
        return DinoWeights(path, kind, teacher, None, None, spec, size or spec.img_size or CONVNET_EVAL_SIZE)
    state = read_safetensors(path) if path.suffix == ".safetensors" and path.is_file() else read_weights_file(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict of weights")
    if "config" in state and "teacher" in state:
        config = state["config"]
        spec = network_spec(state["teacher"], f"checkpoint {path}", config.get("dino", {}).get("norm_last_layer"),
                            arch=config.get("model", {}).get("arch"))
        center = state.get("center", {}).get("center")
        image_size = config.get("data", {}).get("global_size", spec.img_size)
        return DinoWeights(path, "fastdino", state["teacher"], state.get("student"), center, spec, image_size)

    net_key = next((k for k in ("teacher", "student") if isinstance(state.get(k), dict)), None)
    teacher = _official_network(state[net_key] if net_key else state, path)
    student = _official_network(state["student"], path) if net_key == "teacher" and "student" in state else None
    args = state.get("args")
    norm_last_layer = getattr(args, "norm_last_layer", None) if isinstance(args, argparse.Namespace) else None
    spec = network_spec(teacher, f"checkpoint {path}", norm_last_layer)
    if spec.patch_size is None:  # a convnet: its `fc` is an identity in the official code (a classifier's is dropped)
        teacher = _without_fc(teacher)
        student = _without_fc(student) if student is not None else None
    if spec.out_dim is None:
        return DinoWeights(path, "official-backbone", teacher, None, None, spec, spec.img_size or CONVNET_EVAL_SIZE)
    dino_loss = state.get("dino_loss")
    center = dino_loss.get("center") if isinstance(dino_loss, dict) else None
    if center is not None:
        if not isinstance(center, torch.Tensor) or center.numel() != spec.out_dim:
            raise CheckpointError(f"checkpoint {path}: dino_loss.center does not have the head's {spec.out_dim} values")
        center = center.reshape(-1).float()
    return DinoWeights(path, "official", teacher, student, center, spec, spec.img_size or CONVNET_EVAL_SIZE)


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def load_exact(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """module.load_state_dict(state) with every key and shape checked first; a mismatch raises CheckpointError
    (`what` names the file and the part) listing the first missing / unexpected keys and wrong shapes."""
    own = module.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(own.keys() & state.keys())
              if state[k].shape != own[k].shape]
    problems = ([f"missing {_few(missing)}"] if missing else []) + (
        [f"unexpected {_few(unexpected)}"] if unexpected else []) + ([f"shapes {_few(shapes)}"] if shapes else [])
    if problems:
        raise CheckpointError(f"{what} do not fit: " + "; ".join(problems))
    module.load_state_dict(state)


def _check_flags(weights: DinoWeights, arch: str | None, patch_size: int | None) -> None:
    """--arch / --patch-size against the file (an --arch that builds the same network passes: same_network)."""
    s = weights.spec
    what = f"checkpoint {weights.path} is a {arch_label(s.arch, s.patch_size)} (read from the file)"
    if arch is not None and not same_network(arch, s.arch):
        raise CheckpointError(f"{what}: --arch {arch} does not match; pass --arch {s.arch} or leave the flag out")
    if patch_size is not None and s.patch_size is None:
        raise CheckpointError(f"{what}: --patch-size applies to ViTs only; leave it out")
    if patch_size is not None and patch_size != s.patch_size:
        raise CheckpointError(f"{what}: --patch-size {patch_size} does not match; pass --patch-size {s.patch_size} "
                              "or leave the flag out")


def load_teacher_backbone(
    path: str | Path, *, arch: str | None = None, patch_size: int | None = None, attention: str = "sdpa"
) -> TeacherBackbone:
    """The teacher backbone (a ViT or a convnet), with its weights, from any checkpoint fastdino reads: a fastdino
    checkpoint, an official full training checkpoint, an official backbone-only release file, or a timm or
    transformers folder (module docstring).

    This is the seam for every evaluation command (k-NN, linear probe, attention maps): the network DINO
    evaluates is the teacher backbone (official eval scripts: checkpoint_key "teacher"). Architecture, depth,
    patch size and stored image size are read from tensor shapes; `arch` / `patch_size` (the `--arch` /
    `--patch-size` flags) are optional and checked against them. The number of heads is the architecture's.
    `attention`: the model's attention kernel (models/attention.py). Returns the model in eval mode on the CPU
    and the crop size it was trained on (TeacherBackbone.image_size), the natural evaluation size. Raises
    CheckpointError (naming the file) for an unreadable or unsafe file, a backbone that is neither a ViT of a
    known width nor a known convnet, a flag that disagrees with the file (an `arch` that builds the same
    network passes: `timm/resnet50` for `resnet50`), or weights that do not fit; UserError for an unknown `arch`.
    """
    if arch is not None and arch not in model_names() + TORCHVISION_RESNETS and not arch.startswith(TIMM_PREFIX):
        raise UserError(f"--arch {arch} is not one of {', '.join(model_names() + TORCHVISION_RESNETS)} nor timm/<name>")
    weights = read_dino_weights(path)
    _check_flags(weights, arch, patch_size)
    s = weights.spec
    backbone = {k.removeprefix("backbone."): v for k, v in weights.teacher.items() if k.startswith("backbone.")}
    if s.patch_size is None:  # a convnet
        model, _ = build_any_backbone(s.arch)
        load_exact(model, backbone, f"checkpoint {weights.path}: teacher backbone weights")
        return TeacherBackbone(model.eval(), weights.image_size, weights.kind, s)
    model = build_backbone(s.arch, img_size=s.img_size, patch_size=s.patch_size, depth=s.depth, attention=attention)
    load_exact(model, backbone, f"checkpoint {weights.path}: teacher backbone weights")
    return TeacherBackbone(model.eval(), weights.image_size, weights.kind, s)


def init_from_weights(method: nn.Module, weights: DinoWeights, norm_last_layer: bool) -> None:
    """train.init_from: load a file's student, teacher and center into a freshly built DINO method.

    method: has `student_module()`, `teacher` (MultiCropNetwork) and `center` (TeacherCenter). norm_last_layer:
    the config's dino.norm_last_layer (a fresh gain of ones says nothing). A backbone-only file sets both
    backbones and leaves head and center as built. A full file without a student gives its teacher to both.
    Raises CheckpointError naming the file and every config key whose value disagrees with the file.
    """
    wanted = network_spec(method.teacher.state_dict(), "the config", norm_last_layer, arch=method.cfg.model.arch)
    diffs = spec_differences(weights.spec, wanted)
    if diffs:
        raise CheckpointError(f"train.init_from={weights.path} is another architecture than the config: "
                              + "; ".join(diffs) + "; set these keys to the file's values")
    student, teacher = method.student_module(), method.teacher
    if weights.kind in BACKBONE_KINDS:
        load_exact(student, {**student.state_dict(), **weights.teacher}, f"train.init_from={weights.path}: backbone")
        load_exact(teacher, {**teacher.state_dict(), **weights.teacher}, f"train.init_from={weights.path}: backbone")
        log.info("train.init_from: student and teacher backbones from %s (a backbone alone: head and center start "
                 "fresh)", weights.path)
        return
    load_exact(student, weights.student or weights.teacher, f"train.init_from={weights.path}: student weights")
    load_exact(teacher, weights.teacher, f"train.init_from={weights.path}: teacher weights")
    if weights.center is not None:
        method.center.center.copy_(weights.center)
    log.info("train.init_from: student, teacher%s from %s (%s checkpoint); iteration 0, fresh optimizer",
             " and center" if weights.center is not None else " (no center in the file: zeros)", weights.path,
             weights.kind)


def _official_keys(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + _TO_OFFICIAL.get(k, k): v.contiguous() for k, v in state.items()}


def to_official(weights: DinoWeights) -> dict:
    """The official full-checkpoint layout, as main_dino.py saves it and `restart_from_checkpoint` loads it.

    `student` keys carry `module.` (the official student is always behind DDP, and restart_from_checkpoint loads
    into it with strict=False, so keys without the prefix would silently load nothing); `teacher` keys carry it
    only with BatchNorm in the network (a convnet, or dino.head_bn: the official code wraps the teacher in DDP
    only when `has_batchnorms`). Head: weight_g /
    weight_v. `dino_loss`: {"center": (1, K)}. No `optimizer` (its parameter groups differ from the official
    ones), `epoch` or `args`: main_dino.py warm-starts from these weights at epoch 0, and the file holds only
    tensors, so torch.load's default weights_only=True (torch >= 2.6) reads it. Raises CheckpointError for a
    backbone without a head.
    """
    if weights.spec.out_dim is None:
        raise CheckpointError(f"checkpoint {weights.path} has no DINO head (a SiT run, or a backbone alone): export "
                              "its backbone with --format official-backbone, hub, timm or hf")
    center = weights.center if weights.center is not None else torch.zeros(weights.spec.out_dim)
    return {
        "student": _official_keys(weights.student or weights.teacher, "module."),
        "teacher": _official_keys(weights.teacher, "module." if _has_batchnorm(weights.teacher) else ""),
        "dino_loss": {"center": center.reshape(1, -1).clone()},
    }


def to_official_backbone(weights: DinoWeights) -> dict[str, torch.Tensor]:
    """The release layout (dino_deitsmall16_pretrain.pth, dino_resnet50_pretrain.pth): the teacher backbone's state
    dict, no prefix (a ResNet: torchvision's keys without `fc.*`, which official eval_knn.py --arch resnet50 loads
    with its `fc` an identity); hubconf.py loads it with strict=True, load_pretrained_weights with strict=False."""
    teacher = weights.teacher
    return {k.removeprefix("backbone."): v.contiguous() for k, v in teacher.items() if k.startswith("backbone.")}
