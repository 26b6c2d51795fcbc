"""`fastdino export`: a checkpoint's teacher in another tool's format, checked on the spot, written atomically.

Formats (EXPORT_FORMATS): `official` (main_dino.py's full checkpoint), `official-backbone` and its alias `hub`
(the released *_pretrain.pth layout that facebookresearch/dino's hubconf.py loads), `timm` (a folder for
`timm.create_model("local-dir:DIR", pretrained=True)`), `hf` (a folder for transformers'
`ViTModel.from_pretrained(DIR, add_pooling_layer=False)` and `AutoImageProcessor`). Weights in folders are safetensors.

Convnets. `timm`: a torchvision ResNet as timm's ResNet of that depth (the same network and key names), a
`timm/<name>` backbone as `<name>`; `hf`: a torchvision ResNet as a `ResNetModel` (+ preprocessor_config.json),
a `timm/<name>` backbone as the timm folder typed `timm_wrapper`, which transformers' `AutoModel` /
`AutoImageProcessor` load as `TimmWrapperModel` (interop/hf.py). Their preprocessing is fastdino's evaluation
transform at the checkpoint's global crop (DinoWeights.image_size: data.global_size, 224 for an official file),
as a ViT folder's is at its img_size, so that the export is evaluated as the checkpoint is. Their check
compares pooled features (B, D) on a CONVNET_CHECK_SIZE input. The official layouts (`official`,
`official-backbone`, `hub`) take torchvision ResNets (and `timm/resnetN`, the same network and keys) but refuse
any other `timm/<name>` backbone before any work (official_layout_refusal).

The check: the written files are loaded back as the target loads them (timm or transformers when installed,
else a tensor restatement of that library's ViT, interop/restated.py; the official layouts always by the
restatement; a convnet without its library: fastdino's backbone loaded strictly from the written tensors mapped
back) and must give fastdino's class tokens, on a fixed input at the stored grid, within CHECK_ATOL in fp32.
timm's own "Loading pretrained weights from local directory" line is silenced during the check (it would name
the temporary folder). Everything is written into a temporary folder beside the output and renamed into place
only after the check passes: a failed export leaves nothing. What is published gets the mode a plain open() /
mkdir would give (file_modes.plain_mode), not the temporary's 0600 / 0700.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from fastdino.errors import CheckpointError, UserError
from fastdino.file_modes import fsync_path, plain_mode
from fastdino.interop.hf import (
    hf_class_token,
    hf_config,
    hf_convnet_features,
    hf_preprocessor_config,
    hf_resnet_config,
    hf_timm_wrapper_config,
    to_hf,
    to_hf_resnet,
)
from fastdino.interop.official import (
    DinoWeights,
    arch_heads,
    load_exact,
    read_dino_weights,
    to_official,
    to_official_backbone,
)
from fastdino.interop.restated import from_fused_qkv
from fastdino.interop.timm import (
    timm_class_token,
    timm_config,
    timm_convnet_config,
    timm_convnet_features,
    to_timm,
)
from fastdino.models.backbones import TIMM_PREFIX, TORCHVISION_RESNETS, is_vit
from fastdino.models.backbones import build_backbone as build_any_backbone
from fastdino.models.vit import build_backbone

EXPORT_FORMATS = ("official", "official-backbone", "hub", "timm", "hf")
FOLDER_FORMATS = ("timm", "hf")
FOLDER_FILES = {"timm": ("config.json", "model.safetensors"),
                "hf": ("config.json", "model.safetensors", "preprocessor_config.json")}
"""What each folder format writes."""
FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".pkl", ".tar", ".json")
"""Names that say "a file": refused as --out of a folder format (`--out model.pth` would be a folder)."""
CHECK_ATOL = 1e-5
"""Largest |class token - fastdino's| the check accepts (fp32): all formats hold the same fp32 tensors, so only
the order of float operations differs."""
CHECK_BATCH = 2
CONVNET_CHECK_SIZE = 64
"""The check's image size for a convnet (no stored grid; pooled features work at any size)."""


