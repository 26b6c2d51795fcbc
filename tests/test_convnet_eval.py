"""Evaluation and export of convnet checkpoints (issue 22): k-NN, linear probe and fine-tuning on pooled features,
attention maps refused, official layouts out (torchvision keys, no `fc`) and in (dino_resnet50_pretrain.pth)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torchvision
from torch import nn

from fastdino.cli import main
from fastdino.config import load_config
from fastdino.data.demo import make_demo_dataset
from fastdino.engine.checkpoint import load_checkpoint, save_checkpoint
from fastdino.engine.trainer import Trainer, train
from fastdino.interop.official import load_teacher_backbone, read_dino_weights

RUN = ["model.arch=resnet18", "optim.name=sgd", "dino.out_dim=32", "dino.hidden_dim=16", "dino.bottleneck_dim=8",
       "data.global_size=32", "data.local_size=16", "data.local_crops_number=1", "data.batch_size=4",
       "data.num_workers=0", "optim.warmup_epochs=1", "train.epochs=1", "train.max_steps=1", "train.knn_eval=false",
       "train.device=cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(demo data root, a one-step ResNet-18 checkpoint)."""
    root = make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train_per_class=2, n_val_per_class=1, size=32)
    out = tmp_path_factory.mktemp("run")
    train(load_config(None, RUN + [f"data.path={root}", f"train.output_dir={out}"]))
    return root, out / "last.pt"


def torchvision_resnet(name: str) -> nn.Module:
    model = getattr(torchvision.models, name)()
    model.fc = nn.Identity()
    return model.eval()


def test_knn_linear_finetune_on_a_convnet_checkpoint(trained, capsys):
    root, ckpt = trained
    data = ["--train", str(root / "train"), "--val", str(root / "val"), "--num-workers", "0", "--device", "cpu"]
    assert main(["knn", "--checkpoint", str(ckpt), *data]) == 0
    assert "k-NN top-1 (k=20, T=0.07)" in capsys.readouterr().out
    assert main(["linear", "--checkpoint", str(ckpt), *data, "--epochs", "1", "--lr", "0.1"]) == 0
    assert "pooled features (512 wide)" in capsys.readouterr().out
    assert main(["linear", "--checkpoint", str(ckpt), *data, "--epochs", "1", "--features", "cls4"]) == 2
    err = capsys.readouterr().err
    assert "--features cls4" in err and err.count("\n") == 1
    assert main(["finetune", str(ckpt), *data, "--epochs", "1", "--batch-size", "4"]) == 0
    assert "fine-tuned top-1" in capsys.readouterr().out


def test_arch_and_patch_flags_against_a_convnet_file(trained, capsys):
    """A mismatch names the convnet without a patch; --patch-size is a ViT's; timm/resnet18 is resnet18."""
    root, ckpt = trained
    data = ["--train", str(root / "train"), "--val", str(root / "val"), "--num-workers", "0", "--device", "cpu"]
    for flags, words in ((["--arch", "vit_small"], f"checkpoint {ckpt} is a resnet18 (read from the file): --arch "
                                                   "vit_small does not match; pass --arch resnet18"),
                         (["--patch-size", "16"], "is a resnet18 (read from the file): --patch-size applies to ViTs "
                                                  "only; leave it out")):
        assert main(["knn", "--checkpoint", str(ckpt), *flags, *data]) == 2
        err = capsys.readouterr().err
        assert words in err and "None" not in err and err.count("\n") == 1, err
    assert load_teacher_backbone(ckpt, arch="timm/resnet18").spec.arch == "resnet18"


def test_finetune_random_init_of_a_convnet_folder(trained, capsys, tmp_path, monkeypatch):
    """--random-init builds the folder's convnet afresh (it called the ViT constructor with a ResNet name), at the
    crop the folder declares (fine-tuning itself stubbed: tested above)."""
    import fastdino.eval.finetune as finetune_module

    root, ckpt = trained
    assert main(["export", str(ckpt), "--format", "timm", "--out", str(tmp_path / "timm")]) == 0
    given = []
    monkeypatch.setattr(finetune_module, "finetune", lambda model, train, val, size, *a, **k: given.append(
        (model, size)) or SimpleNamespace(classes=[], top1=0.0, skipped_val=0))
    data = ["--train", str(root / "train"), "--val", str(root / "val"), "--device", "cpu"]
    assert main(["finetune", str(tmp_path / "timm"), *data, "--random-init"]) == 0
    assert "random initialisation" in capsys.readouterr().out
    (model, size), = given
    trained_weights = load_teacher_backbone(ckpt).model.state_dict()
    assert isinstance(model, torchvision.models.ResNet) and size == 32
    assert model.state_dict().keys() == trained_weights.keys()
    assert not torch.equal(model.state_dict()["conv1.weight"], trained_weights["conv1.weight"])


