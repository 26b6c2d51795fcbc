"""Consecutive steps of the real `Trainer` on a torchvision ResNet-18 with SGD and with LARS, against a float64
restatement of the official DINO step on a convnet (issue 22; the ViT case is tests/test_official_step.py).

The reference is written from the definitions in facebookresearch/dino and torchvision (read, not imported):
- main_dino.py: `--arch resnet18` builds torchvision's model, `MultiCropWrapper` replaces its `fc` by an identity and
  runs the backbone once per run of equal-size crops (2 global, then the locals); `--optimizer sgd` is
  torch.optim.SGD(params_groups, lr=0, momentum=0.9), `--optimizer lars` is utils.LARS(params_groups); every
  iteration sets lr on both groups and weight decay on group 0 only; per-parameter clipping; the last layer's
  gradient cancelled in the first epoch; the teacher's EMA over `parameters()` only, so its BatchNorm running
  statistics are its own (updated by its own forward in train mode, over the 2 global crops).
- torchvision resnet.py: stem (7x7/2 convolution, BN, ReLU, 3x3/2 max pool), BasicBlocks (3x3 convolution with the
  block's stride, BN, ReLU, 3x3 convolution, BN, 1x1/stride convolution + BN on the shortcut when the shape changes,
  ReLU after the sum), global average pool. BatchNorm in train mode: the batch's mean and biased variance (eps 1e-5)
  normalise; the running mean / variance move by momentum 0.1 towards the mean and the unbiased variance;
  num_batches_tracked counts the calls.
- torch.optim.SGD (momentum 0.9, no dampening): d = g + wd p; buf = d at a parameter's first step, else
  0.9 buf + d; p -= lr buf. utils.LARS: as tests/test_optim.py's `official_lars_step`.
Both run in float64: the reference, and fastdino's own code (the real Trainer, its fused SGD / LARS, EMA, BN and
loss) built under torch's float64 default dtype. float32 is no reference for a convnet: ReLU and max pooling make the
gradient jump where an activation lies within float32 rounding of zero or of a tie, so float32 and float64 gradients
of the same official step differ by up to 8% on whole tensors at some inputs (measured with the reference below run
in both precisions: 2.6e-5 at one batch of views, 6e-2 at the next). In float64 the two agree to about 1e-7, so the
tolerances below catch a 1% error in the lr, the weight decay, the momentum or the EMA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_official_step import (
    LAST_LAYER,
    assert_close,
    head_forward,
    image_folder,
    official_cosine,
    official_loss,
    official_teacher_temps,
)

from fastdino.config import load_config
from fastdino.engine.trainer import Trainer

# Tolerances relative to the largest magnitude of the float64 tensor checked (weights: of their change since the
# start). Worst errors measured (2-core x86_64 CPU, torch 2.14.1) beside each.
LOSS_RTOL = 1e-9
GRAD_RTOL = 1e-6  # measured 2.6e-8
DELTA_RTOL = 2e-6  # measured 1.6e-7: the change of every parameter since step 0
BUFFER_RTOL = 1e-8  # measured 2.3e-10: BN running statistics
CENTER_RTOL = 1e-10  # measured 1e-13


def official_name(name: str) -> str:
    return LAST_LAYER.get(name, name)


# -- the official forward, float64 ------------------------------------------------------------------------------
def batch_norm(x: torch.Tensor, p: dict, bufs: dict, name: str, eps: float = 1e-5, momentum: float = 0.1):
    """Train-mode BatchNorm2d: normalise by the batch's statistics, move the running ones (bufs, in place)."""
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = x.mean(dim=(0, 2, 3))
    var = ((x - mean[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))  # biased: what normalises
    with torch.no_grad():
        bufs[name + ".running_mean"] = (1 - momentum) * bufs[name + ".running_mean"] + momentum * mean.detach()
        bufs[name + ".running_var"] = (1 - momentum) * bufs[name + ".running_var"] + momentum * var.detach() * n / (
            n - 1)
        bufs[name + ".num_batches_tracked"] = bufs[name + ".num_batches_tracked"] + 1
    y = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + eps)
    return y * p[name + ".weight"][None, :, None, None] + p[name + ".bias"][None, :, None, None]


