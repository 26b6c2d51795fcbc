"""The benchmarks stay runnable: bench_train, bench_step and profile_step on the CPU with tiny shapes, GPU-only
benches refuse cleanly, the GPU suite's dry run lists every part."""

import json
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
    """The script under this checkout's fastdino (not whichever copy is pip-installed)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def test_bench_step_smoke_runs_three_providers_from_the_same_weights(tmp_path):
    out = run("-m", "perf.bench_step", "--smoke", "--json", str(tmp_path / "step.json"))
    assert out.returncode == 0, out.stderr
    assert "SMOKE RUN: not performance" in out.stdout
    rows = json.loads((tmp_path / "step.json").read_text())["rows"]
    assert [r["provider"] for r in rows] == ["official", "torch", "fastdino"]
    assert all("error" not in r and r["img_s"] > 0 and r["pct_floor"] > 0 for r in rows), rows
    assert rows[0]["x_official"] == 1.0
    # Same weights, crops and hyper-parameters, fp32 on the CPU: the three steps compute the same first loss.
    losses = [r["loss_first"] for r in rows]
    assert max(losses) - min(losses) <= 1e-4 * abs(losses[0]), losses


def test_bench_step_smoke_of_the_resnet50_case_runs_a_convnet_with_sgd(tmp_path):
    """--cases rn50_b64 --smoke: its twin (ResNet-18, SGD, counted FLOPs), the same first loss from all three."""
    out = run("-m", "perf.bench_step", "--smoke", "--cases", "rn50_b64", "--json", str(tmp_path / "step.json"))
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "step.json").read_text())["rows"]
    assert [r["provider"] for r in rows] == ["official", "torch", "fastdino"]
    assert all("resnet18" in r["config"] and "sgd" in r["config"] and r["gflop_per_img"] > 0 for r in rows), rows
    losses = [r["loss_first"] for r in rows]
    assert max(losses) - min(losses) <= 1e-4 * abs(losses[0]), losses


def test_bench_step_end_to_end_reports_the_trainers_own_figure(tmp_path):
    """--end-to-end runs Trainer.fit on real JPEGs: a row with the img/s of the trainer's log, in the step table."""
    out = run("-m", "perf.bench_step", "--smoke", "--providers", "torch", "--end-to-end", "cpu",
              "--json", str(tmp_path / "step.json"))
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "step.json").read_text())["rows"]
    assert [r["provider"] for r in rows] == ["torch", "fastdino end to end, data.backend=cpu"]
    assert rows[1]["img_s"] > 0 and rows[1]["pct_floor"] > 0 and "error" not in rows[1]


@pytest.mark.parametrize("flags, words", [
    (["--steps", "0"], ["--steps", "positive integer"]),
    (["--warmup", "-1"], ["--warmup"]),
    (["--curve", "-5"], ["--curve"]),
    (["--curve-png", "c.png"], ["--curve-png", "--curve N"]),
    (["--curve", "2", "--curve-png", "/nonexistent/dir/c.png"], ["/nonexistent/dir", "does not exist"]),
    (["--json", "/nonexistent/d/x.json"], ["--json", "does not exist"]),
    (["--providers", "fastdino,fast"], ["'fast'", "fastdino-compile"]),
    (["--end-to-end", "dali"], ["--end-to-end dali", "no CUDA device"]),
    (["--frobnicate"], ["--frobnicate"]),
])
def test_bench_step_refuses_bad_flags_in_one_line_before_any_work(flags, words):
    if "dali" in flags and torch.cuda.is_available():
        pytest.skip("a GPU is visible: the GPU data backends can run")
    out = run("-m", "perf.bench_step", "--smoke", *flags)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert all(w in out.stderr for w in words), out.stderr
    assert out.stdout == ""


def test_bench_step_loss_curves_agree_and_are_drawn(tmp_path):
    """--curve: plain PyTorch and fastdino train the same steps on the same real batches; in fp32 on the CPU the
    curves agree to float rounding, so a step that computes something else shows here."""
    out = run("-m", "perf.bench_step", "--smoke", "--providers", "fastdino", "--curve", "6", "--curve-png",
              str(tmp_path / "curve.png"), "--json", str(tmp_path / "step.json"))
    assert out.returncode == 0, out.stderr
    curves = [r for r in json.loads((tmp_path / "step.json").read_text())["rows"] if "curve" in r]
    assert [r["provider"] for r in curves] == ["torch", "fastdino"] and len(curves[1]["curve"]) == 6
    assert curves[1]["max_rel_diff"] < 1e-4 and len(set(curves[0]["curve"])) > 1
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_step_refuses_unknown_case_in_one_line():
    out = run("-m", "perf.bench_step", "--smoke", "--cases", "vits16_b1024")
    assert out.returncode == 2 and "vits16_b1024" in out.stderr and "Traceback" not in out.stderr


