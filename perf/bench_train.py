"""Training throughput: the real `Trainer.train_step` on synthetic crops, img/s and MFU.

Runs the production step (schedules, autocast, loss, backward, per-parameter clip, fused AdamW, EMA,
center) on random tensors shaped like the multi-crop batch, so the figure is the GPU-side ceiling with the
data pipeline taken out. MFU is model FLOPs (fastdino.models.flops) over the bf16 matmul rate measured in
the same run.

  python perf/bench_train.py                                  # ViT-S/16, 2x224 + 10x96, batch 128, bf16
  python perf/bench_train.py model.patch_size=8 data.batch_size=64 loss.impl=torch ema.impl=foreach
  python perf/bench_train.py --device cpu --steps 3 --warmup 1 model.arch=vit_tiny model.depth=2 \
      data.global_size=32 data.local_size=16 model.img_size=32 dino.out_dim=1024 data.batch_size=8
  python perf/bench_train.py --config configs/resnet50.yaml      # the official ResNet-50 recipe (SGD, 2x224 + 8x96)
  python perf/bench_train.py --config configs/vit_small16.yaml --engine deepspeed \
      train.deepspeed_config=configs/deepspeed/zero1.json           # DeepSpeed ZeRO-1 (zero2.json: ZeRO-2)

Peak memory is CUDA's max_memory_allocated on a GPU, the process's peak RSS on the CPU. Every run appends
one JSON line to perf/bench_train.jsonl (--results to choose, --results '' for none): date, device, engine,
ZeRO stage, the step shape (fastdino.engine.budget.SHAPE_KEYS), img/s per process, ms/step, peak memory.
`fastdino budget CONFIG` reads the last line whose shape is the config's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

from fastdino.config import load_config
from fastdino.data.demo import DEMO_CLASSES, make_demo_dataset
from fastdino.engine.budget import BENCH_RESULTS, step_shape
from fastdino.engine.trainer import Trainer
from fastdino.models.backbones import arch_label, is_vit
from fastdino.telemetry import GpuTelemetry

DEFAULTS = ["model.arch=vit_small", "model.patch_size=16", "data.batch_size=128", "data.local_crops_number=10",
            "data.num_workers=0", "train.knn_eval=false", "optim.warmup_epochs=0"]


def matmul_tflops(device: torch.device) -> float:
    """Measured bf16 matmul rate (8192^3), the ceiling MFU is quoted against."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * n**3 / (start.elapsed_time(end) / 1e3) / 1e12


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--config", default=None, help="YAML config the overrides apply to (after this script's "
                                                       "defaults: ViT-S/16, batch 128, 10 local crops)")
    parser.add_argument("--method", default="dino", choices=("dino", "sit"), help="train.method: whose step to time")
    parser.add_argument("--engine", default="ddp", choices=("ddp", "deepspeed"),
                        help="train.engine; deepspeed takes train.deepspeed_config (default zero2.json)")
    parser.add_argument("--results", default=str(BENCH_RESULTS),
                        help="JSON-lines file the run is appended to ('' for none)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_train: no CUDA device; this benchmark measures the GPU step (--device cpu for a smoke run)")
        return 2
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        defaults = [] if args.config else DEFAULTS
        fixed = ["data.num_workers=0", "train.knn_eval=false", "train.resume=none"]
        cfg = load_config(args.config, defaults + fixed + [f"train.device={args.device}",
                                                           f"train.output_dir={tmp}/run", f"train.engine={args.engine}",
                                                           f"train.method={args.method}"]
                          + args.overrides)
        d = cfg.data
        per_class = -(-d.batch_size // len(DEMO_CLASSES))
        data = make_demo_dataset(f"{tmp}/data", n_train_per_class=per_class, n_val_per_class=1, size=64)
        cfg.data.path = str(data / "train")
        trainer = Trainer(cfg)
        b = d.batch_size
        shapes = [v.shape for v in trainer.method.data_transform()(Image.new("RGB", (64, 64)))]  # the method's views
        views = [torch.randn(b, *shape, device=device) for shape in shapes]

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize()

        for _ in range(args.warmup):
            trainer.train_step(views, epoch=1)
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        telemetry = GpuTelemetry(device, quiet=True)
        start = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step(views, epoch=1)
        sync()
        seconds = time.perf_counter() - start
        gpu = telemetry.line()  # right after the timed steps: NVML's utilisation covers its last sample period

    flops = trainer.method.train_flops_per_image()  # each method counts its own step (models/flops.py)
    img_s = args.steps * b / seconds
    if device.type == "cuda":
        peak_gib = torch.cuda.max_memory_allocated() / 2**30
    else:  # ru_maxrss: KiB on Linux
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    stage = trainer.backend.stage if args.engine == "deepspeed" else None
    engine = f"deepspeed ZeRO-{stage}" if stage else "ddp"
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}")
    crops = " + ".join(f"{n}x{size}" for size, n in Counter(shape[-1] for shape in shapes).items())
    attention = f", attention {cfg.model.attention}" if is_vit(cfg.model.arch) else ""
    print(f"config: {args.method} {arch_label(cfg.model.arch, cfg.model.patch_size)}, {crops}, batch {b}, "
          f"{trainer.precision}, optim {cfg.optim.name}, loss {getattr(trainer.method, 'loss_impl', 'torch')}, "
          f"ema {cfg.ema.impl}{attention}, engine {engine}")
    print(f"step: {1e3 * seconds / args.steps:.1f} ms; throughput: {img_s:.1f} img/s; "
          f"model FLOPs: {flops / 1e9:.1f} GFLOP/img = {img_s * flops / 1e12:.1f} TFLOP/s; "
          f"peak memory: {peak_gib:.2f} GiB ({'CUDA allocated' if device.type == 'cuda' else 'process RSS'})")
    mfu = None
    if device.type == "cuda":
        peak = matmul_tflops(device)
        mfu = 100 * img_s * flops / 1e12 / peak
        print(f"bf16 matmul rate measured: {peak:.0f} TFLOP/s; MFU: {mfu:.1f}%")
    print(gpu)
    if args.results and trainer.dist.is_main:
        record = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "config": args.config, "overrides": args.overrides, "method": args.method,
            "engine": args.engine, "zero_stage": stage,
            "world_size": trainer.dist.world_size, "shape": {**step_shape(cfg), "train.precision": trainer.precision},
            "img_per_s": img_s,
            "step_ms": 1e3 * seconds / args.steps, "peak_memory_gib": peak_gib, "mfu_percent": mfu,
            "steps": args.steps,
        }
        with Path(args.results).open("a") as f:  # one line per run: a cut run never corrupts earlier lines
            f.write(json.dumps(record) + "\n")
        print(f"recorded in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
