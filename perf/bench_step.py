"""One DINO training step three ways, in one process on one GPU: official, plain modern PyTorch, fastdino (issue 17).

    python -m perf.bench_step                          # the four issue-17 cases, 20 timed steps each
    python -m perf.bench_step --cases vits16_b128 --steps 10 --warmup 3 --json out.json
    python -m perf.bench_step --smoke                  # tiny model on whatever device there is (CPU in CI)
    python -m perf.bench_step --smoke --cases rn50_b64 # its convnet twin: a ResNet-18 with SGD

Providers (same architecture, same initial weights, same input crops, same hyper-parameters):
  official  a re-implementation of the official step (facebookresearch/dino, main_dino.py train_one_epoch):
            fp16 autocast + GradScaler, eager attention (softmax(q k^T) v), the per-pair loss loop
            (perf.bench_dino_loss.official_dino_loss), `math.isfinite(loss.item())`, per-parameter clipping with
            a host-side `if` per parameter, the last-layer cancel loop, torch.optim.AdamW with its defaults,
            the per-parameter EMA loop (perf.bench_ema.official_update) and the center update. Single process,
            so no DDP wrapper and no all-reduce.
  torch     the same step in plain modern PyTorch: SDPA attention, bf16 autocast (no scaler), fused AdamW,
            per-parameter clipping on the device (torch._foreach_norm), torch._foreach_lerp_ EMA, the per-pair
            loss loop, one `torch.isfinite(loss).item()` per step.
  fastdino  fastdino's best configuration through the real `Trainer.train_step` (loss.impl=triton,
            ema.impl=triton, model.attention=sdpa, train.precision=bf16, optim.fused=true: no host sync in the
            step). Candidates on top of it (not in the default --providers; `VARIANTS`):
            fastdino-compile (model.compile=default), fastdino-cudagraphs (model.compile=reduce-overhead),
            fastdino-recompute (model.grad_checkpointing=true: less memory, more compute).

End to end (`--end-to-end cpu,torch_gpu,dali`): the full trainer (`Trainer.fit`, the production loop with its
logging and checkpoints) on real JPEGs (500x375, quality 90: `--data DIR`, else written once into the run's
temporary folder, in parallel) with each data backend, for the first case given; img/s is the trainer's own
figure from its log (metrics.jsonl's img_per_s over the `--steps` iterations after `--steps` warm-up
iterations), the number a user's run reports; peak GiB is that row's own (the peak is reset before each row).

Loss curves (`--curve N`): the `torch` provider (plain PyTorch) and each fastdino provider given train N steps
from the same weights on the same real batches (multi-crop batches of the same JPEGs, a pool of 8 cycled,
drawn once) with the same RNG seed; the table gives the loss at a few steps and the largest difference from
the `torch` curve relative to its loss, which should stay within bf16 noise (issue 17's check that the fast
step computes the same training). `--curve-png FILE` draws them. Each provider's curve is printed and written
to --json as it ends, so a run cut off keeps the curves done.

`--no-steps` skips the timed step rows: only the --end-to-end rows and the --curve (the GPU suite runs each as a
part of its own, on JPEGs it makes once: `--data DIR`).

Columns: img/s = B x steps / wall time of `--steps` steps after `--warmup` (synchronised at both ends); ms/step;
1st step s = the first step's wall time (torch.compile compiles there);
peak GiB = torch.cuda.max_memory_allocated over the timed steps (models, optimizer state, activations);
% floor = achieved model FLOP/s (fastdino.models.flops, 2 per multiply-add, matmuls only) / the bf16 matmul rate
measured in the same run (8192^3); x official = img/s / the official provider's img/s; loss@1 = the loss of the
first step (the three start from the same weights, so it agrees to the precision's rounding). A provider that
runs out of memory gets an "OOM" row. On the CPU (--smoke) every provider runs in fp32 with a disabled scaler
and the floor is an fp32 matmul rate: the figures show the script runs, they are not performance.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastdino.cli import OneLineParser, output_file, positive_int
from fastdino.config import load_config
from fastdino.data.demo import DEMO_CLASSES, make_demo_dataset
from fastdino.engine.ema import ema_foreach_
from fastdino.engine.optim import clip_gradients_per_param, make_optimizer, param_groups
from fastdino.engine.trainer import Trainer
from fastdino.methods.dino import MultiCropNetwork
from fastdino.models.backbones import build_backbone, feature_dim, is_vit
from fastdino.models.flops import backbone_forward_flops, head_forward_flops
from fastdino.models.heads import DINOHead
from fastdino.schedules import teacher_temp_schedule

# fastdino's step-speed candidates (issue 17): each is the `fastdino` provider plus these config overrides, so one
# GPU run measures every candidate against the same baseline.
VARIANTS = {
    "fastdino": [],
    "fastdino-compile": ["model.compile=default"],
    "fastdino-cudagraphs": ["model.compile=reduce-overhead"],
    "fastdino-recompute": ["model.grad_checkpointing=true"],
}
PROVIDERS = ("official", "torch", *VARIANTS)
DEFAULT_PROVIDERS = ("official", "torch", "fastdino")
EPOCH = 1  # past the one-epoch last-layer freeze, so every provider updates every parameter
WD, MOMENTUM = 0.04, 0.996  # the first step's weight decay and teacher momentum of the recipe (as the trainer's)


@dataclass(frozen=True)
class Case:
    name: str
    arch: str
    patch: int
    batch: int
    n_local: int
    global_size: int = 224
    local_size: int = 96
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    depth: int = 0  # 0: the architecture's own
    drop_path: float = 0.1
    optimizer: str = "adamw"  # the official --optimizer of the recipe (sgd for the ResNet-50 one)

    @property
    def vit(self) -> bool:
        return is_vit(self.arch)

    def label(self) -> str:
        crops = f"2x{self.global_size}" + (f"+{self.n_local}x{self.local_size}" if self.n_local else "")
        return f"{self.arch}{f'/{self.patch}' if self.vit else ''} B{self.batch} {crops} {self.optimizer}"


CASES = {
    "vits16_b128": Case("vits16_b128", "vit_small", 16, 128, 10),
    "vits16_b64_global": Case("vits16_b64_global", "vit_small", 16, 64, 0),
    "vits8_b32": Case("vits8_b32", "vit_small", 8, 32, 10),
    "vitb16_b64": Case("vitb16_b64", "vit_base", 16, 64, 10),
    # the official ResNet-50 recipe (configs/resnet50.yaml): SGD, 8 local crops, no drop path (a convnet has none)
    "rn50_b64": Case("rn50_b64", "resnet50", 0, 64, 8, drop_path=0.0, optimizer="sgd"),
}
# Tiny enough for a CI smoke run on a 2-core CPU; drop path off so the three first losses can be compared.
SMOKE = Case("smoke", "vit_tiny", 8, 4, 2, global_size=32, local_size=16, out_dim=64, hidden_dim=32,
             bottleneck_dim=16, depth=2, drop_path=0.0)
# The smoke twin of the convnet cases (--smoke --cases rn50_b64): a ResNet-18 with SGD on 32 px crops.
SMOKE_CONVNET = Case("smoke_convnet", "resnet18", 0, 4, 2, global_size=32, local_size=16, out_dim=64, hidden_dim=32,
                     bottleneck_dim=16, drop_path=0.0, optimizer="sgd")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: torch.device) -> tuple[float, str]:
    """Measured matmul FLOP/s: bf16 8192^3 on a GPU, fp32 1024^3 on the CPU (smoke only)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 3
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return reps * 2 * n**3 / (time.perf_counter() - start), f"{str(dtype).removeprefix('torch.')} {n}^3"


