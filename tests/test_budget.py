"""`fastdino budget`: hours and GPU-hours of a run, against values worked out by hand."""

import json

import pytest

from fastdino.cli import main
from fastdino.config import ConfigError, load_config
from fastdino.data.demo import make_demo_dataset
from fastdino.data.shards import write_shards
from fastdino.engine.budget import IMAGENET_1K_TRAIN, budget, last_bench_img_per_s, step_shape
from fastdino.engine.trainer import Trainer


def test_hours_and_gpu_hours_by_hand():
    # 100 epochs x 1,281,167 images at 1000 img/s on one GPU: 128,116,700 s / 1000 / 3600 = 35.5880 h
    one, eight, sixteen = budget(100, IMAGENET_1K_TRAIN, 1000.0, [1, 8, 16], 0.9)
    assert one.img_per_s == 1000.0 and one.hours == pytest.approx(35.58797, rel=1e-5)
    assert one.gpu_hours == one.hours
    # 8 GPUs at 0.9 each: 7200 img/s -> 128,116,700 / 7200 / 3600 = 4.94277 h, x 8 = 39.5422 GPU-hours
    assert eight.img_per_s == pytest.approx(7200.0)
    assert eight.hours == pytest.approx(4.942774, rel=1e-5) and eight.gpu_hours == pytest.approx(39.54219, rel=1e-5)
    # 16 GPUs: twice the rate, half the hours, the same GPU-hours (the scaling loss is paid once, beyond one GPU)
    assert sixteen.hours == pytest.approx(eight.hours / 2) and sixteen.gpu_hours == pytest.approx(eight.gpu_hours)


def test_scaling_rule():
    perfect = budget(10, 1000, 100.0, [1, 4], 1.0)
    assert perfect[1].hours == pytest.approx(perfect[0].hours / 4)  # scaling 1: linear
    lossy = budget(10, 1000, 100.0, [1, 4], 0.5)
    assert lossy[0].hours == perfect[0].hours  # one GPU has no scaling loss
    assert lossy[1].hours == pytest.approx(perfect[1].hours * 2) and lossy[1].gpu_hours == pytest.approx(
        2 * perfect[0].gpu_hours)
    with pytest.raises(ConfigError, match="--scaling"):
        budget(10, 1000, 100.0, [1], 1.5)


