"""Consecutive steps of the real `Trainer` against a float64 restatement of the official DINO step (issue 12, 1).

The reference below is written from the definitions in facebookresearch/dino (read, not imported):
- main_dino.py `train_one_epoch`: every iteration sets lr on every parameter group and weight decay on group 0
  only; backward; `clip_gradients`; `cancel_gradients_last_layer`; AdamW step; EMA of the teacher with the
  momentum array; `DINOLoss`: teacher temperature from a per-epoch array, the per-pair loop over (teacher crop,
  student crop != it), centering and sharpening, the center updated after the loss from the raw teacher output.
- utils.py: `cosine_scheduler` (np.linspace warm-up, then a cosine array), `clip_gradients` (per parameter:
  coef = clip / (norm + 1e-6), applied when < 1), `cancel_gradients_last_layer` (grad None during the first
  `freeze_last_layer` epochs), `get_params_groups` (no decay on biases and 1-D parameters).
- vision_transformer.py: pre-norm ViT, `interpolate_pos_encoding` (bicubic resize by the scale factor
  (grid + 0.1) / sqrt(N), not to an exact size), `DINOHead` (MLP, L2 normalisation, weight-normalised last layer).
Everything runs in float64 from fastdino's initial state dict; fastdino runs in float32 on the CPU. The reference was
checked once beside the official code itself (its modules run in float64 on the CPU, same steps, outside the
repository): loss, gradients and center agree to 1e-14, weights to 2e-10.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from fastdino.config import load_config
from fastdino.engine.trainer import Trainer

# Tolerances, float32 against float64, each relative to the largest magnitude of the float64 tensor it checks. Worst
# errors measured over both cases (2-core x86_64 CPU, torch 2.14.1) are given beside each; the tolerances leave 5-20x
# room for other CPUs' float32 kernels, and a 1% error in the lr or the EMA weight, weight decay on the second
# group, another Adam eps or an extra frozen epoch each fail (checked by patching fastdino outside the repository).
LOSS_RTOL = 1e-5  # measured 4.3e-7: float32 sums over K, the crops and the batch
GRAD_RTOL = 2e-4  # measured 2.3e-5: float32 forward and backward through the ViT and the head
PARAM_RTOL = 2e-4  # measured 3.9e-5 on biases, 7.5e-6 on the other tensors: a bias starts at 0, so its scale is a
# few Adam steps, and where a coordinate's two first gradients nearly cancel, Adam's m / sqrt(v) magnifies the float32
# rounding of its gradient
CENTER_RTOL = 1e-5  # measured 5.3e-7: a batch mean of teacher logits

LAST_LAYER = {
    "head.last_layer.parametrizations.weight.original0": "head.last_layer.weight_g",
    "head.last_layer.parametrizations.weight.original1": "head.last_layer.weight_v",
}


def official_name(name: str) -> str:
    """fastdino's parametrized weight norm -> the official `nn.utils.weight_norm` names; the rest are equal."""
    return LAST_LAYER.get(name, name)


# -- the official schedules ---------------------------------------------------------------------------------
def official_cosine(base, final, epochs, niter, warmup_epochs=0, start_warmup=0.0) -> np.ndarray:
    """utils.cosine_scheduler: np.linspace(start, base, warmup iterations), then a half cosine array."""
    warmup = np.linspace(start_warmup, base, warmup_epochs * niter) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter - warmup_epochs * niter)
    return np.concatenate((warmup, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))))


def official_teacher_temps(warmup_temp, temp, warmup_epochs, epochs) -> np.ndarray:
    """DINOLoss.teacher_temp_schedule: one value per epoch."""
    return np.concatenate((np.linspace(warmup_temp, temp, warmup_epochs), np.ones(epochs - warmup_epochs) * temp))