def make_views(case: Case, device: torch.device) -> list[torch.Tensor]:
    """Random crops in the multi-crop layout: 2 global (B, 3, G, G) then n_local (B, 3, L, L)."""
    g = torch.Generator().manual_seed(0)
    sizes = [case.global_size] * 2 + [case.local_size] * case.n_local
    return [torch.randn(case.batch, 3, s, s, generator=g).to(device) for s in sizes]


def build_networks(case: Case, attention: str, device: torch.device) -> tuple[MultiCropNetwork, MultiCropNetwork]:
    """Student (drop path case.drop_path) and teacher (none) with the student's weights, as main_dino.py builds them."""
    kwargs = {"patch_size": case.patch, "img_size": case.global_size, "attention": attention}
    if case.depth:
        kwargs["depth"] = case.depth

    def net(drop_path: float) -> MultiCropNetwork:
        torch.manual_seed(0)  # the same initial weights for every provider
        backbone, dim = build_backbone(case.arch, drop_path_rate=drop_path, **kwargs) if case.vit else \
            build_backbone(case.arch)
        return MultiCropNetwork(backbone, DINOHead(dim, case.out_dim, case.hidden_dim, case.bottleneck_dim))

    student, teacher = net(case.drop_path).to(device), net(0.0).to(device)
    teacher.requires_grad_(False)
    return student, teacher


