"""The benchmarks stay runnable: bench_train, bench_step and profile_step on the CPU with tiny shapes, GPU-only
benches refuse cleanly, the GPU suite's dry run lists every part."""

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
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
    (["--no-steps"], ["--no-steps", "--curve N"]),
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
    curves agree to float rounding, so a step that computes something else shows here. --no-steps: the curve
    alone (the GPU suite's part), on the JPEGs of --data, written there when missing and kept for the next part."""
    out = run("-m", "perf.bench_step", "--smoke", "--providers", "fastdino", "--no-steps", "--curve", "6",
              "--curve-png", str(tmp_path / "curve.png"), "--data", str(tmp_path / "jpegs"),
              "--json", str(tmp_path / "step.json"))
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "step.json").read_text())["rows"]
    assert all("curve" in r for r in rows)  # no timed step rows
    assert [r["provider"] for r in rows] == ["torch", "fastdino"] and len(rows[1]["curve"]) == 6
    assert rows[1]["max_rel_diff"] < 1e-4 and len(set(rows[0]["curve"])) > 1
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((tmp_path / "jpegs" / "train").glob("*.jpg"))) == 8 * 4  # the curve's pool of 8 batches of 4
    assert "torch: 6 steps" in out.stdout and "fastdino: 6 steps" in out.stdout  # each curve printed as it ends


def test_make_jpegs_in_parallel_writes_the_serial_files_and_completes_a_cut_off_folder(tmp_path):
    """The suite's shared JPEGs: any number of processes writes the same bytes; a half-written file left by a run
    cut off (*.part) is not an image, and the next call writes only what is missing."""
    from perf.bench_data import make_jpegs

    serial = make_jpegs(tmp_path / "serial", 5, 64, 48, workers=1) / "train"
    parallel = make_jpegs(tmp_path / "parallel", 3, 64, 48, workers=2) / "train"
    (parallel / "000003.part").write_bytes(b"half a jpeg")
    first = (parallel / "000000.jpg").stat().st_mtime_ns
    make_jpegs(tmp_path / "parallel", 5, 64, 48, workers=2)
    names = sorted(p.name for p in serial.glob("*.jpg"))
    assert names == sorted(p.name for p in parallel.glob("*.jpg")) and len(names) == 5
    assert all((serial / n).read_bytes() == (parallel / n).read_bytes() for n in names)
    assert (parallel / "000000.jpg").stat().st_mtime_ns == first  # kept, not rewritten


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


def test_gpu_suite_dry_run_prints_every_box_and_fits_nine_minutes():
    """Issue 21: every part's box, estimate and margin and the total are printed; the boxes in order (a part beside
    another overlaps it) plus the suite's start fit 9 minutes, every estimate (cold compiles, data making) fits
    its box, and a part beside another is no longer than it."""
    from perf import gpu_suite

    out = run("perf/gpu_suite.py", "--dry-run")
    assert out.returncode == 0, out.stderr
    setting = gpu_suite.Setting(out=gpu_suite.Path("$OUT"))
    for part in gpu_suite.PARTS:
        line = next(ln for ln in out.stdout.splitlines() if ln.split()[:1] == [part.name])
        assert line.split()[1:4] == [str(part.box_s), str(part.estimate_s), str(part.box_s - part.estimate_s)], line
        assert gpu_suite.shown(gpu_suite.command(part, setting)) in out.stdout and part.basis in out.stdout
    names = [p.name for p in gpu_suite.PARTS]
    assert {"gpu_tests", "kernel_report", "bench_dino_loss", "bench_ema", "bench_step", "bench_data", "make_data",
            "bench_step_candidate", "bench_curve", "bench_end_to_end", "bench_train_sit",
            "install_wheels"} <= set(names)
    serial = gpu_suite.serial_seconds(gpu_suite.PARTS)
    assert f"start {gpu_suite.START_S} s (estimated) + {serial} s of boxes in order = " in out.stdout
    assert gpu_suite.START_S + serial <= gpu_suite.NINE_MINUTES_S == 540
    for i, part in enumerate(gpu_suite.PARTS):
        assert 0 < part.estimate_s <= part.box_s, part.name
        if part.beside:
            host = next(p for p in gpu_suite.PARTS[i + 1:] if not p.beside)
            assert part.box_s <= host.box_s, (part.name, host.name)
    # The shared JPEGs come before every part that reads them; the curve (no speed) is the only GPU part beside.
    assert names.index("make_data") < min(names.index(n) for n in ("bench_curve", "bench_data", "bench_end_to_end"))
    assert [p.name for p in gpu_suite.PARTS if p.beside] == ["install_wheels", "kernel_report", "bench_curve"]
    # The GPU tests: one line per test and the failures' and skips' reasons; a per-test timeout and failures as they
    # happen where the machine (or the carried wheels) has the plugins.
    tests = next(p for p in gpu_suite.PARTS if p.name == "gpu_tests")
    full = gpu_suite.command(tests, gpu_suite.Setting(out=setting.out, have=frozenset(gpu_suite.NEEDS)))
    assert {"-v", "-rfEs"} <= set(full) and full[-3:] == ["--timeout", "60", "--instafail"]
    assert 60 < tests.box_s


