"""DINO: self-distillation with no labels (Caron et al. 2021, Alg. 1 and Sec. 3.1).

Student and teacher are a backbone (a ViT, a torchvision ResNet or a timm model: models/backbones.py) plus the
DINO head. Every crop goes through the student, the two
global crops through the teacher; crops of one resolution share one backbone call. After the loss,
the center takes the batch mean of the teacher logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fastdino.config import Config
from fastdino.data.multicrop import multicrop_transform
from fastdino.losses.dino import TeacherCenter, dino_loss, resolve_loss_impl
from fastdino.losses.signals import distribution_signals, feature_spread
from fastdino.methods.base import Method, backbone_from_config
from fastdino.models.flops import backbone_forward_flops, head_forward_flops
from fastdino.models.heads import DINOHead
from fastdino.schedules import cosine_schedule, teacher_temp_schedule
from fastdino.telemetry import phase


class MultiCropNetwork(nn.Module):
    """Backbone + head over a list of crops; names (`backbone.*`, `head.*`) follow the official wrapper."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(
        self, views: list[torch.Tensor], return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """views: crops, consecutive ones of equal size batched together -> (n_views*B, K), and the backbone
        features (n_views*B, D) too when `return_features`."""
        features, start = [], 0
        while start < len(views):
            end = start + 1
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            features.append(self.backbone(torch.cat(views[start:end])))  # (n*B, D)
            start = end
        features = torch.cat(features)  # (n_views*B, D)
        logits = self.head(features)  # (n_views*B, K)
        return (logits, features) if return_features else logits


class DINO(Method):
    ARCH_KEYS = {"dino": ("out_dim", "hidden_dim", "bottleneck_dim", "norm_last_layer", "head_bn")}

    def __init__(self, cfg: Config, device: torch.device):
        super().__init__()
        self.cfg = cfg
        d = cfg.dino

        def head(dim: int) -> DINOHead:
            return DINOHead(dim, d.out_dim, d.hidden_dim, d.bottleneck_dim, d.norm_last_layer, use_bn=d.head_bn)

        backbone, dim = backbone_from_config(cfg.model, student=True)
        self.student = MultiCropNetwork(backbone, head(dim))
        teacher_backbone, dim = backbone_from_config(cfg.model, student=False)
        self.teacher = MultiCropNetwork(teacher_backbone, head(dim))
        self.feature_dim = dim
        """The backbone's feature width D, the head's input."""
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.center = TeacherCenter(d.out_dim, d.center_momentum)
        self.loss_impl = resolve_loss_impl(cfg.loss.impl, device)

    def data_transform(self) -> Callable:
        d = self.cfg.data
        return multicrop_transform(
            global_size=d.global_size,
            local_size=d.local_size,
            n_local=d.local_crops_number,
            global_scale=d.global_crops_scale,
            local_scale=d.local_crops_scale,
            blur_sigma=d.blur_sigma,
            color_strength=d.color_strength,
        )

    def crop_sizes(self) -> dict[str, int]:
        d = self.cfg.data
        local = {"data.local_size": d.local_size} if d.local_crops_number else {}
        return {"data.global_size": d.global_size, **local}

    def forward(self, views: list[torch.Tensor], epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        d = self.cfg.dino
        teacher_temp = teacher_temp_schedule(epoch, d.warmup_teacher_temp, d.teacher_temp, d.warmup_teacher_temp_epochs)
        with torch.no_grad(), phase("teacher forward"):
            if self.with_signals:
                teacher_logits, teacher_features = self.teacher(views[:2], return_features=True)  # (2B, K), (2B, D)
            else:
                teacher_logits = self.teacher(views[:2])  # (2B, K)
        with phase("student forward"):
            student_logits = self.student(views)  # (n_crops*B, K)
        with phase("loss"):
            loss, teacher_sum = dino_loss(
                student_logits, teacher_logits, self.center.center, d.student_temp, teacher_temp, impl=self.loss_impl
            )
        stats = {"teacher_temp": teacher_temp}
        if self.with_signals:  # log steps only; before the center update: the center this loss used
            stats.update(self.health_signals(loss, teacher_logits, teacher_features, teacher_temp))
        with phase("center update"):
            self.center.update(teacher_sum, teacher_logits.shape[0])
        return loss, stats

    @torch.no_grad()
    def health_signals(
        self, loss: torch.Tensor, teacher_logits: torch.Tensor, teacher_features: torch.Tensor, teacher_temp: float
    ) -> dict[str, torch.Tensor]:
        """Collapse signals of one step (engine/health.py), fp32 device scalars; one extra pass over the teacher
        logits. KL(P_t || P_s) averaged over the loss's (t, v) pairs equals the loss minus the mean teacher
        entropy, because every teacher view has the same number of partners: no pass over the student."""
        with torch.autocast(teacher_logits.device.type, enabled=False):
            center = self.center.center.float()
            log_p_t = F.log_softmax((teacher_logits.float() - center) / teacher_temp, dim=-1)  # (2B, K)
            ent = distribution_signals(log_p_t)
            spread = feature_spread(teacher_features)  # the teacher's class token: what k-NN evaluates
            return {
                "teacher_entropy": ent["entropy"],
                "teacher_entropy_ratio": ent["entropy_ratio"],
                "teacher_mean_entropy": ent["mean_entropy"],
                "teacher_mean_entropy_ratio": ent["mean_entropy_ratio"],
                "kl_student_teacher": loss.detach().float() - ent["entropy"],
                "feature_std": spread["std"],
                "feature_std_ratio": spread["std_ratio"],
                "center_norm": torch.linalg.vector_norm(center),
            }

    def teacher_momentum(self, step: int, total_steps: int) -> float:
        return cosine_schedule(step, total_steps, self.cfg.dino.momentum_teacher, 1.0)

    def method_state_dict(self) -> dict[str, dict]:
        return {"center": self.center.state_dict()}

    def load_method_state_dict(self, state: dict[str, dict]) -> None:
        self.center.load_state_dict(state["center"])

    def frozen_parameters(self, epoch: int) -> list[nn.Parameter]:
        """The last head layer during the first `dino.freeze_last_layer_epochs` (official: its gradients are
        cancelled after clipping)."""
        if epoch >= self.cfg.dino.freeze_last_layer_epochs:
            return []
        return [p for name, p in self.student_module().named_parameters() if "last_layer" in name]

    def feature_backbone(self) -> nn.Module:
        return self.teacher.backbone

    def train_flops_per_image(self) -> float:
        """Student forward + backward (3x forward) over every crop, teacher forward over the 2 global crops: the
        ViT counted analytically, any other backbone by FlopCounterMode (models/flops.py)."""
        backbone, d, h = self.student_module().backbone, self.cfg.data, self.cfg.dino
        head = head_forward_flops(self.feature_dim, h.hidden_dim, h.bottleneck_dim, h.out_dim)
        glob = backbone_forward_flops(backbone, d.global_size) + head
        local = backbone_forward_flops(backbone, d.local_size) + head if d.local_crops_number else 0.0
        return 3 * (2 * glob + d.local_crops_number * local) + 2 * glob