def official_step_fn(case: Case, device: torch.device, cfg) -> tuple:
    """The official step (module docstring): returns (step(views) -> loss, objects to free afterwards)."""
    from perf.bench_dino_loss import official_dino_loss
    from perf.bench_ema import official_update

    student, teacher = build_networks(case, "math", device)
    # the official optimizers: torch AdamW with its defaults, or torch SGD with momentum 0.9
    optimizer = (torch.optim.AdamW(param_groups(student)) if case.optimizer == "adamw" else
                 torch.optim.SGD(param_groups(student), lr=0, momentum=0.9))
    half = device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=half)
    center = torch.zeros(1, case.out_dim, device=device)
    d = cfg.dino
    teacher_temp = teacher_temp_schedule(EPOCH, d.warmup_teacher_temp, d.teacher_temp, d.warmup_teacher_temp_epochs)
    state = {"center": center}
    lr = cfg.optim.lr * case.batch / 256  # linear scaling rule, no warm-up: the trainer's first-step value

    def step(views):
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = lr
            if i == 0:
                group["weight_decay"] = WD
        with torch.autocast(device.type, dtype=torch.float16, enabled=half):
            teacher_out = teacher(views[:2])  # (2B, K)
            student_out = student(views)  # (n_crops*B, K)
            loss, teacher_sum = official_dino_loss(student_out, teacher_out, state["center"], d.student_temp,
                                                   teacher_temp)
        # official DINOLoss.update_center: batch mean of the teacher output into the running center
        state["center"] = state["center"] * d.center_momentum + teacher_sum[None] / teacher_out.shape[0] * (
            1 - d.center_momentum)
        if not math.isfinite(loss.item()):  # host sync
            raise RuntimeError("non-finite loss")
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        for p in student.parameters():  # per-parameter clipping with a host-side test: one sync per parameter
            if p.grad is not None:
                coef = cfg.optim.clip_grad / (p.grad.norm(2) + 1e-6)
                if coef < 1:
                    p.grad.mul_(coef)
        for name, p in student.named_parameters():  # the last-layer cancel loop (a no-op after its epoch)
            if EPOCH < d.freeze_last_layer_epochs and "last_layer" in name:
                p.grad = None
        scaler.step(optimizer)
        scaler.update()
        official_update(student, teacher, MOMENTUM)
        sync(device)  # the official loop synchronises before logging, then reads loss.item() again
        return loss.detach()

    return step, (student, teacher, optimizer, scaler, state)


def torch_step_fn(case: Case, device: torch.device, cfg) -> tuple:
    """The official step in plain modern PyTorch (module docstring)."""
    from perf.bench_dino_loss import official_dino_loss

    student, teacher = build_networks(case, "sdpa", device)
    optimizer = make_optimizer(case.optimizer, param_groups(student), fused=device.type == "cuda")
    bf16 = device.type == "cuda"
    d = cfg.dino
    teacher_temp = teacher_temp_schedule(EPOCH, d.warmup_teacher_temp, d.teacher_temp, d.warmup_teacher_temp_epochs)
    state = {"center": torch.zeros(case.out_dim, device=device)}
    lr = cfg.optim.lr * case.batch / 256
    params = [p for g in optimizer.param_groups for p in g["params"]]
    teachers = [p.detach() for p in teacher.parameters()]
    students = [p.detach() for p in student.parameters()]

    def step(views):
        for group in optimizer.param_groups:
            group["lr"] = lr
            if group["regularized"]:
                group["weight_decay"] = WD
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                teacher_out = teacher(views[:2])  # (2B, K)
            student_out = student(views)  # (n_crops*B, K)
            loss, teacher_sum = official_dino_loss(student_out, teacher_out, state["center"], d.student_temp,
                                                   teacher_temp)
        state["center"].lerp_(teacher_sum / teacher_out.shape[0], 1 - d.center_momentum)
        if not torch.isfinite(loss).item():  # host sync, once per step
            raise RuntimeError("non-finite loss")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients_per_param(params, cfg.optim.clip_grad)
        optimizer.step()
        ema_foreach_(teachers, students, MOMENTUM)
        return loss.detach()

    return step, (student, teacher, optimizer, state)