def resnet_forward(p: dict, bufs: dict, x: torch.Tensor) -> torch.Tensor:
    """torchvision ResNet-18 without `fc` on (B, 3, H, W) float64 -> pooled features (B, 512)."""
    pre = "backbone."
    x = F.conv2d(x, p[pre + "conv1.weight"], stride=2, padding=3)
    x = F.relu(batch_norm(x, p, bufs, pre + "bn1"))
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    for layer in range(1, 5):
        for block in range(2):
            b = f"{pre}layer{layer}.{block}."
            stride = 2 if layer > 1 and block == 0 else 1
            y = F.relu(batch_norm(F.conv2d(x, p[b + "conv1.weight"], stride=stride, padding=1), p, bufs, b + "bn1"))
            y = batch_norm(F.conv2d(y, p[b + "conv2.weight"], padding=1), p, bufs, b + "bn2")
            if b + "downsample.0.weight" in p:
                x = batch_norm(F.conv2d(x, p[b + "downsample.0.weight"], stride=stride), p, bufs, b + "downsample.1")
            x = F.relu(x + y)
    return x.mean(dim=(2, 3))


def network_forward(p: dict, bufs: dict, views: list[torch.Tensor]) -> torch.Tensor:
    """MultiCropWrapper: one backbone call per run of equal-size crops, then the head on all features."""
    feats, start = [], 0
    while start < len(views):
        end = start + 1
        while end < len(views) and views[end].shape[-1] == views[start].shape[-1]:
            end += 1
        feats.append(resnet_forward(p, bufs, torch.cat(views[start:end])))
        start = end
    return head_forward(p, torch.cat(feats))


def official_lars_step(p: torch.Tensor, g: torch.Tensor, mu: torch.Tensor | None, lr: float, wd: float,
                       momentum: float = 0.9, eta: float = 0.001) -> tuple[torch.Tensor, torch.Tensor]:
    """utils.LARS.step for one parameter: (new parameter, new mu)."""
    d = g
    if p.ndim != 1:
        d = d + wd * p
        pn, dn = p.norm(), d.norm()
        q = eta * pn / dn if pn > 0 and dn > 0 else torch.ones((), dtype=p.dtype)
        d = d * q
    mu = (torch.zeros_like(p) if mu is None else mu) * momentum + d
    return p - lr * mu, mu


