"""The trainer end to end on a tiny demo data set: demo pipeline, exact resume, and every bad-input path."""

import json
import shutil

import pytest
import torch

from fastdino.cli import main
from fastdino.config import ConfigError, load_config
from fastdino.data.demo import make_demo_dataset
from fastdino.data.files import DataError
from fastdino.engine.checkpoint import CheckpointError, load_checkpoint
from fastdino.engine.trainer import NonFiniteLossError, Trainer, train

TINY = [
    "model.arch=vit_tiny", "model.depth=2", "model.patch_size=8", "model.img_size=16", "model.drop_path_rate=0.1",
    "dino.out_dim=32", "dino.hidden_dim=16", "dino.bottleneck_dim=8",
    "data.global_size=16", "data.local_size=8", "data.local_crops_number=2", "data.batch_size=4",
    "data.num_workers=0", "optim.warmup_epochs=1", "train.epochs=2", "train.log_every=1", "train.knn_eval=false",
]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train_per_class=2, n_val_per_class=1, size=32)


def tiny_cfg(demo_root, out, *extra):
    return load_config(None, TINY + [f"data.path={demo_root}", f"train.output_dir={out}", *extra])


def test_demo_pipeline_end_to_end(demo_root, tmp_path):
    result = train(tiny_cfg(demo_root, tmp_path / "run", "train.knn_eval=true", "data.num_workers=2"))
    assert result.steps_done == 2 * 3  # 12 images / batch 4, 2 epochs
    assert result.knn_init is not None and result.knn_trained is not None
    assert 0.0 <= result.knn_trained <= 100.0
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lines = [x for x in records if "loss" in x]  # the k-NN passes have lines of their own
    assert [x["step"] for x in lines] == list(range(6))
    assert [(x["step"], x["knn_top1"]) for x in records if "knn_top1" in x] == [
        (0, result.knn_init), (6, result.knn_trained)]
    assert {"loss", "lr", "momentum", "img_per_s", "grad_norm", "teacher_temp"} <= set(lines[0])
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in lines)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["step"] == 6 and ckpt["config"]["data"]["path"] == str(demo_root)
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_training_changes_student_and_teacher_follows(demo_root, tmp_path):
    cfg = tiny_cfg(demo_root, tmp_path / "run", "train.max_steps=3", "dino.momentum_teacher=0.5")
    trainer = Trainer(cfg)
    student0 = {k: v.clone() for k, v in trainer.method.student.state_dict().items()}
    trainer.fit()
    student = trainer.method.student.state_dict()
    teacher = trainer.method.teacher.state_dict()
    assert not torch.equal(student["backbone.blocks.0.mlp.fc1.weight"], student0["backbone.blocks.0.mlp.fc1.weight"])
    moved = teacher["backbone.blocks.0.mlp.fc1.weight"] - student0["backbone.blocks.0.mlp.fc1.weight"]
    assert moved.abs().max() > 0  # the EMA pulled the teacher towards the student
    assert not torch.equal(teacher["backbone.blocks.0.mlp.fc1.weight"], student["backbone.blocks.0.mlp.fc1.weight"])
    assert trainer.method.center.center.abs().sum() > 0


def _state(path):
    ckpt = load_checkpoint(path)
    return ckpt["student"], ckpt["teacher"], ckpt["center"]["center"], ckpt["optimizer"]