class ExportCheckError(CheckpointError):
    """The exported model, loaded back, does not give fastdino's features: nothing is written."""


def official_layout_refusal(arch: str, fmt: str, src: Path) -> str | None:
    """Why an official layout cannot hold backbone `arch`, or None when it can (a ViT, a torchvision ResNet, or
    `timm/resnetN`, which is one).

    Refused rather than made readable: those layouts are a bare state dict in which nothing names the timm model,
    and their readers (main_dino.py, eval_knn.py, hubconf.py) build only their ViTs and torchvision ResNets, so no
    reader could use the file; fastdino reading it back would need every reader (knn, linear, finetune,
    train.init_from, export) to be told the model. The timm and hf folders name it in config.json and are read
    back by all of them."""
    if fmt in FOLDER_FORMATS or is_vit(arch) or arch.removeprefix(TIMM_PREFIX) in TORCHVISION_RESNETS:
        return None
    return (f"--format {fmt}: checkpoint {src} holds a {arch} backbone, which the official DINO code cannot build "
            "and whose official layout (a bare state dict) does not name it; use --format timm or hf, which keep "
            "the architecture")


def default_out(src: Path, fmt: str) -> Path:
    """<src stem>_<format>.pth beside src for the file formats, <src stem>_<format>/ for the folder formats."""
    name = f"{src.stem}_{fmt.replace('-', '_')}"
    return src.with_name(name if fmt in FOLDER_FORMATS else f"{name}.pth")


def _check_out(src: Path, out: Path, fmt: str) -> None:
    if out.resolve() == src.resolve():
        raise UserError(f"export would overwrite its source {src}; pass another --out")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: its folder {out.parent} does not exist (an export makes no folders above "
                        f"its own: mkdir -p {out.parent})")
    suffix = out.suffix.lower()
    if fmt in FOLDER_FORMATS and suffix in FILE_SUFFIXES and not out.is_dir():
        raise UserError(f"--out {out} names a {suffix} file: the {fmt} format writes a folder "
                        f"({', '.join(FOLDER_FILES[fmt])}); name a folder, e.g. --out {out.with_suffix('')}")
    if fmt not in FOLDER_FORMATS and suffix in (".safetensors", ".json", ".yaml", ".yml", ".txt"):
        raise UserError(f"--out {out}: the {fmt} format writes a torch.save file, not {suffix[1:]} (readers go by "
                        "the name): name it .pth, or use --format timm or hf for safetensors weights")
    if fmt in FOLDER_FORMATS:
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file: the {fmt} format writes a folder; name a new one")
        if out.exists() and any(out.iterdir()):
            raise UserError(f"--out {out} exists and is not an empty folder: the {fmt} format writes a folder; "
                            "name a new one")
    elif out.is_dir():
        raise UserError(f"--out {out} is a folder: the {fmt} format writes one file; name it")
    elif out.exists():
        raise UserError(f"--out {out} exists: an export never replaces a file; remove it or name another")


