"""reports/plots.py: reading metrics.jsonl (resumed runs, k-NN lines) and the PNGs people look at."""

import json

import pytest
from matplotlib.image import imread

from fastdino.config import HealthConfig
from fastdino.reports.plots import plot_phases, plot_run_curves, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def train_record(step, **extra):
    return {"step": step, "loss": 4.0 - 0.1 * step, "lr": 1e-3, "momentum": 0.996, "img_per_s": 100.0, **extra}


def test_read_metrics_splits_evaluations_and_the_later_record_of_an_iteration_wins(tmp_path):
    path = write_jsonl(tmp_path / "metrics.jsonl", [
        {"step": 0, "epoch": 0.0, "knn_top1": 50.0},
        train_record(0), train_record(1), train_record(2, loss=9.0),
        train_record(2), train_record(3),  # resumed from a checkpoint after iteration 1: 2 is logged again
        {"step": 4, "epoch": 1.0, "knn_top1": 75.0},
    ])
    train, evals = read_metrics(path)
    assert [r["step"] for r in train] == [0, 1, 2, 3]
    assert train[2]["loss"] == pytest.approx(3.8)
    assert [(e["step"], e["knn_top1"]) for e in evals] == [(0, 50.0), (4, 75.0)]


def signals(step):
    return {"grad_norm": 2.0 / (step + 1), "teacher_entropy": 2.0, "teacher_entropy_ratio": 0.5,
            "teacher_mean_entropy_ratio": 0.9, "kl_student_teacher": 1.0, "feature_std_ratio": 0.5,
            "teacher_temp": 0.04}


def test_run_curves_png_has_a_panel_per_logged_quantity(tmp_path):
    full = [train_record(s, **signals(s)) for s in range(20)] + [{"step": 20, "epoch": 2.0, "knn_top1": 80.0}]
    png = plot_run_curves(write_jsonl(tmp_path / "full.jsonl", full), tmp_path / "full.png", HealthConfig(), "run")
    assert png.read_bytes()[:8] == PNG_MAGIC
    height_full = imread(png).shape[0]
    # loss, lr, momentum and img/s only: 4 panels in 2 rows of 3 instead of 9 in 3 rows
    plain = plot_run_curves(write_jsonl(tmp_path / "plain.jsonl", [train_record(s) for s in range(5)]),
                            tmp_path / "plain.png")
    assert imread(plain).shape[0] == pytest.approx(height_full * 2 / 3, rel=0.01)


def test_run_curves_refuse_a_file_without_iterations(tmp_path):
    with pytest.raises(ValueError, match="no logged iteration"):
        plot_run_curves(write_jsonl(tmp_path / "m.jsonl", [{"step": 0, "knn_top1": 50.0}]), tmp_path / "c.png")


def test_phase_bars_png(tmp_path):
    png = plot_phases({"data wait": 0.1, "backward": 6.0, "other": 0.4}, tmp_path / "p.png", 10.0, "t", "wall clock")
    assert png.read_bytes()[:8] == PNG_MAGIC and imread(png).shape[0] > 100


def test_read_metrics_skips_damaged_lines_with_one_warning(tmp_path, caplog):
    """A line cut short by a full disk (then appended to) no longer ends every later call in a JSONDecodeError."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 2.0}\n{"step": 1, "lo\n{"step": 2, "loss": 1.0}\n[1]\n{"step": 3, "lo')
    train, evals = read_metrics(path)
    assert [r["step"] for r in train] == [0, 2] and evals == []
    assert caplog.text.count("skipped 3 damaged line(s)") == 1
