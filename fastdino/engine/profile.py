"""`fastdino profile`: where the time of a training step goes (issue 16).

Builds the real `Trainer` from a config and drives its own `train_step` (not a copy of it) in three stages:

1. `warmup` steps, not measured: the allocator, autotuners and caches settle.
2. `steps` timed steps under a `PhaseTimer` (fastdino.telemetry): the time of each phase marked in the step
   (CUDA events on a GPU, wall clock on the CPU), the step time and throughput, model FLOP/s against a
   matmul of the training dtype timed in the same run (MFU, % of the FLOP floor), peak memory, and the
   NVML counters of the GPU.
3. `trace_steps` steps under `torch.profiler`: the top kernels (GPU) or ops (CPU) by self time and the
   Chrome trace. Kept apart from stage 2 because the profiler's own overhead would distort the timings.

Data: synthetic crops by default: the demo patterns drawn into a temporary folder, augmented once by the
method's own transform, and that batch fed to every step, which takes the data pipeline out as
perf/bench_train.py does. With `real_data` the config's data.path goes through the training loader, and
"data wait" is the time each step waits for it.

The report folder gets report.md, phases.png (reports.plots.plot_phases), trace.json (chrome://tracing or
https://ui.perfetto.dev) and profile.json (the same figures, for scripts).
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from fastdino.config import Config
from fastdino.data.batch import build_loader
from fastdino.data.demo import DEMO_CLASSES, make_demo_dataset
from fastdino.data.files import collate_views
from fastdino.engine.trainer import Trainer
from fastdino.models.backbones import arch_label, is_vit
from fastdino.reports.plots import plot_phases
from fastdino.telemetry import GPU_KEYS, GpuTelemetry, PhaseTimer

# The phases of Trainer.train_step and Method.forward in step order; phases found but not listed follow them.
PHASE_ORDER = ("data wait", "copy to device", "teacher forward", "student forward", "loss", "center update",
               "backward", "clip", "optimizer", "EMA")
TOP_OPS = 15
SECTIONS = ("## Data", "## Time per phase", "## Top ", "## FLOPs", "## Peak memory", "## GPU telemetry", "## Files")


def device_words(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3' or '2-core x86_64 CPU' (the cores this process may run on)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores}-core {platform.machine()} CPU"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> tuple[float, int]:
    """Measured rate (TFLOP/s) of an n x n x n matmul in `dtype`, and n: 8192 on a GPU (10 timed runs),
    2048 on the CPU (2 runs, about a second on 2 cores). Under the process's TF32 setting for fp32."""
    n, runs = (8192, 10) if device.type == "cuda" else (2048, 2)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(runs):
        a @ b
    _sync(device)
    return runs * 2 * n**3 / (time.perf_counter() - start) / 1e12, n


def peak_memory(device: torch.device) -> tuple[int | None, str]:
    """(bytes, what they are): CUDA max_memory_allocated since the last reset, or the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), (
            "CUDA max_memory_allocated during the timed steps (tensors only; the caching allocator reserved "
            f"{torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB)")
    try:
        import resource
    except ImportError:
        return None, "not available on this platform (no `resource` module)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, (
        "peak resident set size of the whole process since it started (ru_maxrss): Python, libraries, the "
        "data and both networks included; the CPU has no per-tensor peak like CUDA's")


def _synthetic_batches(trainer: Trainer) -> Iterator[list[torch.Tensor]]:
    """One batch of the method's own views of the demo images, fed again and again (pinned on CUDA)."""
    ds, b = trainer.dataset, trainer.cfg.data.batch_size
    views, _, _ = collate_views([ds[i % len(ds)] for i in range(b)])
    if trainer.device.type == "cuda":
        views = [v.pin_memory() for v in views]
    return itertools.repeat(views)


def _loader_batches(trainer: Trainer) -> Iterator[list[torch.Tensor]]:
    """The training loader over data.path, epoch after epoch."""
    cfg, d = trainer.cfg, trainer.dist
    for epoch in itertools.count():
        loader = build_loader(trainer.dataset, cfg.data.batch_size, cfg.data.num_workers, seed=cfg.train.seed,
                              epoch=epoch, rank=d.rank, world_size=d.world_size)
        for views, _labels, _skipped in loader:
            yield views


def _run_steps(trainer: Trainer, batches: Iterator, n: int, epoch: int) -> float:
    """n training steps; returns the seconds spent waiting for batches (host wall clock)."""
    waited = 0.0
    for _ in range(n):
        tick = time.perf_counter()
        with torch.profiler.record_function("data wait"):
            views = next(batches)
        waited += time.perf_counter() - tick
        trainer.train_step(views, epoch)
    return waited