def test_attention_maps_of_a_convnet_are_refused(trained, capsys, tmp_path):
    root, ckpt = trained
    image = next((root / "val").rglob("*.jpg"))
    assert main(["attention", str(image), "--checkpoint", str(ckpt), "--out", str(tmp_path / "maps")]) == 2
    err = capsys.readouterr().err
    assert "a ViT's class-token attention" in err and "resnet18" in err and err.count("\n") == 1
    assert not (tmp_path / "maps").exists()


def test_export_writes_what_the_official_code_reads(trained, tmp_path):
    """official-backbone: torchvision's keys without fc, strictly loadable into resnet18() with fc = Identity(), the
    same features as fastdino's teacher; official: teacher keys behind `module.` (the official code wraps a network
    with BatchNorm in DDP), read back to the same backbone."""
    _, ckpt = trained
    ours = load_teacher_backbone(ckpt)
    assert ours.spec.arch == "resnet18" and ours.image_size == 32
    x = torch.randn(2, 3, 32, 32)
    out = tmp_path / "backbone.pth"
    assert main(["export", str(ckpt), "--format", "official-backbone", "--out", str(out)]) == 0
    state = torch.load(out, weights_only=True)
    assert not any(k.startswith(("fc.", "backbone.")) for k in state)
    reference = torchvision_resnet("resnet18")
    reference.load_state_dict(state, strict=True)
    torch.testing.assert_close(reference(x), ours.model(x), rtol=0, atol=0)
    full = tmp_path / "full.pth"
    assert main(["export", str(ckpt), "--format", "official", "--out", str(full)]) == 0
    saved = torch.load(full, weights_only=True)
    assert all(k.startswith("module.") for k in saved["teacher"]) and "dino_loss" in saved
    back = load_teacher_backbone(full)
    assert back.spec.arch == "resnet18" and back.kind == "official"
    torch.testing.assert_close(back.model(x), ours.model(x), rtol=0, atol=0)
    assert torch.equal(read_dino_weights(full).center, load_checkpoint(ckpt)["center"]["center"])


def test_export_of_a_convnet_never_replaces_a_file(trained, tmp_path, capsys):
    """(timm / hf folders of convnets: tests/test_interop_timm.py, test_interop_hf.py.)"""
    _, ckpt = trained
    taken = tmp_path / "teacher.pth"  # a file formats' --out that exists is never replaced
    taken.write_text("kept")
    assert main(["export", str(ckpt), "--format", "official", "--out", str(taken)]) == 2
    err = capsys.readouterr().err
    assert f"--out {taken} exists" in err and err.count("\n") == 1 and taken.read_text() == "kept"


def test_official_resnet50_release_file_is_read(tmp_path):
    """dino_resnet50_pretrain.pth's layout (torchvision ResNet-50 keys, no fc) is recognised by its keys, read with
    weights_only, and exported back to the same keys."""
    reference = torchvision_resnet("resnet50")
    path = tmp_path / "dino_resnet50_pretrain.pth"
    save_checkpoint(reference.state_dict(), path)
    loaded = load_teacher_backbone(path)
    assert loaded.spec.arch == "resnet50" and loaded.kind == "official-backbone" and loaded.image_size == 224
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded.model(x), reference(x), rtol=0, atol=0)
    out = tmp_path / "again.pth"
    assert main(["export", str(path), "--format", "official-backbone", "--out", str(out)]) == 0
    assert torch.load(out, weights_only=True).keys() == reference.state_dict().keys()


def test_train_init_from_an_official_resnet_file(trained, tmp_path):
    """train.init_from reads a torchvision-keyed ResNet file (its ImageNet `fc` dropped: an identity in the official
    code) into both backbones; the head starts fresh."""
    root, _ = trained
    reference = torchvision.models.resnet18()  # with its fc: dropped on reading
    path = tmp_path / "resnet18_backbone.pth"
    save_checkpoint(reference.state_dict(), path)
    trainer = Trainer(load_config(None, RUN + [f"data.path={root}", f"train.output_dir={tmp_path / 'run'}",
                                               f"train.init_from={path}"]))
    for net in (trainer.method.student_module(), trainer.method.teacher):
        state = net.backbone.state_dict()
        assert all(torch.equal(state[k], v) for k, v in reference.state_dict().items() if not k.startswith("fc."))