@pytest.mark.parametrize("workers,head_bn", [(0, False), (2, False), (0, True)])
def test_exact_resume_is_bitwise(demo_root, tmp_path, workers, head_bn):
    """N steps in one go == k steps, stop, resume, N-k steps: student, teacher (BN running statistics
    included), center, optimizer."""
    extra = [f"data.num_workers={workers}", f"dino.head_bn={str(head_bn).lower()}"]
    train(tiny_cfg(demo_root, tmp_path / "once", *extra))
    train(tiny_cfg(demo_root, tmp_path / "twice", "train.max_steps=4", *extra))  # stops mid-epoch 1
    assert load_checkpoint(tmp_path / "twice" / "last.pt")["step"] == 4
    result = train(tiny_cfg(demo_root, tmp_path / "twice", *extra))  # resume=auto
    assert result.steps_done == 6
    once, twice = _state(tmp_path / "once" / "last.pt"), _state(tmp_path / "twice" / "last.pt")
    assert ("head.mlp.1.running_mean" in once[1]) == head_bn  # the teacher's own BN statistics are compared too
    for a, b in zip(once[:2], twice[:2]):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert torch.equal(once[2], twice[2])
    for sa, sb in zip(once[3]["state"].values(), twice[3]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_corrupt_images_are_skipped_counted_and_training_goes_on(demo_root, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(demo_root / "train", data)
    victims = sorted(data.rglob("*.jpg"))[:2]
    victims[0].write_bytes(b"this is not a jpeg")
    victims[1].write_bytes(victims[1].read_bytes()[:100])  # truncated
    result = train(tiny_cfg(data, tmp_path / "run", "train.epochs=1"))
    assert result.steps_done == 3 and result.skipped_images >= 2
    for v in victims:
        assert str(v) in caplog.text
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["skipped_images"] == result.skipped_images


def test_missing_and_empty_data_folders_fail_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"data.path \S+nowhere does not exist"):
        Trainer(load_config(None, TINY + [f"data.path={tmp_path / 'nowhere'}", f"train.output_dir={tmp_path}/r"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        Trainer(load_config(None, TINY + [f"data.path={tmp_path / 'empty'}", f"train.output_dir={tmp_path}/r"]))
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="data.path"):
        Trainer(load_config(None, TINY))


def test_unreadable_checkpoint_fails_before_training(demo_root, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="bad.pt"):
        Trainer(tiny_cfg(demo_root, tmp_path / "run", f"train.resume={bad}"))
    with pytest.raises(CheckpointError, match="nope.pt"):
        Trainer(tiny_cfg(demo_root, tmp_path / "run", f"train.resume={tmp_path / 'nope.pt'}"))


def test_checkpoint_from_another_architecture_is_refused(demo_root, tmp_path):
    train(tiny_cfg(demo_root, tmp_path / "run", "train.max_steps=1"))
    with pytest.raises(CheckpointError, match=r"last.pt.*another architecture.*dino.out_dim"):
        Trainer(tiny_cfg(demo_root, tmp_path / "run", "dino.out_dim=64"))
    with pytest.raises(CheckpointError, match=r"another architecture.*dino.head_bn: checkpoint False vs config True"):
        Trainer(tiny_cfg(demo_root, tmp_path / "run", "dino.head_bn=true"))
    # a checkpoint written before dino.head_bn existed counts as its default (False): it resumes without BN only
    older = load_checkpoint(tmp_path / "run" / "last.pt")
    del older["config"]["dino"]["head_bn"]
    torch.save(older, tmp_path / "older.pt")
    assert Trainer(tiny_cfg(demo_root, tmp_path / "run", f"train.resume={tmp_path / 'older.pt'}")).step == 1
    with pytest.raises(CheckpointError, match=r"older.pt.*dino.head_bn: checkpoint False vs config True"):
        Trainer(tiny_cfg(demo_root, tmp_path / "run", f"train.resume={tmp_path / 'older.pt'}", "dino.head_bn=true"))
    # a checkpoint whose config agrees but whose weights do not also names the file
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    ckpt["student"]["backbone.pos_embed"] = torch.zeros(1, 3, 192)
    torch.save(ckpt, tmp_path / "forged.pt")
    with pytest.raises(CheckpointError, match="forged.pt"):
        Trainer(tiny_cfg(demo_root, tmp_path / "run", f"train.resume={tmp_path / 'forged.pt'}"))


def test_non_finite_step_is_skipped_on_the_device_and_stops_the_run_at_the_next_log_step(demo_root, tmp_path,
                                                                                       poison_loss):
    """No host read in the step: iteration 1's NaN loss skips its update on the device (fused AdamW's found_inf);
    the loop finds it at the next log step (the epoch end, iteration 2), names iteration 1, and nothing after it
    reaches the weights, the log or a checkpoint."""
    calls = poison_loss(2)
    out = tmp_path / "run"
    trainer = Trainer(tiny_cfg(demo_root, out, "train.log_every=100", "train.ckpt_every=100"))
    assert trainer.optimizer.defaults["fused"]
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at iteration 1 \(epoch 0\); no checkpoint"):
        trainer.fit()
    assert calls["n"] == 3 and not (out / "last.pt").exists()
    assert all(torch.isfinite(p).all() for p in trainer.method.student_module().parameters())
    assert all(float(st["step"]) == 2 for st in trainer.optimizer.state.values())  # iterations 0 and 2 stepped
    assert not (out / "metrics.jsonl").exists() or "loss" not in (out / "metrics.jsonl").read_text()
    assert json.loads((out / "summary.json").read_text())["iterations"] == 1


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_cuda_step_never_waits_for_the_device(demo_root, tmp_path, precision):
    """A non-log training step issues no synchronising CUDA call (torch.cuda.set_sync_debug_mode raises on one):
    the non-finite check, clipping, fused AdamW, the Triton loss and EMA all stay on the device."""
    trainer = Trainer(tiny_cfg(demo_root, tmp_path / "run", "train.device=cuda", f"train.precision={precision}",
                               "data.backend=cpu"))  # not about data: auto would pick a GPU decoder
    views = [torch.randn(4, 3, s, s, device="cuda") for s in (16, 16, 8, 8)]
    for _ in range(2):  # warm-up: the EMA plan, Triton compilation, the optimizer's state
        trainer.train_step(views, epoch=1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_step(views, epoch=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_non_finite_loss_stops_at_once_and_last_checkpoint_resumes(demo_root, tmp_path, poison_loss):
    out = tmp_path / "run"
    cfg = tiny_cfg(demo_root, out, "train.ckpt_every=1")
    poison_loss(4)
    with pytest.raises(NonFiniteLossError, match=r"iteration 3 .*last.pt.*intact"):
        train(cfg)
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["student"].values())
    poison_loss.undo()
    assert train(cfg).steps_done == 6


def test_cli_refuses_bad_key_before_work(tmp_path, capsys):
    assert main(["train", "configs/demo.yaml", "optim.lrr=0.1", f"train.output_dir={tmp_path}/r"]) == 2
    err = capsys.readouterr().err
    assert "optim.lrr" in err and "optim.lr" in err
    assert not (tmp_path / "r").exists()
    assert main(["train", "configs/demo.yaml", f"data.path={tmp_path}/none", f"train.output_dir={tmp_path}/r"]) == 2
    assert "none" in capsys.readouterr().err


def test_cli_knn_on_a_checkpoint(demo_root, tmp_path, capsys):
    train(tiny_cfg(demo_root, tmp_path / "run", "train.max_steps=1"))
    rc = main(["knn", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--train", str(demo_root / "train"),
               "--val", str(demo_root / "val"), "--num-workers", "0"])
    assert rc == 0 and "k-NN top-1 (k=20, T=0.07)" in capsys.readouterr().out
    assert main(["knn", "--checkpoint", str(tmp_path / "missing.pt"), "--train", ".", "--val", "."]) == 2