def test_gpu_suite_dry_run_shows_the_chosen_candidate_and_refuses_a_bad_one():
    out = run("perf/gpu_suite.py", "--dry-run", "--candidate", "cudagraphs", "--only", "bench_step_candidate")
    assert out.returncode == 0 and "--providers fastdino-cudagraphs" in out.stdout, out.stderr
    assert "fastdino-compile" not in out.stdout.replace("default compile", "")
    bad = run("perf/gpu_suite.py", "--dry-run", "--candidate", "jit")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--candidate" in bad.stderr


def _stand_in_suite(tmp_path, monkeypatch, parts, *flags):
    from perf import gpu_suite

    monkeypatch.setattr(gpu_suite, "PARTS", parts)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    code = gpu_suite.main(["--out", str(tmp_path / "out"), *flags])
    data = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())
    return code, data, {p["name"]: p for p in data["parts"]}


def test_gpu_suite_time_boxes_parts_and_keeps_their_output(tmp_path, monkeypatch):
    """The orchestration on the CPU with stand-in parts: a part past its box is killed and marked, the others'
    tables, JSON rows and the result of the part beside them all reach the results files; the placeholders
    ({data}: the shared scratch folder) resolve; without carried wheels the block says what was skipped."""
    from perf import gpu_suite

    Part = gpu_suite.Part
    parts = (
        Part("bg", ("-c", "import sys; open(sys.argv[1], 'w').write('{\"rows\": [1]}')", "{json}"), 20, 1, "b", "bg",
             beside=True),
        Part("table", ("-c", "import sys; print('| a | b |', sys.argv[1].endswith('data'))", "{data}"), 20, 1, "b",
             "prints a table"),
        Part("hangs", ("-c", "import time; print('started', flush=True); time.sleep(60)"), 3, 1, "b", "sleeps"),
        Part("last", ("-c", "import sys; sys.exit(3)"), 20, 1, "b", "fails"),
    )
    code, data, by_name = _stand_in_suite(tmp_path, monkeypatch, parts, "--wheels", str(tmp_path / "none"))
    assert code == 1  # a part failed
    assert set(by_name) == {"bg", "table", "hangs", "last"}
    assert by_name["bg"]["data"] == {"rows": [1]} and by_name["bg"]["returncode"] == 0
    assert by_name["hangs"]["timed_out"] and by_name["hangs"]["seconds"] < 30
    assert by_name["last"]["returncode"] == 3 and by_name["table"]["command"].endswith("$DATA")
    md = (tmp_path / "out" / "gpu_suite.md").read_text()
    assert "| a | b | True" in md and "TIMED OUT" in md and "exit code 3" in md
    assert "Command: `python perf/gpu_suite.py --out" in md and "(estimate 1 s)" in md
    assert "No carried wheels" in md and "perf/gpu_wheels.sh" in md
    assert ("Not there, so skipped: xformers" in md) == (importlib.util.find_spec("xformers") is None)
    assert "started" in (tmp_path / "out" / "gpu_suite.log").read_text()
    assert not any((tmp_path / "out").glob("*.json.tmp"))


def test_gpu_suite_installs_the_carried_wheels_the_machine_lacks(tmp_path, monkeypatch):
    """A carried wheel whose package is missing is installed into the suite's temporary target, importable by the
    parts after it (PYTHONPATH); one whose package is already there is left alone."""
    from perf import gpu_suite

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    info = "carried_probe_pkg-1.0.dist-info"
    with zipfile.ZipFile(wheels / "carried_probe_pkg-1.0-py3-none-any.whl", "w") as wheel:  # the smallest wheel
        wheel.writestr("carried_probe_pkg/__init__.py", "VALUE = 42\n")
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: carried-probe-pkg\nVersion: 1.0\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                        "Tag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", f"carried_probe_pkg/__init__.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n"
                                         f"{info}/RECORD,,\n")
    (wheels / "pytest-0.0.1-py3-none-any.whl").write_bytes(b"")  # present here: never installed
    missing, present = gpu_suite.missing_wheels(wheels)
    assert [Path(w).name.split("-")[0] for w in missing] == ["carried_probe_pkg"] and len(present) == 1
    install = next(p for p in gpu_suite.PARTS if p.name == "install_wheels")
    reader = gpu_suite.Part("reads", ("-c", "import carried_probe_pkg as m; print('value', m.VALUE)"), 20, 1, "b",
                            "imports the carried package")
    beside = gpu_suite.Part("meanwhile", ("-c", "pass"), 20, 1, "b", "runs while the wheels install")
    code, data, by_name = _stand_in_suite(tmp_path, monkeypatch, (install, beside, reader), "--wheels", str(wheels))
    assert code == 0, by_name
    assert "value 42" in by_name["reads"]["stdout"] and "$SITE" in by_name["install_wheels"]["command"]
    assert "1 to install (carried_probe_pkg), 1 already there" in data["notes"][0]


@pytest.mark.parametrize("case", ["vits16_b128", "vits16_b64_global", "vits8_b32", "vitb16_b64"])
def test_bench_step_cases_are_valid_fastdino_configs(case, tmp_path):
    """The GPU cases cannot run here; their fastdino configs must at least load (a bad key would waste a GPU run)."""
    from fastdino.config import load_config
    from perf.bench_step import CASES, fastdino_overrides

    c = CASES[case]
    cfg = load_config(None, fastdino_overrides(c, torch.device("cpu"), tmp_path, tmp_path / "run"))
    assert (cfg.model.arch, cfg.model.patch_size, cfg.data.batch_size, cfg.data.local_crops_number) == (
        c.arch, c.patch, c.batch, c.n_local)