def fastdino_overrides(case: Case, device: torch.device, data_dir: Path, out_dir: Path) -> list[str]:
    """The config of the fastdino provider: the case's shapes at fastdino's best settings (on CUDA)."""
    vit = [f"model.patch_size={case.patch}", f"model.img_size={case.global_size}", f"model.depth={case.depth}",
           f"model.drop_path_rate={case.drop_path}", "model.attention=sdpa"] if case.vit else []
    overrides = [
        f"model.arch={case.arch}", *vit, f"optim.name={case.optimizer}", f"data.batch_size={case.batch}",
        f"data.global_size={case.global_size}", f"data.local_size={case.local_size}",
        f"data.local_crops_number={case.n_local}", f"dino.out_dim={case.out_dim}", f"dino.hidden_dim={case.hidden_dim}",
        f"dino.bottleneck_dim={case.bottleneck_dim}", "data.num_workers=0", "train.knn_eval=false",
        "optim.warmup_epochs=0", f"train.device={device.type}", f"data.path={data_dir}", f"train.output_dir={out_dir}",
        "train.resume=none", "optim.fused=true",
    ]
    if device.type == "cuda":
        overrides += ["loss.impl=triton", "ema.impl=triton", "train.precision=bf16"]
    return overrides


def fastdino_step_fn(case: Case, device: torch.device, cfg, data_dir: Path, out_dir: Path,
                     variant: str = "fastdino") -> tuple:
    """The real Trainer.train_step at fastdino's best settings (plus the variant's overrides), from the same
    initial weights."""
    overrides = fastdino_overrides(case, device, data_dir, out_dir) + VARIANTS[variant]
    trainer = Trainer(load_config(None, overrides))
    student, teacher = build_networks(case, "sdpa", device)
    trainer.method.student_module().load_state_dict(student.state_dict())
    trainer.method.teacher.load_state_dict(teacher.state_dict())
    del student, teacher

    def step(views):
        return trainer.train_step(views, epoch=EPOCH)["loss"]

    return step, (trainer,)


def run_provider(name: str, case: Case, device: torch.device, cfg, views, args, paths) -> dict:
    """Build the provider, run warm-up and timed steps; one result row (errors and OOM become rows too)."""
    row = {"case": case.name, "config": case.label(), "provider": name}
    objects = ()
    try:
        if name == "official":
            step, objects = official_step_fn(case, device, cfg)
        elif name == "torch":
            step, objects = torch_step_fn(case, device, cfg)
        else:
            step, objects = fastdino_step_fn(case, device, cfg, *paths, variant=name)
        first = objects[0]
        backbone = first.method.student_module().backbone if isinstance(first, Trainer) else first.backbone
        row["gflop_per_img"] = flops_per_image(case, backbone) / 1e9
        tick = time.perf_counter()
        row["loss_first"] = float(step(views))
        row["first_step_s"] = time.perf_counter() - tick
        for _ in range(args.warmup - 1):
            step(views)
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.steps):
            step(views)
        sync(device)
        seconds = time.perf_counter() - start
        row.update(ms_step=1e3 * seconds / args.steps, img_s=args.steps * case.batch / seconds)
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    except torch.cuda.OutOfMemoryError:
        row["error"] = "OOM"
    finally:
        del objects
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


CURVE_POOL = 8  # batches cycled by the loss curves


