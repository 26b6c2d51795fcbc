"""`fastdino profile` on the CPU: every section of the report, the phase chart, the trace, consistent figures."""

import json

import pytest
from matplotlib.image import imread

from fastdino.cli import main
from fastdino.config import load_config
from fastdino.data.demo import make_demo_dataset
from fastdino.engine.profile import SECTIONS, profile_training

TINY = [
    "model.arch=vit_tiny", "model.depth=2", "model.patch_size=8", "model.img_size=32", "dino.out_dim=64",
    "dino.hidden_dim=32", "dino.bottleneck_dim=16", "data.global_size=32", "data.local_size=16",
    "data.local_crops_number=2", "data.batch_size=4", "data.num_workers=0", "train.epochs=2",
    "optim.warmup_epochs=1",
]
STEP_PHASES = ["data wait", "copy to device", "teacher forward", "student forward", "loss", "center update",
               "backward", "clip", "optimizer", "EMA"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    path = profile_training(load_config(None, TINY), out, steps=3, warmup=1, trace_steps=1)
    return out, path.read_text(), json.loads((out / "profile.json").read_text())


def test_report_has_every_section(report):
    _, text, _ = report
    for heading in SECTIONS:
        assert heading in text, heading
    assert "Synthetic crops" in text and "wall clock" in text and "peak resident set size" in text
    assert "GPU telemetry unavailable: the training device is the CPU" in text
    assert "2 x 32x32 + 2 x 16x16 px per image" in text


def test_phases_cover_the_step_in_order(report):
    _, _, figures = report
    phases = figures["phases_ms"]
    assert list(phases) == STEP_PHASES + ["other"]
    assert all(v >= 0 for v in phases.values())
    assert phases["backward"] > 0 and phases["student forward"] > 0
    measured = sum(v for k, v in phases.items() if k != "other")
    assert measured <= figures["step_ms"] * 1.001  # phases are disjoint parts of the step
    assert measured + phases["other"] == pytest.approx(figures["step_ms"], rel=1e-6)
    assert figures["img_per_s"] == pytest.approx(1e3 * 4 / figures["step_ms"], rel=1e-6)


def test_flops_figures_are_consistent(report):
    _, text, f = report
    assert f["achieved_tflops"] == pytest.approx(f["flops_per_image"] * f["img_per_s"] / 1e12)
    assert 0 < f["achieved_tflops"] and 0 < f["matmul_tflops"] and f["matmul_dtype"] == "float32"
    mfu = 100 * f["achieved_tflops"] / f["matmul_tflops"]
    assert f"| % of the FLOP floor (MFU) | {mfu:.1f}% |" in text
    assert f["peak_memory_bytes"] > 2**20


def test_phase_chart_and_trace_are_written(report):
    out, text, figures = report
    png = out / "phases.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and imread(png).shape[0] > 200
    assert "](phases.png)" in text
    trace = json.loads((out / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert set(STEP_PHASES) <= names  # the phases are named ranges in the trace
    assert figures["top_ops"] and figures["top_ops"][0]["name"] in text
    assert all(op["name"] not in STEP_PHASES for op in figures["top_ops"])


def test_cli_profile_on_real_data(tmp_path, capsys):
    data = make_demo_dataset(tmp_path / "data", n_train_per_class=1, n_val_per_class=1, size=32)
    rc = main(["profile", "configs/demo.yaml", *TINY, f"data.path={data}", "--out", str(tmp_path / "p"),
               "--steps", "2", "--warmup", "0", "--trace-steps", "1", "--real-data"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "real data" in out and f"report: {tmp_path / 'p' / 'report.md'}" in out
    assert "Real data:" in (tmp_path / "p" / "report.md").read_text()
    assert json.loads((tmp_path / "p" / "profile.json").read_text())["phases_ms"]["data wait"] > 0


def test_cli_profile_refuses_bad_input_in_one_line(tmp_path, capsys):
    rc = main(["profile", "configs/demo.yaml", f"data.path={tmp_path / 'none'}", "--real-data",
               "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert rc == 2 and str(tmp_path / "none") in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists()
    assert main(["profile", "configs/demo.yaml", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "--steps" in err and len(err.strip().splitlines()) == 1