def _top_ops(prof, device: torch.device, steps: int, exclude: set[str]) -> tuple[list[dict], str]:
    """The TOP_OPS entries by self time per step: CUDA kernels on a GPU, CPU ops on the CPU."""
    if device.type == "cuda":
        what = "CUDA kernels by self device time"
        rows = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]

        def self_us(e):
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
    else:
        what = "CPU ops by self CPU time"
        rows = list(prof.key_averages())

        def self_us(e):
            return e.self_cpu_time_total
    rows = [e for e in rows if e.key not in exclude and not e.key.startswith("ProfilerStep")]
    total = sum(self_us(e) for e in rows) or 1.0
    top = sorted(rows, key=self_us, reverse=True)[:TOP_OPS]
    return [{"name": e.key, "calls_per_step": e.count / steps, "ms_per_step": self_us(e) / 1e3 / steps,
             "pct": 100 * self_us(e) / total} for e in top], what


def _views_words(views: list[torch.Tensor]) -> str:
    """'2 x 32x32 + 2 x 24x24 px per image' from a batch's views."""
    sizes = [tuple(v.shape[-2:]) for v in views]
    groups = [(size, len(list(g))) for size, g in itertools.groupby(sizes)]
    return " + ".join(f"{n} x {h}x{w}" for (h, w), n in groups) + " px per image"


def profile_training(cfg: Config, out_dir: str | Path, steps: int = 10, warmup: int = 3, trace_steps: int = 2,
                     real_data: bool = False) -> Path:
    """Profile `cfg`'s training step and write the report folder `out_dir`; returns out_dir/report.md.

    Starts from a fresh initialisation (train.resume=none) and never writes a checkpoint. The step runs at the
    middle epoch of the schedule (train.epochs // 2), past the frozen-last-layer and warm-up epochs.
    Raises the trainer's UserError subclasses (bad data.path with `real_data`, bad config) before any step.
    """
    if steps < 1 or trace_steps < 1 or warmup < 0:
        raise ValueError(f"steps={steps} and trace_steps={trace_steps} must be >= 1, warmup={warmup} >= 0")
    out_dir = Path(out_dir)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume="none", output_dir=str(out_dir)))
    with tempfile.TemporaryDirectory(prefix="fastdino-profile-") as tmp:
        if not real_data:  # the Trainer indexes a data folder: a few demo images, enough for one batch
            per_class = math.ceil(cfg.data.batch_size / len(DEMO_CLASSES))
            root = make_demo_dataset(tmp, n_train_per_class=per_class, n_val_per_class=1, size=64)
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(root / "train")))
        trainer = Trainer(cfg)
        batches = _loader_batches(trainer) if real_data else _synthetic_batches(trainer)
        return _profile(trainer, batches, out_dir, steps, warmup, trace_steps, real_data)


def _profile(trainer: Trainer, batches: Iterator, out_dir: Path, steps: int, warmup: int, trace_steps: int,
             real_data: bool) -> Path:
    cfg, device = trainer.cfg, trainer.device
    epoch = cfg.train.epochs // 2
    trainer.step = epoch * trainer.steps_per_epoch  # schedules (lr, momentum) at the middle of the run
    telemetry = GpuTelemetry(device, quiet=True)
    batch = cfg.data.batch_size * trainer.dist.world_size
    first = next(batches)
    batches = itertools.chain([first], batches)

    _run_steps(trainer, batches, warmup, epoch)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with PhaseTimer(device) as timer:
        waited = _run_steps(trainer, batches, steps, epoch)
        _sync(device)
    seconds = time.perf_counter() - start
    gpu = telemetry.sample()  # right after the timed steps: NVML's utilisation covers its last sample period
    step_ms = 1e3 * seconds / steps
    phases = {"data wait": 1e3 * waited / steps}
    phases.update({k: v / steps for k, v in timer.totals_ms().items()})
    order = [p for p in PHASE_ORDER if p in phases] + [p for p in phases if p not in PHASE_ORDER]
    phases = {p: phases[p] for p in order}
    phases["other"] = max(0.0, step_ms - sum(phases.values()))
    memory, memory_what = peak_memory(device)

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(trainer.precision, torch.float32)
    rate, n = matmul_tflops(device, dtype)
    flops = trainer.method.train_flops_per_image()
    img_s = steps * batch / seconds

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.profiler.profile(activities=activities) as prof, PhaseTimer(device):  # phases named in the trace
        _run_steps(trainer, batches, trace_steps, epoch)
        _sync(device)
    prof.export_chrome_trace(str(out_dir / "trace.json"))
    top, top_what = _top_ops(prof, device, trace_steps, set(phases))

    clock = "CUDA events" if device.type == "cuda" else "wall clock"
    label = arch_label(cfg.model.arch, cfg.model.patch_size)
    title = f"{label}, batch {batch}, {trainer.precision}, {device_words(device)}"
    plot_phases(phases, out_dir / "phases.png", step_ms, title, clock)
    figures = {
        "date": datetime.date.today().isoformat(), "device": device_words(device), "torch": torch.__version__,
        "precision": trainer.precision, "batch": batch, "views": _views_words(first),
        "data": "real" if real_data else "synthetic", "steps": steps, "warmup": warmup, "trace_steps": trace_steps,
        "epoch": epoch, "step_ms": step_ms, "img_per_s": img_s, "phases_ms": phases, "phase_clock": clock,
        "top_ops": top, "top_ops_what": top_what, "flops_per_image": flops, "matmul_n": n,
        "matmul_dtype": str(dtype).removeprefix("torch."), "matmul_tflops": rate,
        "achieved_tflops": None if flops is None else flops * img_s / 1e12,
        "peak_memory_bytes": memory, "peak_memory_what": memory_what,
        "gpu_telemetry": gpu if telemetry.available else {"unavailable": telemetry.reason},
    }
    (out_dir / "profile.json").write_text(json.dumps(figures, indent=2) + "\n")
    report = out_dir / "report.md"
    report.write_text(_report_md(cfg, figures))
    return report