def curve_batches(case: Case, data_dir: Path, device: torch.device, n: int = CURVE_POOL) -> list[list[torch.Tensor]]:
    """n multi-crop batches of real images (the JPEGs in data_dir, the recipe's augmentation), on the device."""
    from torch.utils.data import DataLoader

    from fastdino.data.files import ImageFileDataset, collate_views, index_image_folder
    from fastdino.data.multicrop import multicrop_transform

    transform = multicrop_transform(global_size=case.global_size, local_size=case.local_size, n_local=case.n_local)
    dataset = ImageFileDataset(index_image_folder(data_dir), transform, seed=0)
    loader = DataLoader(dataset, batch_size=case.batch, shuffle=False, drop_last=True, collate_fn=collate_views,
                        num_workers=min(8, os.cpu_count() or 1))
    batches = []
    for views, _, _ in loader:
        batches.append([v.to(device) for v in views])
        if len(batches) == n:
            break
    return batches


def curve_rows(case: Case, device: torch.device, cfg, providers: list[str], steps: int, paths,
               done=lambda rows: None) -> list[dict]:
    """Each provider's losses over `steps` steps on the same cycled batches, from the same weights and seed;
    `done(rows)` is called after each provider (rows so far, the first is the reference)."""
    batches = curve_batches(case, paths[0], device)
    rows = []
    for name in providers:
        torch.manual_seed(0)  # the same stochastic-depth draws for every provider (same module order)
        if name == "torch":
            step, objects = torch_step_fn(case, device, cfg)
        else:
            step, objects = fastdino_step_fn(case, device, cfg, paths[0], paths[1] / f"curve_{name}", variant=name)
        torch.manual_seed(0)
        started = time.perf_counter()
        losses = [float(step(batches[i % len(batches)])) for i in range(steps)]
        reference = rows[0]["curve"] if rows else losses
        rows.append({"case": case.name, "config": case.label(), "provider": name, "curve": losses,
                     "max_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(losses, reference)),
                     "wall_s": time.perf_counter() - started})
        del objects, step
        gc.collect()
        done(rows)
    return rows


