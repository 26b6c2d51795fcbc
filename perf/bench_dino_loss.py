"""Benchmark the DINO loss: official-style pair loop vs the PyTorch reference vs the fused Triton kernel.

Run from the repository root on a CUDA machine:  python -m perf.bench_dino_loss [--batch 64 128] [--mode full]

Providers:
  official  the loop of the official DINO code (main_dino.py, DINOLoss.forward), re-written here as the baseline to
            beat: one log_softmax of B x K per (teacher view, student view) pair, under autocast for half dtypes
            as the official fp16 runs use it (softmax / log_softmax in fp32).
  torch     fastdino.losses.dino.dino_loss_ref (one log_softmax per student row, fp32 math).
  triton    fastdino.kernels.dino_loss.dino_loss_triton (three fused passes; the gradient is written in the forward).

Modes: forward (as in training: the student requires grad), backward (backward alone, graph retained), full
(forward + backward; the default). Times are medians of triton.testing.do_bench, which flushes L2 between runs.

Columns: ms; extra peak memory = torch.cuda.max_memory_allocated during the step minus what was allocated before
it (the inputs), which includes the (n_crops*B, K) student gradient every provider must produce; GB/s = floor
bytes / time; % of floor = (floor bytes / copy bandwidth) / time, where the floor bytes are what a fused loss must
move (read S and T once, write dS once: (2*n_crops + 2) * B * K * itemsize, see dino_loss_ref's docstring) and the
copy bandwidth is measured in the same run with a 1 GiB device-to-device copy (bytes read + written / time).
The floor is that of the whole op (forward + backward), so % of floor is the figure of merit in full mode only;
forward and backward rows show how the time splits (the fused kernel does its work in the forward and its
backward is a single scale of the saved gradient by grad_output).
"""

import argparse
import contextlib
import os
import sys

import torch
import torch.nn.functional as F
import triton

from fastdino.kernels.dino_loss import dino_loss_triton
from fastdino.losses.dino import dino_loss_ref
from fastdino.telemetry import GpuTelemetry

STUDENT_TEMP = 0.1
TEACHER_TEMP = 0.04
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MIB = 2**20


def official_dino_loss(student_logits, teacher_logits, center, student_temp, teacher_temp):
    """Official DINO style: a Python loop over crop pairs, a full log_softmax of B x K for each pair."""
    batch = teacher_logits.shape[0] // 2
    n_crops = student_logits.shape[0] // batch
    half = student_logits.dtype in (torch.float16, torch.bfloat16)
    with torch.autocast("cuda", dtype=student_logits.dtype) if half else contextlib.nullcontext():
        student_out = (student_logits / student_temp).chunk(n_crops)
        teacher_out = F.softmax((teacher_logits - center) / teacher_temp, dim=-1).detach().chunk(2)
        total_loss, n_loss_terms = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(n_crops):
                if v == iq:
                    continue  # skip the case where student and teacher see the same view
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)  # (B,)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
    teacher_sum = teacher_logits.float().sum(0)  # (K,), the official center update's batch sum
    return total_loss, teacher_sum


PROVIDERS = {"official": official_dino_loss, "torch": dino_loss_ref, "triton": dino_loss_triton}


def setup(batch, n_crops, k, dtype):
    """Inputs at the training layout: student (n_crops*B, K) requiring grad, teacher (2B, K), center (K,) fp32."""
    student = torch.randn(n_crops * batch, k, device="cuda").to(dtype).requires_grad_()
    teacher = torch.randn(2 * batch, k, device="cuda").to(dtype)
    center = 0.1 * torch.randn(k, device="cuda")
    floor_bytes = (2 * n_crops + 2) * batch * k * student.element_size()
    return student, teacher, center, floor_bytes


def make_step(fn, mode, student, teacher, center):
    """The callable to time for `mode`."""
    if mode == "forward":
        return lambda: fn(student, teacher, center, STUDENT_TEMP, TEACHER_TEMP)
    if mode == "full":

        def full():
            fn(student, teacher, center, STUDENT_TEMP, TEACHER_TEMP)[0].backward()

        return full
    loss = fn(student, teacher, center, STUDENT_TEMP, TEACHER_TEMP)[0]
    return lambda: loss.backward(retain_graph=True)


def time_ms(step, student):
    return triton.testing.do_bench(step, warmup=25, rep=100, grad_to_none=[student], return_mode="median")


def extra_peak_mib(step, student):
    student.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    student.grad = None
    return extra / MIB


def copy_bandwidth_gbs(nbytes=2**30):
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    return 2 * nbytes / (ms * 1e-3) / 1e9


def check_agreement(student, teacher, center):
    """Guard against timing a wrong kernel: the fused loss must match the reference on these inputs."""
    with torch.no_grad():
        loss_t, sum_t = dino_loss_triton(student, teacher, center, STUDENT_TEMP, TEACHER_TEMP)
        loss_r, sum_r = dino_loss_ref(student, teacher, center, STUDENT_TEMP, TEACHER_TEMP)
    torch.testing.assert_close(loss_t, loss_r, rtol=1e-4, atol=0)
    torch.testing.assert_close(sum_t, sum_r, rtol=1e-4, atol=1e-3)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 128], help="per-GPU batch B")
    parser.add_argument("--crops", type=int, default=12, help="crops per image (2 global + locals)")
    parser.add_argument("-k", type=int, default=65536, help="head output width K")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    parser.add_argument("--mode", nargs="+", choices=["forward", "backward", "full"], default=["full"])
    parser.add_argument("--providers", nargs="+", choices=sorted(PROVIDERS), default=list(PROVIDERS))
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_dino_loss: needs a CUDA GPU (none found); nothing was measured.", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("bench_dino_loss: TRITON_INTERPRET=1 would time the Triton interpreter; unset it.", file=sys.stderr)
        return 2

    bandwidth = copy_bandwidth_gbs()
    torch.cuda.empty_cache()  # give the copy buffers back before the inputs are made
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {bandwidth:.0f} GB/s (read + write)")
    print(f"K = {args.k}, {args.crops} crops, tau_s = {STUDENT_TEMP}, tau_t = {TEACHER_TEMP}\n")
    print("| B | dtype | mode | provider | ms | extra peak MiB | GB/s | % of floor | floor MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch in args.batch:
        for dtype_name in args.dtype:
            student, teacher, center, floor_bytes = setup(batch, args.crops, args.k, DTYPES[dtype_name])
            check_agreement(student, teacher, center)
            floor_ms = floor_bytes / (bandwidth * 1e9) * 1e3
            for mode in args.mode:
                for name in args.providers:
                    step = make_step(PROVIDERS[name], mode, student, teacher, center)
                    mem = extra_peak_mib(step, student)
                    ms = time_ms(step, student)
                    gbs = floor_bytes / (ms * 1e-3) / 1e9
                    print(
                        f"| {batch} | {dtype_name} | {mode} | {name} | {ms:.3f} | {mem:.0f} | {gbs:.0f} "
                        f"| {100 * floor_ms / ms:.1f} | {floor_bytes / MIB:.0f} |"
                    )
                    del step
            del student, teacher, center
            torch.cuda.empty_cache()
    print(f"\n{GpuTelemetry('cuda', quiet=True).line()} (after the last row)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
