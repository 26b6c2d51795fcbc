"""SiT: group masked model learning plus a contrastive class token (Atito et al. 2021, arXiv 2104.03602, Sec. 3;
SPEC "SiT"), on the same engine as DINO.

Each image gives two augmented views (DINO's global-crop recipe, no local crops). On the device, groups of
connected patches of each view are corrupted (data/masking.py); the student ViT sees the corrupted views, a
light decoder on its patch tokens reconstructs the clean views (L1 over the corrupted pixels), and a
projection head on its class token is trained contrastively: against a momentum (EMA) encoder's projections
of the clean views (the paper) or between the two student views (NT-Xent, the reference code), the global
batch as negatives. L = alpha * L_recons + L_contr. Options from the reference code: rotation prediction
(a 4-way head on the class token; the reference has a separate rotation token) and learned task weights.
The EMA teacher is kept in both contrastive modes (the reference code's model EMA) and is what k-NN reads.

Data parallel: the InfoNCE keys are all-gathered and the L1's denominator is the global count of corrupted
pixels (losses/sit.py), and each image's blocks, kinds and rotation are its global row's draw
(data/masking.py `BatchRows`), so P processes of batch B train like one of batch P * B when the corruption
draws no noise or `replace` partner and drop path is off (tests/test_sit_distributed.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastdino.config import Config, SitConfig
from fastdino.data.masking import BatchRows, Corruption, corrupt_images, process_rows, rand_rows
from fastdino.data.multicrop import multicrop_transform
from fastdino.losses.signals import feature_spread
from fastdino.losses.sit import masked_l1, momentum_contrastive_loss, nt_xent_loss, uncertainty_weighted
from fastdino.methods.base import Method, backbone_from_config
from fastdino.models.decoder import ReconstructionDecoder
from fastdino.models.flops import sit_train_flops_per_image
from fastdino.models.vit import VisionTransformer
from fastdino.schedules import cosine_schedule

ROTATIONS = 4


def batch_rows(per_view: int, n_views: int, device: torch.device) -> BatchRows:
    """This process's rows in the step's global batch (one process: all of it)."""
    if dist.is_available() and dist.is_initialized():
        return process_rows(per_view, n_views, dist.get_rank(), dist.get_world_size(), device)
    return process_rows(per_view, n_views, 0, 1, device)


def rotate_quarter_turns(images: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Image i of (B, C, H, H) turned counter-clockwise by turns[i] (B,) int64 quarter turns, in one gather."""
    every = torch.stack([images.rot90(k, dims=(2, 3)) for k in range(ROTATIONS)])  # (4, B, C, H, H)
    return every[turns, torch.arange(images.shape[0], device=images.device)]


def _projector(dim: int, hidden: int, out: int) -> nn.Module:
    """Class token -> contrastive embedding: Linear, GELU, Linear; one Linear when hidden is 0 (the reference)."""
    if not hidden:
        return nn.Linear(dim, out)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out))


class SiTNetwork(nn.Module):
    """Backbone + projection head + reconstruction decoder (+ rotation head, + task log-variances)."""

    def __init__(self, backbone: VisionTransformer, s: SitConfig, attention: str):
        super().__init__()
        dim = backbone.embed_dim
        self.backbone = backbone
        self.projector = _projector(dim, s.proj_hidden_dim, s.proj_dim)
        self.decoder = ReconstructionDecoder(
            dim, backbone.patch_size, s.decoder, s.decoder_hidden_dim, s.decoder_depth, attention=attention
        )
        self.rotation_head = nn.Linear(dim, ROTATIONS) if s.rotation else None
        n_tasks = 2 + int(s.rotation)
        # the reference code starts every task's s at 1.0
        self.task_log_vars = nn.Parameter(torch.ones(n_tasks)) if s.uncertainty_weights else None
        for module in (self.projector, self.rotation_head):
            if module is not None:
                for m in module.modules():
                    if isinstance(m, nn.Linear):
                        nn.init.trunc_normal_(m.weight, std=0.02)
                        nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W) -> features (B, D) class token, projection (B, P), reconstruction (B, 3, H, W),
        and rotation (B, 4) logits / task_log_vars (T,) when enabled."""
        p = self.backbone.patch_size
        tokens = self.backbone.forward_tokens(images)  # (B, 1 + N, D)
        features = tokens[:, 0]
        out = {
            "features": features,
            "projection": self.projector(features),
            "reconstruction": self.decoder(tokens[:, 1:], images.shape[-2] // p, images.shape[-1] // p),
        }
        if self.rotation_head is not None:
            out["rotation"] = self.rotation_head(features)
        if self.task_log_vars is not None:
            out["task_log_vars"] = self.task_log_vars
        return out

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class token (B, D) and its projection (B, P): the momentum encoder's targets, no decoder pass."""
        features = self.backbone(images)
        return features, self.projector(features)