def test_max_steps_caps_each_row(capsys):
    # 10 epochs x 1000 images, max_steps=20 of 16 per GPU: 1 GPU sees 320 images, 4 GPUs 1280; 32 GPUs run out
    # first: one whole global batch of 512 an epoch, 10 steps, 5120 images
    one, four, many = budget(10, 1000, 100.0, [1, 4, 32], 1.0, max_steps=20, batch_size=16)
    assert [row.hours * 3600 for row in (one, four, many)] == pytest.approx([3.2, 3.2, 5120 / 3200])
    argv = ["budget", "configs/demo.yaml", "train.max_steps=20", "data.batch_size=16", "--images", "1000",
            "--img-per-s", "100", "--gpus", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "note: on 1 GPU(s) train.max_steps=20 stops the run after 20 of its" in out
    assert [line.split()[:3] for line in out.splitlines() if line.strip()[:1].isdigit()] == [["1", "100.0", "3"]]
    assert main([*argv[:2], "train.max_steps=100000", *argv[3:]]) == 0  # longer than the run: no note
    assert "max_steps" not in capsys.readouterr().out


def test_rows_count_whole_global_batches_and_say_when_there_is_none(capsys):
    """Training drops each epoch's last partial global batch: 18 images at batch 5 are 3 steps of 5 an epoch on 1
    GPU (15 images) and 1 of 10 on 2 GPUs; on 4 GPUs (20 a step) there is no step at all."""
    rows = budget(2, 18, 1.0, [1, 2, 4], 1.0, batch_size=5)
    assert [row.hours * 3600 for row in rows] == pytest.approx([30.0, 10.0, 0.0])
    assert main(["budget", "configs/demo.yaml", "data.batch_size=5", "train.epochs=2", "--images", "18",
                 "--img-per-s", "1", "--gpus", "1,2,4"]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == ["note: on 1 GPU(s) an epoch is 3 whole global batches of 5 x 1 = 15 images: the other 3 of "
                     "each epoch's shuffle are left out",
                     "note: on 2 GPU(s) an epoch is 1 whole global batches of 5 x 2 = 10 images: the other 8 of "
                     "each epoch's shuffle are left out",
                     "note: on 4 GPU(s) 18 images are fewer than one global batch of 5 x 4: `fastdino train` "
                     "refuses it"]


def test_cli_prints_rows_and_the_paper_run(tmp_path, capsys):
    data = tmp_path / "images"
    data.mkdir()
    for i in range(3):  # data.path's images are counted: 3
        (data / f"{i}.png").write_bytes(b"")
    assert main(["budget", "configs/vit_small16.yaml", f"data.path={data}", "train.epochs=40", "--img-per-s", "2"]) == 0
    assert "40 epochs x 3 images (indexed in" in capsys.readouterr().out
    assert main(["budget", "configs/vit_small16.yaml", "train.epochs=40", "--images", "9216", "--img-per-s", "100",
                 "--gpus", "1,3", "--scaling", "0.5"]) == 0
    out = capsys.readouterr().out
    # 9216 images are whole global batches of 64 and of 3 x 64: 368,640 images at 100 img/s = 3686 s = 1.0 h;
    # 3 GPUs at 0.5 each: 150 img/s -> 2458 s = 41.0 min, 2.0 GPU-hours
    lines = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert lines == [["1", "100.0", "1.0", "h", "1.0", "h"], ["3", "150.0", "41.0", "min", "2.0", "h"]]
    assert "72.6 h wall clock, 1161.6 GPU-hours" in out  # the paper: 16 V100s x 72.6 h
    # a short run in minutes and seconds (166 s once printed as 0.0 h); overrides after the flags
    assert main(["budget", "configs/vit_small16.yaml", "--img-per-s", "100", "--images", "166", "--gpus", "1,8",
                 "train.epochs=100", "data.batch_size=1"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()]
    # 1 GPU: 16,600 images at 100 img/s = 166 s; 8 GPUs: 20 steps of 8 an epoch, 16,000 images at 720 img/s = 22 s
    assert lines == [["1", "100.0", "2.8", "min", "2.8", "min"], ["8", "720.0", "22", "s", "3.0", "min"]]
    assert main(["budget", "configs/vit_small16.yaml", "--img-per-s", "1", "--gpus", "1", "--bogus=1"]) == 2
    assert "unrecognized arguments: --bogus=1" in capsys.readouterr().err
    assert main(["budget", "configs/vit_small16.yaml", "--img-per-s", "1000"]) == 0
    assert "100 epochs x 1,281,167 images (ImageNet-1k" in capsys.readouterr().out  # no data.path: said so


def test_img_per_s_from_the_last_matching_bench_record(tmp_path, capsys):
    cfg = load_config("configs/vit_small16.yaml")
    other = {**step_shape(cfg), "data.batch_size": 128}
    results = tmp_path / "bench_train.jsonl"
    lines = [{"shape": step_shape(cfg), "img_per_s": 500.0}, {"shape": other, "img_per_s": 900.0},
             {"shape": step_shape(cfg), "img_per_s": 800.0, "date": "2026-11-30"}, {"shape": other, "img_per_s": 1.0}]
    results.write_text("\n".join(json.dumps(x) for x in lines) + "\n{cut by a cra")
    assert last_bench_img_per_s(cfg, results)[0] == 800.0
    assert main(["budget", "configs/vit_small16.yaml", "--images", "1000000", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "800.0 img/s (last perf/bench_train.py result for this config (2026-11-30" in out
    assert "1,000,000 images (--images)" in out


def test_missing_figure_refused_in_one_line(tmp_path, capsys):
    assert main(["budget", "configs/vit_small16.yaml", "--results", str(tmp_path / "none.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--img-per-s" in err and "perf/bench_train.py" in err
    assert main(["budget", "configs/vit_small16.yaml", "--img-per-s", "0"]) == 2
    assert "--img-per-s" in capsys.readouterr().err


def test_profile_takes_overrides_after_its_flags(capsys):
    """An override after a flag reaches the config (here refused by name, before any work), not argparse."""
    assert main(["profile", "configs/demo.yaml", "--steps", "1", "train.bogus=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.bogus'" in err and "unrecognized arguments" not in err


def test_warm_ups_longer_than_the_run_are_noted_not_refused(capsys):
    # vit_small16's teacher warm-up is 30 epochs: train refuses train.epochs=5, budget answers and says so
    argv = ["budget", "configs/vit_small16.yaml", "train.epochs=5", "--images", "3584", "--img-per-s", "10",
            "--gpus", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert rows == [["1", "10.0", "29.9", "min", "29.9", "min"]]  # 5 x 3584 (56 x 64) images at 10 img/s = 1792 s
    notes = [line for line in out.splitlines() if line.startswith("note: `fastdino train` refuses")]
    assert len(notes) == 2 and "dino.warmup_teacher_temp_epochs=30" in notes[0] and "optim.warmup_epochs=10" in notes[1]
    with pytest.raises(ConfigError, match="dino.warmup_teacher_temp_epochs=30 is longer than the run"):
        load_config("configs/vit_small16.yaml", ["train.epochs=5"])  # what `fastdino train` loads
    cfg = load_config("configs/vit_small16.yaml", ["train.epochs=5"], schedules=False)
    with pytest.raises(ConfigError, match="dino.warmup_teacher_temp_epochs=30"):
        Trainer(cfg)  # a Config built without load_config's check is refused by the trainer itself
    assert main(argv[:2] + ["train.epochs=30"] + argv[3:]) == 0  # what train accepts: no note
    assert "note:" not in capsys.readouterr().out


def test_data_path_is_counted_as_train_reads_it_or_refused(tmp_path, capsys):
    demo = make_demo_dataset(tmp_path / "demo", n_train_per_class=2, n_val_per_class=1, size=16)
    n_train = len(list((demo / "train").rglob("*.jpg")))
    write_shards(demo, tmp_path / "shards", shard_size=2000, progress=False)
    shards = sorted((tmp_path / "shards" / "train").glob("*.tar"))
    assert len(shards) > 1
    (tmp_path / "list.txt").write_text("\n".join(str(s) for s in shards) + "\n")
    pattern = str(tmp_path / "shards" / "train" / f"shard-{{000000..{len(shards) - 1:06d}}}.tar")
    base = ["budget", "configs/vit_small16.yaml", "--img-per-s", "100"]
    for data in (demo, tmp_path / "shards", tmp_path / "list.txt", pattern):
        assert main(base + [f"data.path={data}"]) == 0, data
        assert f"100 epochs x {n_train} images (indexed in" in capsys.readouterr().out
    missing = tmp_path / "imagenett"  # a typo
    assert main(base + [f"data.path={missing}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"data.path {missing} does not exist" in err and "--images" in err
    gone = pattern.replace("shard-", "shrd-")
    assert main(base + [f"data.path={gone}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"data.path {gone}: shard" in err and "does not exist" in err
    # --images answers for data that is elsewhere: data.path is not read
    assert main(base + [f"data.path={missing}", "--images", "50"]) == 0
    assert "100 epochs x 50 images (--images)" in capsys.readouterr().out