class OfficialConvRun:
    """The official training state of a ResNet DINO run; `step` runs one iteration of `train_one_epoch`."""

    def __init__(self, trainer: Trainer, optimizer: str):
        cfg, niter = trainer.cfg, trainer.steps_per_epoch
        o, d, epochs = cfg.optim, cfg.dino, cfg.train.epochs
        student = trainer.method.student_module()
        params = {official_name(n) for n, _ in student.named_parameters()}

        def split(state: dict) -> tuple[dict, dict]:
            state = {official_name(k): v.double().clone() for k, v in state.items()}
            return {k: v for k, v in state.items() if k in params}, {k: v for k, v in state.items() if k not in params}

        self.student, self.student_bufs = split(student.state_dict())
        self.teacher, self.teacher_bufs = split(trainer.method.teacher.state_dict())
        self.center = torch.zeros(d.out_dim, dtype=torch.float64)
        self.lr = official_cosine(o.lr * cfg.data.batch_size / 256, o.min_lr, epochs, niter, o.warmup_epochs)
        self.wd = official_cosine(o.weight_decay, o.weight_decay_end, epochs, niter)
        self.momentum = official_cosine(d.momentum_teacher, 1.0, epochs, niter)
        self.teacher_temps = official_teacher_temps(d.warmup_teacher_temp, d.teacher_temp,
                                                    d.warmup_teacher_temp_epochs, epochs)
        self.optimizer, self.clip, self.freeze = optimizer, o.clip_grad, d.freeze_last_layer_epochs
        self.student_temp, self.center_momentum = d.student_temp, d.center_momentum
        self.trainable = [n for n in self.student if n != "head.last_layer.weight_g"]
        self.regularized = {n for n in self.trainable if not (n.endswith(".bias") or self.student[n].ndim == 1)}
        self.buf: dict[str, torch.Tensor] = {}  # SGD's momentum buffers / LARS's mu
        self.grad_norms: dict[str, float] = {}

    def step(self, views: list[torch.Tensor], it: int, epoch: int) -> tuple[float, dict[str, torch.Tensor]]:
        lr, wd, m = float(self.lr[it]), float(self.wd[it]), float(self.momentum[it])
        views = [v.double() for v in views]
        with torch.no_grad():
            teacher_out = network_forward(self.teacher, self.teacher_bufs, views[:2])
        leaves = {n: t.clone().requires_grad_(n in self.trainable) for n, t in self.student.items()}
        student_out = network_forward(leaves, self.student_bufs, views)
        loss = official_loss(student_out, teacher_out, self.center, len(views), self.student_temp,
                             float(self.teacher_temps[epoch]))
        self.center = self.center * self.center_momentum + teacher_out.mean(0) * (1 - self.center_momentum)
        grads = dict(zip(self.trainable, torch.autograd.grad(loss, [leaves[n] for n in self.trainable])))
        self.grad_norms = {n: float(g.norm()) for n, g in grads.items()}
        for n, g in grads.items():  # clip_gradients
            coef = self.clip / (g.norm() + 1e-6)
            if coef < 1:
                grads[n] = g * coef
        if epoch < self.freeze:  # cancel_gradients_last_layer
            grads = {n: g for n, g in grads.items() if "last_layer" not in n}
        for n, g in grads.items():
            decay = wd if n in self.regularized else 0.0
            if self.optimizer == "sgd":
                d = g + decay * self.student[n]
                self.buf[n] = d if n not in self.buf else 0.9 * self.buf[n] + d
                self.student[n] = self.student[n] - lr * self.buf[n]
            else:
                self.student[n], self.buf[n] = official_lars_step(self.student[n], g, self.buf.get(n), lr, decay)
        for n in self.teacher:  # EMA over the parameters only
            self.teacher[n] = self.teacher[n] * m + (1 - m) * self.student[n]
        return float(loss.detach()), grads


def assert_change(what: str, actual: torch.Tensor, expected: torch.Tensor, start: torch.Tensor) -> None:
    """The change since step 0 within DELTA_RTOL of the reference's, relative to its largest magnitude (at least
    1e-9 of the parameter's: at lr 0 both changes are 0 up to float64 rounding of the EMA)."""
    change, ref_change = actual.double() - start, expected - start
    scale = max(float(ref_change.abs().max()), 1e-9 * float(expected.abs().max()))
    err = float((change - ref_change).abs().max())
    assert err <= DELTA_RTOL * scale, f"{what}: change since step 0 off by {err:.3g} > {DELTA_RTOL:g} x {scale:.3g}"


