"""What the interop tests share: checkpoints with random weights at the two tested ViT sizes and of two convnets,
fixed images, and the image size the evaluation commands pick for a file."""

from pathlib import Path
from types import SimpleNamespace

import torch

from fastdino.cli import main
from fastdino.config import config_to_dict, load_config
from fastdino.engine.checkpoint import save_checkpoint
from fastdino.interop.official import init_from_weights, read_dino_weights
from fastdino.methods import build_method

HEAD = ["dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16"]
SIZES = {  # ViT-T/8 at 32 px (all 12 blocks), ViT-S/16 at 224 px (2 blocks: 2 shared CPU cores)
    "vit_tiny_p8_32": ["model.arch=vit_tiny", "model.patch_size=8", "model.img_size=32", "data.global_size=32"],
    "vit_small_p16_224": ["model.arch=vit_small", "model.depth=2", "model.patch_size=16", "model.img_size=224",
                          "data.global_size=224"],
}
CONVNETS = {"resnet18": ["model.arch=resnet18"], "timm_resnet10t": ["model.arch=timm/resnet10t"]}
"""A torchvision ResNet (the smallest) and a tiny timm convnet (timm's ResNet-10-T)."""
ODD_SIZE = 72  # not a multiple of 32: every stride-2 stage rounds (72 -> 36 -> 18 -> 9 -> 5 -> 3)


def checkpoint(path, overrides):
    """A fastdino checkpoint with random weights (the teacher moved away from the student): (config, method)."""
    cfg = load_config(None, overrides)
    method = build_method(cfg, torch.device("cpu"))
    with torch.no_grad():
        for t in method.teacher.state_dict().values():
            if t.is_floating_point():
                t.add_(0.02 * torch.randn_like(t))
    save_checkpoint({"config": config_to_dict(cfg), "step": 3, "student": method.student.state_dict(),
                     "teacher": method.teacher.state_dict()}, path)
    return cfg, method


def export_checkpoint(tmp_path_factory, name: str, overrides: list[str], fmt: str):
    """A `checkpoint` of `overrides` (HEAD added) written by `fastdino export --format fmt` into a fresh folder of
    the session: (config, method, the exported folder)."""
    tmp = tmp_path_factory.mktemp(name)
    cfg, method = checkpoint(tmp / "last.pt", overrides + HEAD)
    assert main(["export", str(tmp / "last.pt"), "--format", fmt, "--out", str(tmp / fmt)]) == 0
    return cfg, method, tmp / fmt


def images(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def assert_loads_back_tensor_for_tensor(cfg, method, exported, kind: str) -> None:
    """`exported` (a folder of `kind`) read back and loaded by train.init_from gives both networks the teacher
    backbone's tensors, bit-equal."""
    weights = read_dino_weights(exported)
    assert weights.kind == kind and weights.spec.arch == cfg.model.arch and weights.image_size == cfg.model.img_size
    fresh = build_method(cfg, torch.device("cpu"))
    init_from_weights(fresh, weights, cfg.dino.norm_last_layer)
    for net in (fresh.student_module(), fresh.teacher):
        for name, t in method.teacher.backbone.state_dict().items():
            assert torch.equal(net.backbone.state_dict()[name], t), name


def eval_image_sizes(monkeypatch, path) -> tuple[int, int]:
    """The image sizes `fastdino knn` and `fastdino finetune` evaluate checkpoint or folder `path` at, flags left
    out (knn_evaluate and finetune stubbed: no images are read)."""
    import fastdino.eval.finetune as finetune_module
    import fastdino.eval.knn as knn_module

    seen = []
    monkeypatch.setattr(knn_module, "knn_evaluate", lambda model, train, val, size, *a, **k: seen.append(size)
                        or SimpleNamespace(top1=0.0, n_val=0, skipped_images=0))
    monkeypatch.setattr(finetune_module, "finetune", lambda model, train, val, size, *a, **k: seen.append(size)
                        or SimpleNamespace(classes=[], top1=0.0, skipped_val=0))
    data = ["--train", str(Path(path).parent), "--val", str(Path(path).parent), "--device", "cpu"]
    assert main(["knn", "--checkpoint", str(path), *data]) == 0
    assert main(["finetune", str(path), *data]) == 0
    return tuple(seen)
