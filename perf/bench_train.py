"""Training throughput: the real `Trainer.train_step` on synthetic crops, img/s and MFU, for DINO and SiT.

Runs the production step (schedules, autocast, loss, backward, per-parameter clip, fused AdamW, EMA, and the
method's own work: DINO's center, SiT's on-device masking and corruption) on random tensors shaped like the
views the method's transform makes, so the figure is the GPU-side ceiling with the data pipeline taken out.
MFU is model FLOPs (fastdino.models.flops, through Method.train_flops_per_image) over the bf16 matmul rate
measured in the same run. `--method both` runs DINO then SiT with the same overrides.

  python perf/bench_train.py                                  # DINO ViT-S/16, 2x224 + 10x96, batch 128, bf16
  python perf/bench_train.py --method both                    # the same, then SiT ViT-S/16, 2x224, batch 128
  python perf/bench_train.py model.patch_size=8 data.batch_size=64 loss.impl=torch ema.impl=foreach
  python perf/bench_train.py --device cpu --steps 3 --warmup 1 --method both model.arch=vit_tiny model.depth=2 \
      data.global_size=32 data.local_size=16 model.img_size=32 dino.out_dim=1024 data.batch_size=8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter

import torch
from PIL import Image

from fastdino.config import load_config
from fastdino.data.demo import DEMO_CLASSES, make_demo_dataset
from fastdino.engine.trainer import Trainer

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


def bench(method: str, args: argparse.Namespace, device: torch.device) -> None:
    """Build a Trainer for `method` on a throwaway data folder, time `args.steps` steps, print the figures."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, DEFAULTS + [f"train.method={method}", f"train.device={args.device}",
                                            f"train.output_dir={tmp}/run"] + args.overrides)
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
        start = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step(views, epoch=1)
        sync()
        seconds = time.perf_counter() - start

    flops = trainer.method.train_flops_per_image()
    img_s = args.steps * b / seconds
    crops = " + ".join(f"{n}x{size}" for size, n in Counter(shape[-1] for shape in shapes).items())
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}")
    print(f"config: {method} {cfg.model.arch}/{cfg.model.patch_size}, {crops}, batch {b}, {trainer.precision}, "
          f"loss {getattr(trainer.method, 'loss_impl', 'torch')}, ema {cfg.ema.impl}, attention {cfg.model.attention}")
    print(f"step: {1e3 * seconds / args.steps:.1f} ms; throughput: {img_s:.1f} img/s; "
          f"model FLOPs: {flops / 1e9:.1f} GFLOP/img = {img_s * flops / 1e12:.1f} TFLOP/s")
    if device.type == "cuda":
        peak = matmul_tflops(device)
        print(f"bf16 matmul rate measured: {peak:.0f} TFLOP/s; MFU: {100 * img_s * flops / 1e12 / peak:.1f}%; "
              f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--method", default="dino", choices=("dino", "sit", "both"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_train: no CUDA device; this benchmark measures the GPU step (--device cpu for a smoke run)")
        return 2
    device = torch.device(args.device)
    for method in ("dino", "sit") if args.method == "both" else (args.method,):
        bench(method, args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