RESNET = [
    "model.arch=resnet18", "dino.out_dim=64", "dino.hidden_dim=64", "dino.bottleneck_dim=32",
    "dino.momentum_teacher=0.9", "dino.freeze_last_layer_epochs=1", "dino.warmup_teacher_temp=0.04",
    "dino.teacher_temp=0.07", "dino.warmup_teacher_temp_epochs=2", "data.global_size=32", "data.local_size=16",
    "data.local_crops_number=1", "data.batch_size=3", "data.num_workers=0", "optim.min_lr=1e-4",
    "optim.warmup_epochs=1", "optim.weight_decay=0.5", "optim.weight_decay_end=2", "optim.clip_grad=3.0",
    "train.epochs=3", "train.device=cpu", "train.precision=fp32", "train.resume=none", "train.knn_eval=false",
    "loss.impl=torch", "ema.impl=foreach", "health.enabled=false",
]
# Peak lr per step: SGD 0.3 (a visible move against the weight decay), LARS 30 (its trust ratio 0.001 |p| / |d|
# scales the matrices' steps down to about 3% of |p|; its 1-D parameters take lr x the clipped gradient as is).
OPTIMIZERS = {"sgd": ["optim.name=sgd", "optim.lr=25.6"], "lars": ["optim.name=lars", "optim.lr=2560"]}
STEPS = 3  # 2 iterations per epoch: lr 0 then the lr warm-up, then the last layer's freeze ends


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_resnet_steps_match_the_official_step(tmp_path, optimizer):
    """Loss, clipped gradients, student and teacher parameters (their change since step 0), the BN running
    statistics of both networks (the teacher's its own) and the center after every step."""
    images = image_folder(tmp_path / "images", 6)
    cfg = load_config(None, RESNET + OPTIMIZERS[optimizer] + [f"data.path={images}",
                                                             f"train.output_dir={tmp_path / 'run'}"])
    torch.set_default_dtype(torch.float64)
    try:
        run_and_compare(Trainer(cfg), cfg, optimizer)
    finally:
        torch.set_default_dtype(torch.float32)


def run_and_compare(trainer: Trainer, cfg, optimizer: str) -> None:
    assert next(trainer.method.parameters()).dtype == torch.float64
    ref = OfficialConvRun(trainer, optimizer)
    start = {**ref.student}
    start_teacher = {**ref.teacher}
    gen = torch.Generator().manual_seed(1)
    sizes = [cfg.data.global_size] * 2 + [cfg.data.local_size] * cfg.data.local_crops_number
    clipped, unclipped = set(), set()
    for step in range(STEPS):
        epoch = step // trainer.steps_per_epoch
        where = f"{optimizer}, step {step} (epoch {epoch})"
        views = [torch.randn(cfg.data.batch_size, 3, s, s, generator=gen) for s in sizes]
        trainer.step = step
        metrics = trainer.train_step(views, epoch)
        ref_loss, ref_grads = ref.step(views, step, epoch)
        assert metrics["lr"] == pytest.approx(ref.lr[step], rel=1e-12), where
        assert float(metrics["loss"]) == pytest.approx(ref_loss, rel=LOSS_RTOL), f"{where}: loss"

        student = trainer.method.student_module()
        grads = {official_name(n): p.grad for n, p in student.named_parameters() if p.grad is not None}
        assert grads.keys() == ref_grads.keys(), f"{where}: parameters with a gradient"
        for n, g in ref_grads.items():
            assert_close(f"{where}: clipped gradient of {n}", grads[n], g, GRAD_RTOL)
        for n, norm in ref.grad_norms.items():
            (clipped if norm > ref.clip else unclipped).add(n)

        for which, net, ref_params, ref_start, ref_bufs in (
                ("student", student, ref.student, start, ref.student_bufs),
                ("teacher", trainer.method.teacher, ref.teacher, start_teacher, ref.teacher_bufs)):
            state = {official_name(k): v for k, v in net.state_dict().items()}
            for n, expected in ref_params.items():
                assert_change(f"{where}: {which} {n}", state[n], expected, ref_start[n])
            for n, expected in ref_bufs.items():
                if n.endswith("num_batches_tracked"):
                    assert int(state[n]) == int(expected), f"{where}: {which} {n}"
                else:
                    assert_close(f"{where}: {which} {n}", state[n], expected, BUFFER_RTOL)
        assert_close(f"{where}: center", trainer.method.center.center, ref.center, CENTER_RTOL)

    assert clipped and unclipped, f"clipping must act on some parameters and not on others: {sorted(clipped)}"
    assert int(ref.teacher_bufs["backbone.bn1.num_batches_tracked"]) == STEPS  # one teacher call per step
    assert int(ref.student_bufs["backbone.bn1.num_batches_tracked"]) == 2 * STEPS  # globals, then locals