def curve_table(rows: list[dict]) -> list[str]:
    n = len(rows[0]["curve"])
    marks = sorted({0, n // 4, n // 2, 3 * n // 4, n - 1})
    lines = ["| config | provider | " + " | ".join(f"loss @{i + 1}" for i in marks) + " | max rel. diff vs torch |",
             "|---|---|" + "---|" * (len(marks) + 1)]
    for r in rows:
        lines.append(f"| {r['config']} | {r['provider']} | " + " | ".join(f"{r['curve'][i]:.4f}" for i in marks)
                     + f" | {r['max_rel_diff']:.2e} |")
    return lines


def end_to_end_row(case: Case, device: torch.device, backend: str, jpegs: Path, out_dir: Path, args) -> dict:
    """Trainer.fit on real JPEGs with one data backend: 2 x --steps iterations, logged every --steps; the second
    log line's img_per_s (the trainer's own, data loading included) is the row's figure."""
    from fastdino.data.loader import dali_available
    from fastdino.engine.trainer import train

    row = {"case": case.name, "config": case.label(), "provider": f"fastdino end to end, data.backend={backend}"}
    if backend == "dali" and not dali_available():
        row["error"] = 'skipped: DALI is not installed (pip install -e ".[dali]")'
        return row
    overrides = fastdino_overrides(case, device, jpegs, out_dir) + [
        f"data.backend={backend}", f"data.num_workers={min(12, os.cpu_count() or 1)}",
        f"train.log_every={args.steps}", f"train.max_steps={2 * args.steps}", "train.ckpt_every=100000",
        "health.enabled=false",
    ]
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()  # this row's peak, not an earlier row's
        started = time.perf_counter()
        result = train(load_config(None, overrides))
        row["wall_s"] = time.perf_counter() - started
        timed = result.history[-1]  # iterations steps..2*steps-1
        row.update(img_s=timed["img_per_s"], ms_step=1e3 * case.batch / timed["img_per_s"],
                   loss_first=result.history[0]["loss"])
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    except torch.cuda.OutOfMemoryError:
        row["error"] = "OOM"
    except Exception as exc:  # noqa: BLE001 - a backend that cannot run here (e.g. no DALI) is a row, not a crash
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def flops_per_image(case: Case, backbone: torch.nn.Module) -> float:
    """Model FLOPs of one image's training step (fastdino.models.flops) for the backbone as built."""
    head = head_forward_flops(feature_dim(backbone), case.hidden_dim, case.bottleneck_dim, case.out_dim)
    glob = backbone_forward_flops(backbone, case.global_size) + head
    local = backbone_forward_flops(backbone, case.local_size) + head if case.n_local else 0.0
    return 3 * (2 * glob + case.n_local * local) + 2 * glob  # as DINO.train_flops_per_image


def table_row(r: dict) -> str:
    if "error" in r:
        return f"| {r['config']} | {r['provider']} | {r['error']} | | | | | | | |"
    peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
    ratio = f"{r['x_official']:.2f}" if "x_official" in r else "-"
    first = f"{r['first_step_s']:.1f}" if "first_step_s" in r else "-"
    return (f"| {r['config']} | {r['provider']} | {r['img_s']:.1f} | {r['ms_step']:.1f} | {first} | "
            f"{peak} | "
            f"{r['gflop_per_img']:.3g} | {r['pct_floor']:.1f}% | {ratio} | "
            f"{r['loss_first']:.4f} |")


def comma_list(choices: tuple[str, ...], what: str):
    """An argparse type: a comma-separated list of `choices`, refused in one line naming the first bad item."""
    def parse(text: str) -> list[str]:
        items = [t for t in text.split(",") if t]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{bad[0] if bad else text!r} is not a {what}: use {', '.join(choices)}")
        return items
    parse.__name__ = what
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="bench_step", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=comma_list(tuple(CASES), "case"), default=list(CASES),
                        help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--providers", type=comma_list(PROVIDERS, "provider"), default=list(DEFAULT_PROVIDERS),
                        help=f"comma-separated, of {', '.join(PROVIDERS)} (default: {','.join(DEFAULT_PROVIDERS)})")
    parser.add_argument("--steps", type=positive_int, default=20, help="timed steps per provider")
    parser.add_argument("--warmup", type=positive_int, default=5, help="untimed steps first")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny model on whatever device there is, at most 2 timed steps after 1 warm-up step: "
                             "checks the script runs (not performance)")
    parser.add_argument("--end-to-end", type=comma_list(("cpu", "torch_gpu", "dali"), "data backend"), default=[],
                        metavar="BACKENDS", help="also the full trainer on real JPEGs with these data backends "
                                             "(comma-separated, of cpu, torch_gpu, dali), for the first case")
    parser.add_argument("--curve", type=positive_int, metavar="N",
                        help="also the loss curves of torch and the fastdino providers given over N steps on the "
                             "same real batches, for the first case (issue 17 asks for 200)")
    parser.add_argument("--curve-png", type=output_file, help="draw the --curve curves into this PNG")
    parser.add_argument("--data", type=Path, metavar="DIR",
                        help="the JPEGs of --end-to-end and --curve: DIR/train/*.jpg as perf.bench_data writes them "
                             "(500x375 q90; the missing ones are written there first); default: a temporary folder")
    parser.add_argument("--no-steps", action="store_true",
                        help="skip the timed step rows: only --end-to-end and --curve")
    parser.add_argument("--json", type=output_file,
                        help="write the rows here (rewritten after every row, so a cut-off run keeps some)")
    args = parser.parse_args(argv)
    providers, backends = args.providers, args.end_to_end
    if args.curve_png and not args.curve:
        parser.error("--curve-png draws the --curve curves: add --curve N")
    if args.no_steps and not (backends or args.curve):
        parser.error("--no-steps leaves nothing to run: add --end-to-end BACKENDS or --curve N")
    cuda = torch.cuda.is_available()
    if not cuda and (gpu_only := [b for b in backends if b != "cpu"]):
        parser.error(f"--end-to-end {gpu_only[0]} decodes on the GPU and no CUDA device is visible: use cpu here")
    if args.smoke:
        convnet = not CASES[args.cases[0]].vit
        cases, args.steps, args.warmup = [SMOKE_CONVNET if convnet else SMOKE], min(args.steps, 2), 1
    elif not cuda:
        parser.error("needs a CUDA GPU (none found); --smoke runs a tiny model on the CPU")
    else:
        cases = [CASES[c] for c in args.cases]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rate, rate_what = matmul_rate(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    header = {"device": name, "torch": torch.__version__, "matmul_rate_tflops": rate / 1e12, "matmul": rate_what,
              "steps": args.steps, "warmup": args.warmup, "smoke": args.smoke}
    print(f"# bench_step on {name}, torch {torch.__version__}; matmul rate ({rate_what}) {rate / 1e12:.4g} TFLOP/s; "
          f"{args.warmup} warm-up + {args.steps} timed steps" + ("; SMOKE RUN: not performance" if args.smoke else ""))
    print("\n| config | provider | img/s | ms/step | 1st step s | peak GiB | GFLOP/img | % floor | x official "
          "| loss@1 |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        per_class = -(-max(c.batch for c in cases) // len(DEMO_CLASSES))
        data = make_demo_dataset(f"{tmp}/data", n_train_per_class=per_class, n_val_per_class=1, size=64)
        cfg = load_config(None, [])  # the DINO hyper-parameters (temperatures, clip, center momentum) of the recipe
        for case in [] if args.no_steps else cases:
            views = make_views(case, device)
            base = None
            for i, provider in enumerate(providers):
                r = run_provider(provider, case, device, cfg, views, args, (data / "train", Path(tmp) / f"run{i}"))
                if "error" not in r:
                    r["pct_floor"] = 100 * r["img_s"] * r["gflop_per_img"] * 1e9 / rate
                    if provider == "official":
                        base = r["img_s"]
                    if base:
                        r["x_official"] = r["img_s"] / base
                rows.append(r)
                print(table_row(r), flush=True)
                write_rows(args.json, header, rows)
            del views
        case = cases[0]
        if backends or args.curve:
            from perf.bench_data import make_jpegs

            needed = max(case.batch * (2 * args.steps + 1) if backends else 0, case.batch * CURVE_POOL)
            jpegs = make_jpegs(args.data or Path(tmp) / "jpegs", needed, 500, 375, workers=os.cpu_count() or 1)
        for backend in backends:
            r = end_to_end_row(case, device, backend, jpegs, Path(tmp) / f"e2e_{backend}", args)
            if "error" not in r:
                backbone = build_backbone(case.arch, patch_size=case.patch, img_size=case.global_size,
                                          **({"depth": case.depth} if case.depth else {}))[0] if case.vit else \
                    build_backbone(case.arch)[0]  # shapes only
                r["gflop_per_img"] = flops_per_image(case, backbone) / 1e9
                r["pct_floor"] = 100 * r["img_s"] * r["gflop_per_img"] * 1e9 / rate
            rows.append(r)
            print(table_row(r), flush=True)
            write_rows(args.json, header, rows)
        if args.curve:
            fast = [p for p in providers if p in VARIANTS] or ["fastdino"]
            print("\nLoss curves on the same real batches (--curve):", flush=True)
            before = list(rows)

            def curve_done(curves: list[dict]) -> None:  # print and keep each curve as it ends
                r = curves[-1]
                print(f"  {r['provider']}: {len(r['curve'])} steps in {r['wall_s']:.1f} s, loss {r['curve'][0]:.4f} "
                      f"-> {r['curve'][-1]:.4f}, max rel. diff vs torch {r['max_rel_diff']:.2e}", flush=True)
                write_rows(args.json, header, before + curves)

            curves = curve_rows(case, device, cfg, ["torch", *fast], args.curve, (jpegs / "train", Path(tmp)),
                                curve_done)
            print("\n" + "\n".join(curve_table(curves)), flush=True)
            rows += curves
            if args.curve_png:
                draw_curves(curves, args.curve_png)
    return 0


def draw_curves(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        label = f"{r['provider']} (max rel. diff {r['max_rel_diff']:.1e})"
        ax.plot(range(1, len(r["curve"]) + 1), r["curve"], label=label)
    ax.set(xlabel="step", ylabel="DINO loss", title=f"{rows[0]['config']}: same weights, batches and seed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_rows(path: str | None, header: dict, rows: list[dict]) -> None:
    """Written whole then renamed: a run cut off keeps the rows so far, never half a file."""
    if path:
        partial = Path(f"{path}.tmp")
        partial.write_text(json.dumps({**header, "rows": rows}, indent=1))
        partial.replace(path)


if __name__ == "__main__":
    sys.exit(main())
