"""The end of a training run: summary.json and curves.png, k-NN every train.knn_every epochs (issue 16).
Reuses the tiny trainer set-up of test_trainer.py."""

import json

import pytest
import torch
from matplotlib.image import imread
from test_trainer import TINY, tiny_cfg

import fastdino.engine.trainer as trainer_module
from fastdino.config import ConfigError, load_config
from fastdino.data.demo import make_demo_dataset
from fastdino.engine.checkpoint import load_checkpoint
from fastdino.engine.trainer import NonFiniteLossError, train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train_per_class=2, n_val_per_class=1, size=32)


def records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def count_knn(monkeypatch):
    """Counts the k-NN passes (the real ones run)."""
    calls = []
    real = trainer_module.knn_evaluate

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "knn_evaluate", counted)
    return calls


def test_summary_and_curves_after_a_run(demo_root, tmp_path):
    run = tmp_path / "run"
    result = train(tiny_cfg(demo_root, run, "train.knn_eval=true"))
    summary = json.loads((run / "summary.json").read_text())
    logged = [r for r in records(run) if "loss" in r]
    assert summary["status"] == "finished"
    assert summary["iterations"] == 6 and summary["epochs"] == 2.0
    assert summary["images_seen"] == 6 * 4
    assert summary["final_loss"] == logged[-1]["loss"] == result.last_loss
    assert summary["knn_top1"] == {"random_init": result.knn_init, "trained": result.knn_trained,
                                   "by_iteration": {"0": result.knn_init, "6": result.knn_trained}}
    assert summary["health"]["status"] == result.health["status"]
    assert summary["health"]["checks"] == result.health["checks"] == 6
    this_call = summary["this_call"]
    assert this_call["start_iteration"] == 0 and 0 < this_call["train_time_s"] < this_call["wall_time_s"]
    assert this_call["mean_img_per_s"] == pytest.approx(24 / this_call["train_time_s"])
    png = run / "curves.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert imread(png).shape[0] == 900  # 9 panels, 3 rows: k-NN, loss, schedules and the health signals


def test_knn_every_evaluates_at_the_right_epochs(demo_root, tmp_path, count_knn):
    run = tmp_path / "run"
    result = train(tiny_cfg(demo_root, run, "train.knn_eval=true", "train.knn_every=2", "train.epochs=3"))
    evals = [(r["step"], r["epoch"]) for r in records(run) if "knn_top1" in r]
    assert evals == [(0, 0.0), (6, 2.0), (9, 3.0)]  # random init, after epoch 2, at the end (3 steps/epoch)
    assert len(count_knn) == 3
    assert sorted(result.knn_history) == [0, 6, 9]
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["knn_top1"]["by_iteration"]) == ["0", "6", "9"]


def test_knn_every_pass_at_the_last_epoch_is_not_repeated(demo_root, tmp_path, count_knn):
    result = train(tiny_cfg(demo_root, tmp_path / "run", "train.knn_eval=true", "train.knn_every=1"))
    assert sorted(result.knn_history) == [0, 3, 6] and len(count_knn) == 3
    assert result.knn_trained == result.knn_history[6]


def test_knn_passes_do_not_change_the_training(demo_root, tmp_path):
    """A k-NN pass draws from the global RNG (the DataLoader's base seed); the trainer forks it, so a run with
    passes every epoch ends with the very weights of a run without any."""
    train(tiny_cfg(demo_root, tmp_path / "with", "train.knn_eval=true", "train.knn_every=1"))
    train(tiny_cfg(demo_root, tmp_path / "without"))
    a, b = load_checkpoint(tmp_path / "with" / "last.pt"), load_checkpoint(tmp_path / "without" / "last.pt")
    for key in ("student", "teacher"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


def test_a_stopped_run_still_writes_its_report(demo_root, tmp_path, poison_loss):
    poison_loss(3)
    with pytest.raises(NonFiniteLossError):
        train(tiny_cfg(demo_root, tmp_path / "run"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "stopped: non-finite loss" and summary["iterations"] == 2
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("extra,match", [
    (["train.knn_every=2", "train.knn_eval=false"], "train.knn_every=2 needs train.knn_eval=true"),
    (["train.knn_every=-1"], "train.knn_every"),
])
def test_bad_knn_every_is_refused(extra, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, TINY + extra)
