"""Resuming after a change of settings (issue 12, s. 4): finished runs, longer runs, changed batch, data or recipe."""

import logging
import os
import shutil

import pytest
import torch

from fastdino.cli import main
from fastdino.config import ConfigError, load_config
from fastdino.data.demo import make_demo_dataset
from fastdino.data.files import DataError
from fastdino.engine.checkpoint import load_checkpoint
from fastdino.engine.trainer import Trainer, train

TINY = [
    "model.arch=vit_tiny", "model.depth=1", "model.patch_size=8", "model.img_size=16", "dino.out_dim=16",
    "dino.hidden_dim=16", "dino.bottleneck_dim=8", "data.global_size=16", "data.local_size=8",
    "data.local_crops_number=1", "data.batch_size=4", "data.num_workers=0", "optim.warmup_epochs=1",
    "train.epochs=2", "train.knn_eval=false",
]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train_per_class=2, n_val_per_class=1, size=16)


@pytest.fixture(scope="module")
def finished(demo_root, tmp_path_factory):
    """A run of 2 epochs (6 iterations: 12 images, batch 4) that has finished."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train(demo_cfg(TINY + [f"data.path={demo_root}", f"train.output_dir={out}"])).steps_done == 6
    return out


def demo_cfg(overrides):
    return load_config("configs/demo.yaml", overrides)


def args(demo_root, out, *extra):
    return ["train", "configs/demo.yaml", *TINY, f"data.path={demo_root}", f"train.output_dir={out}", *extra]


@pytest.mark.parametrize("extra", [[], ["train.epochs=1"], ["train.max_steps=4"]])
def test_a_finished_run_says_it_is_complete_and_changes_nothing(demo_root, finished, capsys, extra):
    before = (finished / "last.pt").read_bytes(), (finished / "metrics.jsonl").read_bytes()
    assert main(args(demo_root, finished, *extra)) == 0
    out = capsys.readouterr().out
    assert "already complete at iteration 6" in out and "nan" not in out and "0 checks" not in out
    assert ((finished / "last.pt").read_bytes(), (finished / "metrics.jsonl").read_bytes()) == before


def test_more_epochs_continue_the_run(demo_root, finished, tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes((finished / "last.pt").read_bytes())
    with caplog.at_level(logging.WARNING, logger="fastdino"):
        result = train(demo_cfg(TINY + [f"data.path={demo_root}", f"train.output_dir={out}",
                                                  "train.epochs=3"]))
    assert result.steps_done == 9 and not result.already_complete
    assert "train.epochs changed from 2 to 3" in caplog.text


@pytest.mark.parametrize("extra, error, words", [
    (["data.batch_size=2"], ConfigError, ["global batch of 4", "data.batch_size=2"]),
    (["optim.lr=0.01"], ConfigError, ["optim.lr=0.01 (checkpoint: 0.001)", "train.allow_config_change=true"]),
    (["dino.teacher_temp=0.07", "data.local_crops_number=2"], ConfigError,
     ["dino.teacher_temp=0.07", "data.local_crops_number=2"]),
])
def test_changes_that_alter_the_trajectory_are_refused_naming_the_keys(demo_root, finished, extra, error, words):
    cfg = demo_cfg(TINY + [f"data.path={demo_root}", f"train.output_dir={finished}", "train.epochs=3",
                                    *extra])
    with pytest.raises(error) as info:
        Trainer(cfg)
    for word in words:
        assert word in str(info.value)


def test_allowed_changes_resume(demo_root, finished, tmp_path, caplog):
    base = TINY + [f"data.path={demo_root}", f"train.resume={finished / 'last.pt'}", "train.epochs=3"]
    # logging, evaluation, health and implementation choices may change freely
    free = ["train.log_every=3", "health.patience=5", "eval.knn_k=5", "loss.impl=torch", "data.num_workers=1",
            f"train.output_dir={tmp_path / 'a'}"]
    assert Trainer(demo_cfg(base + free)).step == 6
    # a trajectory change goes through with consent, and is logged
    with caplog.at_level(logging.WARNING, logger="fastdino"):
        trainer = Trainer(demo_cfg(base + ["optim.lr=0.01", "train.allow_config_change=true",
                                                    f"train.output_dir={tmp_path / 'b'}"]))
    assert trainer.step == 6 and "optim.lr=0.01 (checkpoint: 0.001)" in caplog.text


def test_another_image_set_is_refused(demo_root, finished, tmp_path):
    more = make_demo_dataset(tmp_path / "more", n_train_per_class=3, n_val_per_class=1, size=16)
    cfg = demo_cfg(TINY + [f"data.path={more}", f"train.resume={finished / 'last.pt'}", "train.epochs=3",
                                    f"train.output_dir={tmp_path / 'r'}"])
    with pytest.raises(DataError, match="holds 18 training images.*trained on 12"):
        Trainer(cfg)


def test_a_checkpoint_from_before_the_resume_checks_resumes(demo_root, finished, tmp_path):
    old = load_checkpoint(finished / "last.pt")
    del old["world_size"], old["n_images"]
    torch.save(old, tmp_path / "old.pt")
    cfg = demo_cfg(TINY + [f"data.path={demo_root}", f"train.resume={tmp_path / 'old.pt'}",
                                    "train.epochs=3", f"train.output_dir={tmp_path / 'r'}"])
    assert Trainer(cfg).step == 6


def test_other_images_of_the_same_count_are_refused_but_a_moved_folder_resumes(demo_root, finished, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(demo_root, moved)
    cfg = demo_cfg(TINY + [f"data.path={moved}", f"train.resume={finished / 'last.pt'}", "train.epochs=3",
                           f"train.output_dir={tmp_path / 'r'}"])
    assert Trainer(cfg).step == 6  # the same images elsewhere
    renamed = next((moved / "train").glob("*/*.jpg"))
    renamed.rename(renamed.with_name("renamed.jpg"))
    with pytest.raises(DataError, match="other training images"):
        Trainer(cfg)


def test_lowering_epochs_on_a_finished_run_says_only_that_it_is_complete(demo_root, finished, caplog):
    with caplog.at_level(logging.WARNING, logger="fastdino"):
        result = train(demo_cfg(TINY + [f"data.path={demo_root}", f"train.output_dir={finished}", "train.epochs=1"]))
    assert result.already_complete and "schedules now span" not in caplog.text


def test_checkpoints_are_readable_as_a_plain_file_would_be(finished):
    mask = os.umask(0)
    os.umask(mask)
    assert (finished / "last.pt").stat().st_mode & 0o777 == 0o666 & ~mask