def test_bench_train_cpu_smoke(tmp_path):
    results = tmp_path / "bench_train.jsonl"
    out = run("perf/bench_train.py", "--device", "cpu", "--steps", "2", "--warmup", "1", "--results", str(results),
              *TINY)
    assert out.returncode == 0, out.stderr
    assert "img/s" in out.stdout and "GFLOP/img" in out.stdout and "peak memory" in out.stdout
    assert "GPU telemetry unavailable: the training device is the CPU" in out.stdout
    (record,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert record["engine"] == "ddp" and record["shape"]["model.arch"] == "vit_tiny" and record["img_per_s"] > 0
    assert record["shape"]["train.precision"] == "fp32"  # what ran on the CPU, not "auto"


def test_bench_train_times_the_sit_step_too(tmp_path):
    results = tmp_path / "bench_train.jsonl"
    out = run("perf/bench_train.py", "--device", "cpu", "--steps", "2", "--warmup", "1", "--method", "sit",
              "--results", str(results), *TINY)
    assert out.returncode == 0, out.stderr
    assert "config: sit vit_tiny/8, 2x16" in out.stdout and "GFLOP/img" in out.stdout
    (record,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert record["method"] == "sit" and record["shape"]["train.method"] == "sit"


def test_bench_train_deepspeed_cpu_smoke(tmp_path):
    pytest.importorskip("deepspeed")
    results = tmp_path / "bench_train.jsonl"
    out = run("perf/bench_train.py", "--device", "cpu", "--steps", "1", "--warmup", "1", "--engine", "deepspeed",
              "--results", str(results), *TINY, "train.deepspeed_config=configs/deepspeed/zero1.json")
    assert out.returncode == 0, out.stderr
    assert "engine deepspeed ZeRO-1" in out.stdout
    (record,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert record["engine"] == "deepspeed" and record["zero_stage"] == 1 and record["peak_memory_gib"] > 0


def test_profile_step_cpu_smoke(tmp_path):
    out = run("perf/profile_step.py", "configs/demo.yaml", *TINY, "--steps", "1", "--warmup", "0", "--trace-steps",
              "1", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "report.md").is_file() and "report:" in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
@pytest.mark.parametrize("script", ["perf/bench_dino_loss.py", "perf/bench_ema.py", "perf/bench_train.py"])
def test_gpu_benchmarks_exit_cleanly_without_cuda(script):
    out = run(script)
    assert out.returncode == 2 and "Traceback" not in out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_bench_step_without_smoke_needs_a_gpu():
    out = run("-m", "perf.bench_step")
    assert out.returncode == 2 and "--smoke" in out.stderr and "Traceback" not in out.stderr


def test_gpu_suite_dry_run_lists_every_part_within_the_budget():
    from perf import gpu_suite

    out = run("perf/gpu_suite.py", "--dry-run")
    assert out.returncode == 0, out.stderr
    for part in gpu_suite.PARTS:
        cmd = gpu_suite.shown(gpu_suite.command(part, gpu_suite.Path("$OUT")))
        assert part.name in out.stdout and cmd in out.stdout
    names = {p.name for p in gpu_suite.PARTS}
    assert {"gpu_tests", "kernel_report", "bench_dino_loss", "bench_ema", "bench_step",
            "bench_data", "bench_step_candidates", "bench_curve_end_to_end", "bench_train_sit"} <= names
    # Everything inside one 10-minute command with ~2 minutes to spare (issue 17: at most 8 minutes in all).
    assert gpu_suite.serial_seconds(gpu_suite.PARTS) <= gpu_suite.BUDGET_S <= 480


def test_gpu_suite_time_boxes_parts_and_keeps_their_output(tmp_path, monkeypatch):
    """The orchestration on the CPU with stand-in parts: a part past its box is killed and marked, the others'
    tables, JSON rows and the background part's result all reach the results files."""
    from perf import gpu_suite

    Part = gpu_suite.Part
    parts = (
        Part("bg", ("-c", "import sys; open(sys.argv[1], 'w').write('{\"rows\": [1]}')", "{json}"), 20, "bg",
             background=True),
        Part("table", ("-c", "print('| a | b |')"), 20, "prints a table"),
        Part("hangs", ("-c", "import time; print('started', flush=True); time.sleep(60)"), 3, "sleeps"),
        Part("last", ("-c", "import sys; sys.exit(3)"), 20, "fails"),
    )
    monkeypatch.setattr(gpu_suite, "PARTS", parts)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpu_suite.main(["--out", str(tmp_path)]) == 1  # a part failed
    data = json.loads((tmp_path / "gpu_suite.json").read_text())
    by_name = {p["name"]: p for p in data["parts"]}
    assert set(by_name) == {"bg", "table", "hangs", "last"}
    assert by_name["bg"]["data"] == {"rows": [1]} and by_name["bg"]["returncode"] == 0
    assert by_name["hangs"]["timed_out"] and by_name["hangs"]["seconds"] < 30
    assert by_name["last"]["returncode"] == 3
    md = (tmp_path / "gpu_suite.md").read_text()
    assert "| a | b |" in md and "TIMED OUT" in md and "exit code 3" in md
    assert "Command: `python perf/gpu_suite.py --out" in md
    assert "started" in (tmp_path / "gpu_suite.log").read_text()


@pytest.mark.parametrize("case", ["vits16_b128", "vits16_b64_global", "vits8_b32", "vitb16_b64"])
def test_bench_step_cases_are_valid_fastdino_configs(case, tmp_path):
    """The GPU cases cannot run here; their fastdino configs must at least load (a bad key would waste a GPU run)."""
    from fastdino.config import load_config
    from perf.bench_step import CASES, fastdino_overrides

    c = CASES[case]
    cfg = load_config(None, fastdino_overrides(c, torch.device("cpu"), tmp_path, tmp_path / "run"))
    assert (cfg.model.arch, cfg.model.patch_size, cfg.data.batch_size, cfg.data.local_crops_number) == (
        c.arch, c.patch, c.batch, c.n_local)
