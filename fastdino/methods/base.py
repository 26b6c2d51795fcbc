"""The interface between a self-supervised method and the method-agnostic engine.

A method owns its networks, its loss and any state of its own (DINO's center); the engine owns the
optimizer, the schedules it reads from the method, mixed precision, EMA, checkpoints and logging.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fastdino.config import ModelConfig
from fastdino.models.backbones import build_backbone, is_vit


def backbone_from_config(m: ModelConfig, student: bool) -> tuple[nn.Module, int]:
    """The backbone of `model.*` every method builds on, and its feature width (models/backbones.py). A ViT: the
    student's with stochastic depth (model.drop_path_rate) and, when asked, recomputed blocks
    (model.grad_checkpointing); the teacher's with neither (no gradients). A convnet (torchvision or timm) is built
    as the official code builds it: no ViT setting applies (the config refuses them)."""
    if not is_vit(m.arch):
        return build_backbone(m.arch)
    kwargs = {"img_size": m.img_size, "patch_size": m.patch_size, "attention": m.attention,
              "pos_embed_interp": m.pos_embed_interp, **({"depth": m.depth} if m.depth else {})}
    if student:
        return build_backbone(m.arch, drop_path_rate=m.drop_path_rate, grad_checkpointing=m.grad_checkpointing,
                              **kwargs)
    return build_backbone(m.arch, drop_path_rate=0.0, **kwargs)


class Method(nn.Module):
    """student: trained by the optimizer (the engine may wrap it in DDP); teacher: its EMA copy."""

    student: nn.Module
    teacher: nn.Module
    ARCH_KEYS: dict[str, tuple[str, ...]] = {}
    """Config keys of the method's own section that fix the networks' shapes: a checkpoint must agree on them
    (besides model.* and train.method, which the engine checks for every method)."""
    snapshot_images: int = 0
    """How many images `snapshot` wants (0: the method draws no pictures)."""
    with_signals: bool = False
    """Set by the engine on log steps only: `forward` then adds the method's health signals (device scalars
    named as in engine/health.py, e.g. `teacher_entropy_ratio`, `feature_std_ratio`) to its stats."""

    def data_transform(self) -> Callable:
        """The view transform the method wants: image -> list of views."""
        raise NotImplementedError

    def forward(self, views: list[torch.Tensor], epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """Loss of one batch of views, and detached statistics to log (device tensors: no host sync); with
        `self.with_signals`, the health signals too."""
        raise NotImplementedError

    def teacher_momentum(self, step: int, total_steps: int) -> float:
        raise NotImplementedError

    def frozen_parameters(self, epoch: int) -> list[nn.Parameter]:
        """Student parameters the optimizer must leave untouched in this epoch (DINO's last layer early on:
        no update, no weight decay, no Adam state). Default: none. Backends read it: the DDP one through
        `before_optimizer_step`, DeepSpeed through its partitioned gradients (engine/backends/)."""
        return []

    def before_optimizer_step(self, epoch: int) -> None:
        """After clipping: cancel the gradients of `frozen_parameters(epoch)` (gradient None: AdamW skips them)."""
        for p in self.frozen_parameters(epoch):
            p.grad = None

    def method_state_dict(self) -> dict[str, dict]:
        """State of the method's own outside its networks (DINO: {"center": ...}); each entry becomes a top-level
        checkpoint entry of that name. Default: none."""
        return {}

    def load_method_state_dict(self, state: dict[str, dict]) -> None:
        """Restore what `method_state_dict` returned; `state` holds the same names (KeyError when one is missing)."""

    def snapshot(self, images: torch.Tensor, output_dir: Path, tag: str) -> Path | None:
        """Draw what the method does to `images` ((snapshot_images, 3, H, W) normalised float32 on the device,
        evaluation crops of fixed training images) into a file in output_dir named after `tag` ("start" |
        "end"); returns its path. Must not touch any global RNG or training state (exact resume)."""
        return None

    def feature_backbone(self) -> nn.Module:
        """The network whose output is evaluated by k-NN (DINO: the teacher's backbone)."""
        raise NotImplementedError

    def crop_sizes(self) -> dict[str, int]:
        """The side in pixels of every crop size the backbones see, by config key (`data.global_size` -> 224): the
        engine runs the backbone once on each before training (models.backbones.check_crop_sizes)."""
        raise NotImplementedError

    def train_flops_per_image(self) -> float | None:
        """Model FLOPs (2 per multiply-add) of one image's training step, for TFLOP/s and MFU figures; None
        when the method does not count them."""
        return None

    def student_module(self) -> nn.Module:
        """The student without any DDP wrapper (for checkpoints and EMA)."""
        student = self.student
        return student.module if hasattr(student, "module") else student