# -- the official forward, float64 --------------------------------------------------------------------------
def keys_cubic(x: torch.Tensor, a: float = -0.75) -> torch.Tensor:
    """Keys' cubic convolution kernel with PyTorch's bicubic constant a = -0.75."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x <= 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def bicubic_matrix(n_in: int, scale: float) -> torch.Tensor:
    """(n_out, n_in) float64 weights of a bicubic resize given a scale factor (align_corners False): output
    floor(n_in * scale) samples, output i reads source position (i + 0.5) / scale - 0.5, borders replicated."""
    n_out = math.floor(n_in * scale)
    mat = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = (i + 0.5) / scale - 0.5
        base = math.floor(src)
        for j in range(base - 1, base + 3):
            mat[i, min(max(j, 0), n_in - 1)] += keys_cubic(torch.tensor(src - j, dtype=torch.float64))
    return mat


def official_pos_embed(pos: torch.Tensor, h: int, w: int, patch: int) -> torch.Tensor:
    """pos: (1, N+1, D) -> (1, gh*gw+1, D): stored as is for the stored square grid, else each grid axis
    resized by the scale factor (grid + 0.1) / sqrt(N) (the official rule)."""
    n = pos.shape[1] - 1
    side, gh, gw = int(math.sqrt(n)), h // patch, w // patch
    if gh * gw == n and h == w:
        return pos
    rows, cols = bicubic_matrix(side, (gh + 0.1) / math.sqrt(n)), bicubic_matrix(side, (gw + 0.1) / math.sqrt(n))
    assert rows.shape[0] == gh and cols.shape[0] == gw
    grid = pos[0, 1:].reshape(side, side, -1)  # (side, side, D), row-major patches
    resized = torch.einsum("ai,ijd,bj->abd", rows, grid, cols).reshape(1, gh * gw, -1)
    return torch.cat((pos[:, :1], resized), dim=1)


def layer_norm(x, weight, bias, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * weight + bias


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2.0)))


def log_softmax(x):
    return x - torch.logsumexp(x, dim=-1, keepdim=True)


def linear(x, p, name):
    return x @ p[name + ".weight"].T + p[name + ".bias"]


def backbone_forward(p: dict, x: torch.Tensor, patch: int, heads: int) -> torch.Tensor:
    """Official ViT on (B, 3, H, W) float64 -> normed class token (B, D)."""
    b, c, h, w = x.shape
    weight = p["backbone.patch_embed.proj.weight"]  # (D, 3, patch, patch): a strided convolution
    d, gh, gw = weight.shape[0], h // patch, w // patch
    pixels = x.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, -1)
    tokens = pixels @ weight.reshape(d, -1).T + p["backbone.patch_embed.proj.bias"]  # (B, N, D)
    tokens = torch.cat((p["backbone.cls_token"].expand(b, 1, d), tokens), dim=1)  # (B, N+1, D)
    x = tokens + official_pos_embed(p["backbone.pos_embed"], h, w, patch)
    n, hd = x.shape[1], d // heads
    depth = len({k.split(".")[2] for k in p if k.startswith("backbone.blocks.")})
    for i in range(depth):
        pre = f"backbone.blocks.{i}."
        y = layer_norm(x, p[pre + "norm1.weight"], p[pre + "norm1.bias"])
        q, k, v = linear(y, p, pre + "attn.qkv").reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        attn = log_softmax(q @ k.transpose(-2, -1) * hd**-0.5).exp()  # (B, heads, N+1, N+1)
        x = x + linear((attn @ v).transpose(1, 2).reshape(b, n, d), p, pre + "attn.proj")
        y = layer_norm(x, p[pre + "norm2.weight"], p[pre + "norm2.bias"])
        x = x + linear(gelu(linear(y, p, pre + "mlp.fc1")), p, pre + "mlp.fc2")
    return layer_norm(x[:, 0], p["backbone.norm.weight"], p["backbone.norm.bias"])


def head_forward(p: dict, f: torch.Tensor) -> torch.Tensor:
    """Official DINOHead without BN: (B, D) -> (B, K)."""
    x = linear(gelu(linear(gelu(linear(f, p, "head.mlp.0")), p, "head.mlp.2")), p, "head.mlp.4")
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # F.normalize
    v, g = p["head.last_layer.weight_v"], p["head.last_layer.weight_g"]
    return x @ (g * v / v.norm(dim=1, keepdim=True)).T  # weight norm over each output row


def network_forward(p, views, patch, heads):
    return head_forward(p, torch.cat([backbone_forward(p, v, patch, heads) for v in views]))


def official_loss(student_out, teacher_out, center, n_crops, student_temp, teacher_temp):
    """DINOLoss.forward: the mean over (teacher crop iq, student crop v != iq) of the batch-mean cross-entropy."""
    student = (student_out / student_temp).chunk(n_crops)
    teacher = log_softmax((teacher_out - center) / teacher_temp).exp().detach().chunk(2)
    total, terms = 0.0, 0
    for iq, q in enumerate(teacher):
        for v in range(n_crops):
            if v != iq:
                total = total + (-q * log_softmax(student[v])).sum(-1).mean()
                terms += 1
    return total / terms


# -- the official step, float64 -----------------------------------------------------------------------------
@dataclass
class OfficialRun:
    """The official training state and its constants; `step` runs one iteration of `train_one_epoch`."""

    student: dict[str, torch.Tensor]
    teacher: dict[str, torch.Tensor]
    center: torch.Tensor
    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temps: np.ndarray
    clip: float
    freeze_last_layer: int
    student_temp: float
    center_momentum: float
    patch: int
    heads: int
    betas: tuple[float, float] = (0.9, 0.999)  # torch.optim.AdamW defaults, which the official code keeps
    eps: float = 1e-8

    def __post_init__(self):
        # get_params_groups: trainable parameters (the weight-norm gain is frozen by norm_last_layer)
        self.trainable = [n for n in self.student if n != "head.last_layer.weight_g"]
        self.regularized = {n for n in self.trainable if not (n.endswith(".bias") or self.student[n].ndim == 1)}
        self.adam: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}
        self.grad_norms: dict[str, float] = {}  # of the last step, before clipping

    def step(self, views: list[torch.Tensor], it: int, epoch: int) -> tuple[float, dict[str, torch.Tensor]]:
        """One iteration; returns the loss and the gradients the optimizer saw (clipped; last layer absent
        while frozen)."""
        lr, wd, m = float(self.lr[it]), float(self.wd[it]), float(self.momentum[it])
        views = [v.double() for v in views]
        with torch.no_grad():
            teacher_out = network_forward(self.teacher, views[:2], self.patch, self.heads)
        leaves = {n: t.clone().requires_grad_(n in self.trainable) for n, t in self.student.items()}
        student_out = network_forward(leaves, views, self.patch, self.heads)
        loss = official_loss(student_out, teacher_out, self.center, len(views), self.student_temp,
                             float(self.teacher_temps[epoch]))
        batch_center = teacher_out.sum(0) / teacher_out.shape[0]
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)

        grads = dict(zip(self.trainable, torch.autograd.grad(loss, [leaves[n] for n in self.trainable])))
        self.grad_norms = {n: float(g.norm(2)) for n, g in grads.items()}
        for n, g in grads.items():  # clip_gradients
            coef = self.clip / (g.norm(2) + 1e-6)
            if coef < 1:
                grads[n] = g * coef
        if epoch < self.freeze_last_layer:  # cancel_gradients_last_layer
            grads = {n: g for n, g in grads.items() if "last_layer" not in n}

        b1, b2 = self.betas
        for n, g in grads.items():  # AdamW; a parameter without a gradient is skipped, its state untouched
            t, exp_avg, exp_sq = self.adam.get(n, (0, torch.zeros_like(g), torch.zeros_like(g)))
            t, exp_avg, exp_sq = t + 1, b1 * exp_avg + (1 - b1) * g, b2 * exp_sq + (1 - b2) * g * g
            self.adam[n] = (t, exp_avg, exp_sq)
            decay = wd if n in self.regularized else 0.0
            p = self.student[n] * (1 - lr * decay)
            self.student[n] = p - lr * (exp_avg / (1 - b1**t)) / ((exp_sq / (1 - b2**t)).sqrt() + self.eps)
        for n in self.teacher:  # EMA over every parameter
            self.teacher[n] = self.teacher[n] * m + (1 - m) * self.student[n]
        return float(loss.detach()), grads


# -- the test -----------------------------------------------------------------------------------------------
TINY = [
    "model.arch=vit_tiny", "model.depth=2", "model.patch_size=8", "model.img_size=32", "model.drop_path_rate=0",
    "dino.out_dim=64", "dino.hidden_dim=64", "dino.bottleneck_dim=32", "dino.momentum_teacher=0.9",
    "dino.freeze_last_layer_epochs=1", "dino.warmup_teacher_temp=0.04", "dino.teacher_temp=0.07",
    "data.global_size=32", "data.local_size=24", "data.local_crops_number=2", "data.batch_size=3",
    "data.num_workers=0", "optim.lr=0.1", "optim.min_lr=1e-4", "optim.weight_decay=0.5", "optim.weight_decay_end=2",
    "optim.clip_grad=3.0", "train.epochs=4", "train.device=cpu", "train.precision=fp32", "train.resume=none",
    "train.knn_eval=false", "loss.impl=torch", "ema.impl=foreach", "health.enabled=false",
]

# name: (images, steps to run, overrides); batch 3, 4 epochs. Local crops are 24 px against stored 32 px
# position embeddings (a 3x3 grid resized from 4x4). The peak lr (0.1 * 3 / 256 = 1.2e-3) keeps the loss in a
# realistic range; the weight decay (0.5 -> 2) is large enough for its effect to exceed the tolerance.
CASES = {
    # 3 iterations per epoch: lr warm-up over 2 epochs, teacher temperature warm-up over 3, the freeze ends at step 3
    "warmups_running": (9, 8, ["optim.warmup_epochs=2", "dino.warmup_teacher_temp_epochs=3"]),
    # 1 iteration per epoch: a one-step lr warm-up and a one-epoch teacher warm-up give their start values
    "one_step_warmups": (3, 4, ["optim.warmup_epochs=1", "dino.warmup_teacher_temp_epochs=1"]),
}


def image_folder(root, n):
    root.mkdir()
    for i in range(n):
        Image.new("RGB", (40, 40), (20 * i, 100, 200)).save(root / f"{i}.png")
    return root


def official_run(trainer: Trainer) -> OfficialRun:
    """The official state built from fastdino's initial networks, with the official schedule arrays."""
    cfg, niter = trainer.cfg, trainer.steps_per_epoch
    o, d, epochs = cfg.optim, cfg.dino, cfg.train.epochs
    student = {official_name(k): v.double().clone() for k, v in trainer.method.student_module().state_dict().items()}
    teacher = {official_name(k): v.double().clone() for k, v in trainer.method.teacher.state_dict().items()}
    return OfficialRun(
        student=student, teacher=teacher, center=torch.zeros(d.out_dim, dtype=torch.float64),
        lr=official_cosine(o.lr * cfg.data.batch_size / 256, o.min_lr, epochs, niter, o.warmup_epochs),
        wd=official_cosine(o.weight_decay, o.weight_decay_end, epochs, niter),
        momentum=official_cosine(d.momentum_teacher, 1.0, epochs, niter),
        teacher_temps=official_teacher_temps(d.warmup_teacher_temp, d.teacher_temp, d.warmup_teacher_temp_epochs,
                                             epochs),
        clip=o.clip_grad, freeze_last_layer=d.freeze_last_layer_epochs, student_temp=d.student_temp,
        center_momentum=d.center_momentum, patch=cfg.model.patch_size,
        heads=trainer.method.student_module().backbone.blocks[0].attn.num_heads,
    )


