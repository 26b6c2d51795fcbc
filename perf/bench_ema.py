"""Benchmark the DINO teacher EMA: official per-parameter loop vs torch._foreach_lerp_ vs the Triton kernel.

    PYTHONPATH=. python perf/bench_ema.py [--archs vit_small,vit_base] [--k 65536] [--student-dtypes fp32,bf16]

Models: ViT-S/16 and ViT-B/16 with a DINO head (K = 65536): the full teacher, every parameter. Providers:
  official      the loop of the official code (main_dino.py), `param_t.data.mul_(m).add_((1 - m) * param_s)`
  foreach       TeacherEMA(impl="foreach"): `torch._foreach_lerp_` (fastdino.engine.ema.ema_foreach_)
  triton        TeacherEMA(impl="triton"): host-side address check + one kernel launch (what the trainer pays)
  triton-kernel EMAPlan.apply alone: the launch without the per-step host check
The floor is the bytes the update must move, read student + read teacher + write teacher, at the
device-to-device copy bandwidth measured in the same run (a 1 GiB `copy_`, 2 x 1 GiB moved). Prints a
markdown table of ms, GB/s and % of that floor. Needs a CUDA GPU: exits with code 2 without one.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from torch import nn

from fastdino.telemetry import GpuTelemetry

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def setup(arch: str, k: int, student_dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """Student (in student_dtype) and an fp32 teacher: backbone + DINO head, as the trainer builds them."""
    from fastdino.models.heads import DINOHead
    from fastdino.models.vit import build_backbone

    backbone = build_backbone(arch, patch_size=16, drop_path_rate=0.0)
    student = nn.ModuleDict({"backbone": backbone, "head": DINOHead(backbone.embed_dim, k)}).to(device)
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return student.to(student_dtype), teacher


def official_update(student: nn.Module, teacher: nn.Module, m: float) -> None:
    """The baseline, as in the official DINO code: one mul_ and one add_ (plus a temporary) per parameter."""
    with torch.no_grad():
        for param_s, param_t in zip(student.parameters(), teacher.parameters(), strict=True):
            param_t.data.mul_(m).add_((1 - m) * param_s.detach().data)


def floor_bytes(student: nn.Module, teacher: nn.Module) -> int:
    """read student + read teacher + write teacher."""
    s = sum(p.numel() * p.element_size() for p in student.parameters())
    t = sum(p.numel() * p.element_size() for p in teacher.parameters())
    return s + 2 * t


def copy_bandwidth(device: torch.device, do_bench) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * (1 << 30) / (ms * 1e-3)


def bench_model(arch: str, k: int, dtype_name: str, m: float, bw: float, bench, device: torch.device) -> list[str]:
    """Markdown rows for every provider on one (model, student dtype); each starts from the same teacher."""
    from fastdino.engine.ema import TeacherEMA
    from fastdino.kernels.ema import EMAPlan

    student, teacher = setup(arch, k, DTYPES[dtype_name], device)
    n_params = sum(p.numel() for p in teacher.parameters()) / 1e6
    nbytes = floor_bytes(student, teacher)
    floor_ms = nbytes / bw * 1e3
    ema_foreach = TeacherEMA(student, teacher, impl="foreach")
    ema_triton = TeacherEMA(student, teacher, impl="triton")
    plan = EMAPlan([p.detach() for p in teacher.parameters()], [p.detach() for p in student.parameters()])
    providers = {
        "official": lambda: official_update(student, teacher, m),
        "foreach": lambda: ema_foreach.update(m),
        "triton": lambda: ema_triton.update(m),
        "triton-kernel": lambda: plan.apply(m),
    }
    start = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    ema_foreach.update(m)
    reference = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    rows = []
    for name, fn in providers.items():
        with torch.no_grad():
            for n, p in teacher.named_parameters():
                p.copy_(start[n])
        fn()  # one update from the common start: compare with foreach, then time
        diff = max((p.detach() - reference[n]).abs().max().item() for n, p in teacher.named_parameters())
        ms = bench(fn)
        rows.append(
            f"| {arch}/16 + K={k} | {n_params:.1f} | {dtype_name} | {name} | {ms:.3f} | "
            f"{nbytes / (ms * 1e-3) / 1e9:.0f} | {100 * floor_ms / ms:.0f}% | {diff:.2e} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="vit_small,vit_base")
    parser.add_argument("--k", type=int, default=65536, help="DINO head output dimension")
    parser.add_argument("--student-dtypes", default="fp32,bf16")
    parser.add_argument("--momentum", type=float, default=0.996)
    parser.add_argument("--rep", type=int, default=200, help="ms of timed repetitions per provider")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_ema.py needs a CUDA GPU (the Triton kernel runs on CPU only in the interpreter)", file=sys.stderr)
        return 2

    from triton.testing import do_bench

    device = torch.device("cuda")

    def bench(fn) -> float:
        return do_bench(fn, warmup=25, rep=args.rep)

    bw = copy_bandwidth(device, bench)
    m = args.momentum
    print(f"# teacher EMA, m = {m}, {torch.cuda.get_device_name(device)}; copy bandwidth {bw / 1e9:.0f} GB/s\n")
    print("| model | params (M) | student | provider | ms | GB/s | % of floor | max abs diff vs foreach |")
    print("|---|---|---|---|---|---|---|---|")
    for arch in args.archs.split(","):
        for dtype_name in args.student_dtypes.split(","):
            for row in bench_model(arch, args.k, dtype_name, m, bw, bench, device):
                print(row)
            torch.cuda.empty_cache()
    print(f"\n{GpuTelemetry(device, quiet=True).line()} (after the last row)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