class SiT(Method):
    ARCH_KEYS = {"sit": ("decoder", "decoder_hidden_dim", "decoder_depth", "proj_hidden_dim", "proj_dim", "rotation",
                         "uncertainty_weights")}
    snapshot_images = 8

    def __init__(self, cfg: Config, device: torch.device):
        super().__init__()
        self.cfg = cfg
        m = cfg.model
        student, _ = backbone_from_config(m, student=True)  # a ViT: the config refuses SiT on a convnet
        teacher, _ = backbone_from_config(m, student=False)
        self.student = SiTNetwork(student, cfg.sit, m.attention)
        self.teacher = SiTNetwork(teacher, cfg.sit, m.attention)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)

    def data_transform(self) -> Callable:
        """Two views per image: DINO's two global crops (SPEC "SiT": two augmented views), no local crops."""
        d = self.cfg.data
        return multicrop_transform(
            global_size=d.global_size, local_size=d.local_size, n_local=0, global_scale=d.global_crops_scale,
            local_scale=d.local_crops_scale, blur_sigma=d.blur_sigma, color_strength=d.color_strength,
        )

    def crop_sizes(self) -> dict[str, int]:
        return {"data.global_size": self.cfg.data.global_size}  # two global crops, no local ones

    def corrupt(self, clean: torch.Tensor, group_size: int | None = None,
                generator: torch.Generator | None = None, rows: BatchRows | None = None) -> Corruption:
        """GMML corruption of (B, 3, H, W) clean views per the sit.* settings; `replace` partners come from the
        same group of `group_size` images (one view of the batch); `rows`: the views' place in the global batch."""
        s = self.cfg.sit
        return corrupt_images(
            clean, self.cfg.model.patch_size, s.mask_ratio, s.corruption_kinds(), s.keep_prob, s.grey_prob,
            s.blur_prob, s.blur_sigma, s.max_block, s.min_block, group_size=group_size, generator=generator,
            rows=rows,
        )

    def forward(self, views: list[torch.Tensor], epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = self.cfg.sit
        b = views[0].shape[0]
        # views -> clean (rotated) batch -> corrupted batch, all on the device
        clean = torch.cat(views[:2])  # (2B, 3, H, W): view 1 rows, then view 2 rows
        rows = batch_rows(b, 2, clean.device)  # each image draws as its row of the global batch
        if s.rotation:
            turns = (rand_rows((2 * b,), clean.device, rows=rows) * ROTATIONS).long()  # (2B,) in 0..3
            clean = rotate_quarter_turns(clean, turns)
        corrupted = self.corrupt(clean, group_size=b, rows=rows)

        # student on the corrupted views: reconstruction and projection
        out = self.student(corrupted.images)
        mask = corrupted.mask if s.recons_pixels == "masked" else None
        loss_recons = masked_l1(out["reconstruction"], clean, mask, across_processes=True)
        z = out["projection"]  # (2B, P)

        # contrastive: momentum-encoder targets of the clean views, or the two student views against each other
        if s.contrastive_target == "momentum":
            with torch.no_grad():
                teacher_features, k = self.teacher.embed(clean)  # (2B, D), (2B, P)
            loss_contr = momentum_contrastive_loss(z[:b], z[b:], k[:b], k[b:], s.temperature)
        else:
            teacher_features = None
            loss_contr = nt_xent_loss(z[:b], z[b:], s.temperature)
        losses, adjust = [loss_recons, loss_contr], [0.5, 1.0]  # adjust: the reference's 0.5 for L1
        stats: dict[str, torch.Tensor] = {"loss_recons": loss_recons.detach(), "loss_contrastive": loss_contr.detach()}
        if s.rotation:
            loss_rot = F.cross_entropy(out["rotation"].float(), turns)
            losses.append(loss_rot)
            adjust.append(1.0)
            stats["loss_rotation"] = loss_rot.detach()

        # total
        if s.uncertainty_weights:
            loss = uncertainty_weighted(losses, out["task_log_vars"], adjust)
            stats["weight_recons"] = torch.exp(-out["task_log_vars"][0].detach())
        else:
            loss = s.alpha * loss_recons + sum(losses[1:])
        if self.with_signals:  # log steps only: spread of the features k-NN reads (the teacher's when run)
            features = teacher_features if teacher_features is not None else out["features"].detach()
            spread = feature_spread(features)
            stats.update(feature_std=spread["std"], feature_std_ratio=spread["std_ratio"])
        return loss, stats

    def teacher_momentum(self, step: int, total_steps: int) -> float:
        return cosine_schedule(step, total_steps, self.cfg.sit.momentum_teacher, 1.0)

    @torch.no_grad()
    def snapshot(self, images: torch.Tensor, output_dir: Path, tag: str) -> Path:
        """clean / corrupted / reconstructed / pasted-in (the reconstruction on the corrupted pixels, the clean
        image elsewhere) rows for `images`, as output_dir/sit_reconstructions_<tag>.png.
        The corruption comes from a generator seeded with train.seed, so every snapshot of a run shows the
        same corruption of the same images; the student runs in eval mode (no drop path)."""
        from fastdino.reports.plots import reconstruction_grid

        generator = torch.Generator(device=images.device).manual_seed(self.cfg.train.seed)
        corrupted = self.corrupt(images, generator=generator)
        net = self.student_module()
        was_training = net.training
        net.eval()
        try:
            recon = net(corrupted.images)["reconstruction"].float()
        finally:
            net.train(was_training)
        loss = masked_l1(recon, images, corrupted.mask)
        path = Path(output_dir) / f"sit_reconstructions_{tag}.png"
        pasted = torch.where(corrupted.mask, recon, images)  # the prediction where corrupted, the image elsewhere
        rows = {"clean": images, "corrupted": corrupted.images, "reconstructed": recon, "pasted in": pasted}
        title = f"SiT reconstructions, {tag} of training (L1 over corrupted pixels {float(loss):.3f})"
        return reconstruction_grid(rows, path, title=title)

    def train_flops_per_image(self) -> float:
        m, s = self.cfg.model, self.cfg.sit
        backbone = self.student_module().backbone
        return sit_train_flops_per_image(
            dim=backbone.embed_dim, depth=len(backbone.blocks), patch=m.patch_size, size=self.cfg.data.global_size,
            decoder=s.decoder, decoder_hidden=s.decoder_hidden_dim, decoder_depth=s.decoder_depth,
            proj_hidden=s.proj_hidden_dim, proj_dim=s.proj_dim, momentum=s.contrastive_target == "momentum",
        )

    def feature_backbone(self) -> nn.Module:
        return self.teacher.backbone