def _report_md(cfg: Config, f: dict) -> str:
    m, d = cfg.model, cfg.data
    step_ms, lines = f["step_ms"], []
    add = lines.append
    vit = f" depth {m.depth or 12}, patch {m.patch_size}, attention {m.attention}" if is_vit(m.arch) else ""
    add(f"# Training step profile: {arch_label(m.arch, m.patch_size)}, batch {f['batch']}\n")
    add(f"{f['date']}, {f['device']}, torch {f['torch']}, {f['precision']}; {m.arch}{vit}, "
        f"optim.name={cfg.optim.name}, {f['views']}; loss.impl={cfg.loss.impl}, "
        f"ema.impl={cfg.ema.impl}, optim.fused={cfg.optim.fused}. Steps: {f['warmup']} warm-up, {f['steps']} timed, "
        f"{f['trace_steps']} traced, with the schedules at epoch {f['epoch']}.\n")
    add("## Data\n")
    if f["data"] == "synthetic":
        add("Synthetic crops: the demo patterns, augmented once by the method's transform, the same batch every "
            "step. The data pipeline is taken out, so 'data wait' is only the hand-over of a ready batch. "
            "`--real-data` reads data.path through the training loader instead.\n")
    else:
        add(f"Real data: {d.path} through the training loader ({d.num_workers} workers); 'data wait' is the time "
            "each step waited for its batch.\n")
    add("## Time per phase\n")
    add(f"One step: **{step_ms:.2f} ms** ({f['img_per_s']:.1f} img/s). Phases timed by {f['phase_clock']}"
        + ("; 'data wait' is host wall clock, which overlaps the GPU's work on the previous step"
           if f["phase_clock"] == "CUDA events" else "")
        + "; 'other' is the rest of the step (schedules, the non-finite check, Python).\n")
    add("| phase | ms per step | % of step |\n|---|---|---|")
    for name, ms in f["phases_ms"].items():
        add(f"| {name} | {ms:.3f} | {100 * ms / step_ms:.1f} |")
    add("\n![time per phase](phases.png)\n")
    add(f"## Top {len(f['top_ops'])} {f['top_ops_what']}\n")
    add(f"Over the {f['trace_steps']} traced steps, per step; % of the self time of all of them.\n")
    add("| name | calls per step | ms per step | % |\n|---|---|---|---|")
    for op in f["top_ops"]:
        add(f"| `{op['name']}` | {op['calls_per_step']:g} | {op['ms_per_step']:.3f} | {op['pct']:.1f} |")
    add("\n## FLOPs\n")
    rate = f"{f['matmul_tflops']:.3g} TFLOP/s measured now ({f['matmul_n']}^3 {f['matmul_dtype']} matmul)"
    if f["flops_per_image"] is None:
        add(f"This method does not count its FLOPs. Matmul rate: {rate}.\n")
    else:
        floor_ms = f["flops_per_image"] * f["batch"] / (f["matmul_tflops"] * 1e12) * 1e3
        add("| figure | value |\n|---|---|")
        add(f"| model FLOPs per image (models/flops.py: matmuls, 2 per multiply-add) | "
            f"{f['flops_per_image'] / 1e9:.3f} GFLOP |")
        add(f"| achieved | {f['achieved_tflops']:.3g} TFLOP/s |")
        add(f"| matmul rate, the ceiling | {rate} |")
        add(f"| FLOP floor of one step at that rate | {floor_ms:.2f} ms |")
        add(f"| % of the FLOP floor (MFU) | {100 * floor_ms / step_ms:.1f}% |\n")
    add("## Peak memory\n")
    mem = f["peak_memory_bytes"]
    add(f"{'not measured' if mem is None else f'{mem / 2**30:.2f} GiB'}: {f['peak_memory_what']}.\n")
    add("## GPU telemetry (NVML)\n")
    gpu = f["gpu_telemetry"]
    if "unavailable" in gpu:
        add(f"GPU telemetry unavailable: {gpu['unavailable']}.\n")
    else:
        add("Sampled right after the timed steps.\n\n| counter | value |\n|---|---|")
        for key, words in GPU_KEYS.items():
            if key in gpu:
                add(f"| {words} | {gpu[key]:.1f} |")
        add("")
    add("## Files\n")
    add("- `phases.png`: the phase bars above\n- `trace.json`: the traced steps; open in https://ui.perfetto.dev "
        "or chrome://tracing (phases are named ranges)\n- `profile.json`: every figure of this report\n")
    return "\n".join(lines)