def _write(fmt: str, weights: DinoWeights, stage: Path) -> Path:
    """Write the format into `stage` (a fresh temporary folder); returns the file or folder to publish."""
    from safetensors.torch import save_file

    s = weights.spec
    backbone = to_official_backbone(weights)
    if fmt in ("official", "official-backbone", "hub"):
        path = stage / "weights.pth"
        torch.save(to_official(weights) if fmt == "official" else backbone, path)
        return path
    folder = stage / "model"
    folder.mkdir()
    if not is_vit(s.arch):
        return _write_convnet(fmt, s.arch, backbone, folder, weights.image_size)
    shape = {"embed_dim": backbone["norm.weight"].numel(), "depth": s.depth, "heads": arch_heads(s.arch),
             "patch_size": s.patch_size, "img_size": s.img_size}
    if fmt == "timm":
        save_file(to_timm(backbone), folder / "model.safetensors", metadata={"format": "pt"})
        config = timm_config(s.arch, **shape)
    else:
        save_file(to_hf(backbone), folder / "model.safetensors", metadata={"format": "pt"})
        config = hf_config(**shape)
        (folder / "preprocessor_config.json").write_text(json.dumps(hf_preprocessor_config(s.img_size), indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def _write_convnet(fmt: str, arch: str, backbone: dict[str, torch.Tensor], folder: Path, image_size: int) -> Path:
    """A convnet backbone's timm or transformers folder, its preprocessing at image_size (module docstring)."""
    from safetensors.torch import save_file

    model, dim = build_any_backbone(arch)  # the widths of a timm model are not in its tensors
    # config.json's num_features is timm's attribute (informational, as timm's push_to_hub writes it): the last
    # stage's channels, narrower than the features for a conv head after pooling (MobileNetV3); a ResNet's is D
    num_features = getattr(model, "num_features", dim)
    tv = arch in TORCHVISION_RESNETS
    if fmt == "timm":
        weights, config = to_timm(backbone), timm_convnet_config(arch, num_features, image_size)
    elif tv:
        weights, config = to_hf_resnet(backbone), hf_resnet_config(arch, backbone)
        (folder / "preprocessor_config.json").write_text(json.dumps(hf_preprocessor_config(image_size), indent=2))
    else:  # TimmWrapperModel's image processor reads config.json's pretrained_cfg
        weights, config = to_timm(backbone), hf_timm_wrapper_config(arch, num_features, image_size)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@contextlib.contextmanager
def _quiet_timm():
    """timm's INFO lines (its loader names the temporary folder) off; its warnings stay."""
    logger = logging.getLogger("timm")
    level = logger.level
    logger.setLevel(max(logging.WARNING, level))
    try:
        yield
    finally:
        logger.setLevel(level)


def _official_class_token(path: Path, fmt: str, heads: int, x: torch.Tensor) -> torch.Tensor:
    """An official file read as the official code reads it: torch.load, then the teacher backbone (a full
    checkpoint: `teacher`, keys `backbone.*`, behind `module.` with a BatchNorm head) or the whole state dict."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if fmt == "official":
        teacher = {k.removeprefix("module."): v for k, v in state["teacher"].items()}
        state = {k.removeprefix("backbone."): v for k, v in teacher.items() if k.startswith("backbone.")}
    return from_fused_qkv(state, heads).class_token(x)


def _official_convnet_features(path: Path, fmt: str, arch: str, x: torch.Tensor) -> torch.Tensor:
    """A convnet's official file read as eval_knn.py reads it (the teacher's `backbone.*` without `module.`, or
    the whole state dict) into a fresh backbone whose classifier is an identity: its pooled features (B, D)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if fmt == "official":
        teacher = {k.removeprefix("module."): v for k, v in state["teacher"].items()}
        state = {k.removeprefix("backbone."): v for k, v in teacher.items() if k.startswith("backbone.")}
    model, _ = build_any_backbone(arch)
    load_exact(model, state, f"exported {path.name}")
    return model.eval()(x)


def exported_class_token(fmt: str, written: Path, heads: int, x: torch.Tensor, use_library: bool = True):
    """The class token (B, D) the written export gives on x, loaded as its target loads it (module docstring)."""
    if fmt == "timm":
        return timm_class_token(written, x, use_library=use_library)
    if fmt == "hf":
        return hf_class_token(written, x, use_library=use_library)
    return _official_class_token(written, fmt, heads, x)


def exported_convnet_features(fmt: str, written: Path, arch: str, x: torch.Tensor, use_library: bool = True):
    """A convnet export's pooled features (B, D) on x, loaded as its target loads it (module docstring)."""
    if fmt == "timm":
        return timm_convnet_features(written, arch, x, use_library=use_library)
    if fmt == "hf":
        return hf_convnet_features(written, arch, x, use_library=use_library)
    return _official_convnet_features(written, fmt, arch, x)


def fastdino_class_token(weights: DinoWeights, x: torch.Tensor) -> torch.Tensor:
    """The teacher backbone's class token (B, D) on x, as fastdino's own ViT computes it (fp32, eval mode); a
    convnet's pooled features."""
    s = weights.spec
    if is_vit(s.arch):
        model = build_backbone(s.arch, img_size=s.img_size, patch_size=s.patch_size, depth=s.depth, attention="sdpa")
    else:  # a convnet: its pooled features play the class token's part
        model, _ = build_any_backbone(s.arch)
    load_exact(model, {k: v.float() for k, v in to_official_backbone(weights).items()},
               f"checkpoint {weights.path}: teacher backbone weights")
    return model.eval()(x)


def export(src: str | Path, out: str | Path | None = None, fmt: str = "official", *,
           use_library: bool = True) -> Path:
    """Write checkpoint `src` (anything read_dino_weights reads) in format `fmt` at `out` (default_out when
    None), after the on-the-spot check (module docstring). use_library=False checks with the tensor
    restatement even when timm / transformers are installed (tests). Returns the path written.

    Raises UserError before any work for an unknown format, an unusable `out` (the file formats: not a
    folder, nor a .safetensors name; the folder formats: a new or empty folder, not named like a file
    (FILE_SUFFIXES); its parent must exist) or an official layout of a timm backbone it cannot hold
    (official_layout_refusal), CheckpointError for a source
    that cannot be read or has no DINO head for `official`, and ExportCheckError when the check fails.
    """
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
    src = Path(src)
    if out and fmt not in FOLDER_FORMATS and str(out).endswith(("/", os.sep)):  # Path() would drop the slash
        raise UserError(f"--out {out} names a folder: the {fmt} format writes one file; name it, e.g. "
                        f"--out {Path(out) / default_out(src, fmt).name}")
    out = Path(out) if out else default_out(src, fmt)
    _check_out(src, out, fmt)
    weights = read_dino_weights(src)
    s = weights.spec
    refusal = official_layout_refusal(s.arch, fmt, src)
    if refusal:
        raise UserError(refusal)
    vit = is_vit(s.arch)
    size = s.img_size if vit else CONVNET_CHECK_SIZE
    x = torch.randn(CHECK_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    target = Path(os.path.realpath(out))  # an empty folder reached through a link: the folder it names is replaced
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with torch.no_grad():
            reference = fastdino_class_token(weights, x)
            written = _write(fmt, weights, stage)
            try:
                with _quiet_timm():
                    got = (exported_class_token(fmt, written, arch_heads(s.arch), x, use_library) if vit else
                           exported_convnet_features(fmt, written, s.arch, x, use_library)).float()
            except Exception as exc:  # the target library refusing the files is a failed check too
                raise ExportCheckError(f"export of {src} to {fmt} refused: the written model does not load back "
                                       f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); nothing "
                                       "written") from exc
        err = (got - reference).abs().max().item() if got.shape == reference.shape else float("inf")
        if not err <= CHECK_ATOL:
            raise ExportCheckError(f"export of {src} to {fmt} refused: loaded back, it gives "
                                   f"{'class tokens' if vit else 'pooled features'} that "
                                   f"differ from fastdino's by {err:.3g} (> {CHECK_ATOL:g}) on a fixed input; "
                                   "nothing written")
        plain_mode(written)  # the temporary folder's files may be 0600 (safetensors' save_file): as open() gives
        for path in [written, *written.rglob("*")] if written.is_dir() else [written]:
            if path.is_file():
                fsync_path(path)
        if written.is_dir() and target.is_dir():
            target.rmdir()  # empty (checked above): rename needs the name free
        os.replace(written, target)
        fsync_path(target.parent)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out
