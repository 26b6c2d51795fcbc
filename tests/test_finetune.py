"""`fastdino finetune` (eval/finetune.py): backbone + linear head trained end to end, top-1, bad input refused."""

import shutil

import pytest
import torch

from fastdino.cli import main
from fastdino.config import load_config
from fastdino.data.demo import make_demo_dataset
from fastdino.data.files import DataError, index_image_folder
from fastdino.engine.trainer import train
from fastdino.eval.finetune import finetune, per_class_subset
from fastdino.models.vit import build_backbone


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train_per_class=4, n_val_per_class=2, size=32)


def test_finetune_trains_backbone_and_head_end_to_end(demo_root):
    backbone = build_backbone("vit_tiny", depth=1, patch_size=8, img_size=16)
    backbone.requires_grad_(False)  # as a teacher comes: fine-tuning must unfreeze its copy
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    result = finetune(backbone, demo_root / "train", demo_root / "val", 16, torch.device("cpu"), epochs=8, lr=2e-3,
                      batch_size=8, num_workers=0)
    assert [h["epoch"] for h in result.history] == list(range(8))
    assert 0.0 <= result.top1 <= 100.0 and result.top1 == result.history[-1]["top1"]
    assert result.classes == ["checkerboard", "diamonds", "dots", "grid", "hstripes", "vstripes"]
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in before.items())  # the argument is untouched
    tuned = result.model.backbone.state_dict()
    assert not torch.equal(tuned["blocks.0.mlp.fc1.weight"], before["blocks.0.mlp.fc1.weight"])  # end to end
    assert result.history[-1]["loss"] < result.history[0]["loss"]  # it learns the labels


def test_per_class_subset_keeps_n_images_of_every_class_by_seed(demo_root):
    index = index_image_folder(demo_root / "train")  # 4 images in each of 6 classes
    sub = per_class_subset(index, 3, seed=0)
    assert sub.classes == index.classes and len(sub) == 18
    assert all(sub.labels.count(c) == 3 for c in range(6))
    pairs = list(zip(index.paths, index.labels))
    assert all(p in pairs for p in zip(sub.paths, sub.labels)) and sub.paths == sorted(sub.paths, key=index.paths.index)
    assert per_class_subset(index, 3, seed=0).paths == sub.paths
    assert per_class_subset(index, 3, seed=1).paths != sub.paths
    assert len(per_class_subset(index, 10, seed=0)) == 24  # a class with fewer keeps all of them


def test_finetune_refuses_unlabelled_or_mismatched_folders(demo_root, tmp_path):
    backbone = build_backbone("vit_tiny", depth=1, patch_size=8, img_size=16)
    with pytest.raises(DataError, match="class sub-folders"):
        finetune(backbone, demo_root / "train" / "dots", demo_root / "val", 16, torch.device("cpu"), num_workers=0)
    extra = tmp_path / "val"
    (extra / "spirals").mkdir(parents=True)
    shutil.copy(demo_root / "val" / "dots" / "0000.jpg", extra / "spirals" / "0000.jpg")
    with pytest.raises(DataError, match="spirals"):
        finetune(backbone, demo_root / "train", extra, 16, torch.device("cpu"), num_workers=0)


def test_cli_finetunes_a_sit_checkpoint_and_refuses_bad_flags(demo_root, tmp_path, capsys):
    cfg = load_config(None, [
        "train.method=sit", "model.arch=vit_tiny", "model.depth=1", "model.patch_size=8", "model.img_size=16",
        "sit.decoder=linear", "sit.proj_hidden_dim=0", "sit.proj_dim=16", "data.global_size=16",
        "data.batch_size=8", "data.num_workers=0", "train.max_steps=1", "train.knn_eval=false",
        f"data.path={demo_root}", f"train.output_dir={tmp_path / 'run'}"])
    train(cfg)
    ckpt = str(tmp_path / "run" / "last.pt")
    common = ["--train", str(demo_root / "train"), "--val", str(demo_root / "val"), "--num-workers", "0",
              "--batch-size", "8"]
    assert main(["finetune", ckpt, *common, "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "fine-tune epoch 1/1" in out and "fine-tuned top-1 (6 classes, 1 epochs):" in out
    assert main(["finetune", ckpt, *common, "--epochs", "1", "--per-class", "2"]) == 0
    assert "(6 classes, 1 epochs, 2 labelled images per class)" in capsys.readouterr().out
    runs = []
    for seed in ("3", "3", "4"):  # the random-init baseline is a function of --seed
        torch.seed()  # whatever state torch starts in
        assert main(["finetune", ckpt, *common, "--epochs", "1", "--random-init", "--seed", seed]) == 0
        runs.append([line for line in capsys.readouterr().out.splitlines() if "train loss" in line])
    assert runs[0] == runs[1] and runs[0] != runs[2]
    bad_flags = ((["--epochs", "0"], "--epochs"), (["--lr", "-1"], "--lr"), (["--batch-size", "0"], "--batch-size"),
                 (["--per-class", "-1"], "--per-class"))
    for bad, word in bad_flags:
        assert main(["finetune", ckpt, *common, *bad]) == 2
        err = capsys.readouterr().err
        assert word in err and len(err.strip().splitlines()) == 1
    assert main(["finetune", str(tmp_path / "none.pt"), *common]) == 2
    assert "none.pt" in capsys.readouterr().err
    assert main(["finetune", ckpt, "--train", str(tmp_path / "nowhere"), "--val", str(demo_root / "val")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_an_unreadable_validation_image_is_skipped_not_scored_under_another_label(demo_root, tmp_path, caplog):
    """As k-NN does: the corrupt file's slot is not filled by the next image under the wrong label; the score equals
    the one without that file. Each unreadable file, training or validation, is warned about once over the epochs."""
    scores = []
    train = tmp_path / "train"
    shutil.copytree(demo_root / "train", train)
    train_bad = sorted((train / "grid").iterdir())[0]
    train_bad.write_bytes(b"not an image either")
    for case in ("corrupt", "removed"):
        val = tmp_path / case
        shutil.copytree(demo_root / "val", val)
        bad = sorted((val / "dots").iterdir())[0]
        if case == "corrupt":
            bad.write_bytes(b"not an image")
        else:
            bad.unlink()
        torch.manual_seed(0)
        backbone = build_backbone("vit_tiny", depth=1, patch_size=8, img_size=16)
        caplog.clear()
        result = finetune(backbone, train, val, 16, torch.device("cpu"), epochs=2, batch_size=4, num_workers=0,
                          seed=3)
        scores.append((result.top1, result.skipped_val))
        warned = [sum(str(path) in r.getMessage() for r in caplog.records) for path in (train_bad, bad)]
        assert warned == [1, int(case == "corrupt")]
    assert scores[0] == (scores[1][0], 1) and scores[1][1] == 0