def run_both(tmp_path, case: str):
    """The same views through fastdino's `Trainer.train_step` and the official step, one iteration at a time.
    Yields (step, epoch, fastdino's metrics, the trainer, the official loss, the official gradients, the run)."""
    n_images, n_steps, extra = CASES[case]
    images = image_folder(tmp_path / "images", n_images)
    cfg = load_config(None, TINY + extra + [f"data.path={images}", f"train.output_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg)
    ref = official_run(trainer)
    b, data = cfg.data.batch_size, cfg.data
    gen = torch.Generator().manual_seed(1)
    for step in range(n_steps):
        epoch = step // trainer.steps_per_epoch
        sizes = [data.global_size] * 2 + [data.local_size] * data.local_crops_number
        views = [torch.randn(b, 3, s, s, generator=gen) for s in sizes]
        trainer.step = step  # what `fit` does around each call
        metrics = trainer.train_step(views, epoch)
        ref_loss, ref_grads = ref.step(views, step, epoch)
        yield step, epoch, metrics, trainer, ref_loss, ref_grads, ref


def split_key_bias(name: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split the key part out of a qkv bias. Its gradient is exactly zero (it adds q . b_k to every logit of a
    query's row, which the softmax ignores), so float32 leaves rounding noise where float64 has ~1e-19, and
    Adam's normalised step turns either into an update of up to about lr: that part is checked against that
    bound, not against the reference."""
    if not name.endswith("attn.qkv.bias"):
        return t, None
    d = t.numel() // 3
    return torch.cat((t[:d], t[2 * d:])), t[d:2 * d]


def assert_close(what: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    err, scale = (actual.double() - expected).abs().max(), expected.abs().max()
    assert err <= rtol * scale, f"{what}: max |fastdino - official| = {err:.3g} > {rtol:g} x scale {scale:.3g}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_consecutive_steps_match_the_official_step(tmp_path, case):
    """Schedules, loss, clipped gradients, student and teacher weights and the center after every step."""
    clipped, unclipped, lr_sum = set(), set(), 0.0
    for step, epoch, metrics, trainer, ref_loss, ref_grads, ref in run_both(tmp_path, case):
        where = f"{case}, step {step} (epoch {epoch})"
        official = {"lr": ref.lr[step], "wd": ref.wd[step], "momentum": ref.momentum[step],
                    "teacher_temp": ref.teacher_temps[epoch]}
        for key, value in official.items():
            assert metrics[key] == pytest.approx(value, rel=1e-12, abs=1e-15), f"{where}: {key}"
        assert float(metrics["loss"]) == pytest.approx(ref_loss, rel=LOSS_RTOL), f"{where}: loss"

        # the gradients the optimizer saw: clipped per parameter, the last layer's absent while frozen
        student = trainer.method.student_module()
        grads = {official_name(n): p.grad for n, p in student.named_parameters() if p.grad is not None}
        assert grads.keys() == ref_grads.keys(), f"{where}: parameters with a gradient"
        for n, g in ref_grads.items():
            assert_close(f"{where}: clipped gradient of {n}", grads[n], g, GRAD_RTOL)
        for n, norm in ref.grad_norms.items():
            assert abs(norm / ref.clip - 1) > 1e-3, f"{where}: {n}'s norm {norm} sits on the clip: ill-posed case"
            (clipped if norm > ref.clip else unclipped).add(n)

        lr_sum += float(ref.lr[step])
        for which, state, ref_state in (("student", student.state_dict(), ref.student),
                                        ("teacher", trainer.method.teacher.state_dict(), ref.teacher)):
            for name, t in state.items():
                n = official_name(name)
                rest, key = split_key_bias(n, t.double())
                ref_rest, ref_key = split_key_bias(n, ref_state[n])
                assert_close(f"{where}: {which} {n}", rest, ref_rest, PARAM_RTOL)
                if key is not None:
                    assert (key - ref_key).abs().max() <= 2 * lr_sum, f"{where}: {which} {n}, key part"
        assert_close(f"{where}: center", trainer.method.center.center, ref.center, CENTER_RTOL)

    assert clipped and unclipped, f"clipping must act on some parameters and not on others: {sorted(clipped)}"
    assert any("last_layer" in n for n in ref_grads), "the run must reach the end of the last layer's freeze"


def test_reference_resize_is_the_official_call():
    """The reference's position-embedding resize equals the official call (bicubic by scale factor, float64),
    and differs from a resize to the exact size, so the step test tells the two rules apart."""
    import torch.nn.functional as F

    pos = torch.randn(1, 16 + 1, 5, dtype=torch.float64)
    grid = pos[:, 1:].reshape(1, 4, 4, 5).permute(0, 3, 1, 2)  # (1, D, 4, 4)
    official = F.interpolate(grid, scale_factor=(3.1 / 4, 3.1 / 4), mode="bicubic")
    exact = F.interpolate(grid, size=(3, 3), mode="bicubic")
    ours = official_pos_embed(pos, 24, 24, 8)[:, 1:].reshape(1, 3, 3, 5).permute(0, 3, 1, 2)
    torch.testing.assert_close(ours, official, rtol=1e-12, atol=1e-12)
    assert (ours - exact).abs().max() > 0.05 * exact.abs().max()
    assert official_pos_embed(pos, 32, 32, 8) is pos
