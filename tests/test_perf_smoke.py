"""The benchmarks stay runnable: bench_train on the CPU with tiny shapes, kernel benches refuse cleanly."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TINY = ["model.arch=vit_tiny", "model.depth=1", "model.patch_size=8", "model.img_size=16", "data.global_size=16",
        "data.local_size=8", "data.local_crops_number=2", "dino.out_dim=64", "dino.hidden_dim=32",
        "dino.bottleneck_dim=16", "data.batch_size=4"]


ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    # the scripts import this checkout's fastdino, not whichever copy is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


@pytest.mark.parametrize("method", ["dino", "sit"])
def test_bench_train_cpu_smoke(method):
    out = run("perf/bench_train.py", "--device", "cpu", "--steps", "2", "--warmup", "1", "--method", method, *TINY)
    assert out.returncode == 0, out.stderr
    assert "img/s" in out.stdout and "GFLOP/img" in out.stdout and f"config: {method} " in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
@pytest.mark.parametrize("script", ["perf/bench_dino_loss.py", "perf/bench_ema.py", "perf/bench_train.py"])
def test_gpu_benchmarks_exit_cleanly_without_cuda(script):
    out = run(script)
    assert out.returncode == 2 and "Traceback" not in out.stderr
