"""`fastdino export` (interop/export.py): the on-the-spot check refuses a broken mapping and writes nothing, `hub`
is the release layout, SiT runs export their backbone, bad input is one line and exit 2, and the written formats
start evaluations and runs (knn, finetune, init_from from a lone .safetensors file)."""

import os
from pathlib import Path

import interop_cases
import pytest
import torch
from PIL import Image

import fastdino.interop.export as export_module
from fastdino.cli import main
from fastdino.config import load_config
from fastdino.data.demo import make_demo_dataset
from fastdino.interop.export import ExportCheckError, export
from fastdino.interop.hf import to_hf
from fastdino.interop.official import init_from_weights, load_teacher_backbone, read_dino_weights
from fastdino.methods import build_method

safetensors = pytest.importorskip("safetensors.torch")

TINY = ["model.arch=vit_tiny", "model.depth=2", "model.patch_size=8", "model.img_size=32", "data.global_size=32",
        "data.local_size=16", "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16"]


def checkpoint(path, overrides=TINY):
    return interop_cases.checkpoint(path, overrides)


def _swap_q_k(backbone):
    out = to_hf(backbone)
    for k in [k for k in out if ".attention.attention.query." in k]:
        other = k.replace(".query.", ".key.")
        out[k], out[other] = out[other], out[k]
    return out


@pytest.mark.parametrize("use_library", [True, False], ids=["transformers", "restatement"])
@pytest.mark.parametrize("broken", ["q_k_swapped", "eps_1e-12"])
def test_a_broken_mapping_fails_the_check_and_writes_nothing(broken, use_library, tmp_path, monkeypatch):
    if use_library:
        pytest.importorskip("transformers")
    checkpoint(tmp_path / "last.pt")
    if broken == "q_k_swapped":
        monkeypatch.setattr(export_module, "to_hf", _swap_q_k)
    else:
        real = export_module.hf_config
        monkeypatch.setattr(export_module, "hf_config", lambda **shape: {**real(**shape), "layer_norm_eps": 1e-12})
    before = set(tmp_path.iterdir())
    with pytest.raises(ExportCheckError, match="refused: loaded back, it gives class tokens that differ"):
        export(tmp_path / "last.pt", tmp_path / "hf", "hf", use_library=use_library)
    assert set(tmp_path.iterdir()) == before  # no output, no temporary folder left


def test_hub_is_the_official_backbone_layout(tmp_path):
    checkpoint(tmp_path / "last.pt")
    hub = export(tmp_path / "last.pt", fmt="hub")
    backbone = export(tmp_path / "last.pt", fmt="official-backbone")
    assert (hub.name, backbone.name) == ("last_hub.pth", "last_official_backbone.pth")
    a, b = torch.load(hub, weights_only=True), torch.load(backbone, weights_only=True)
    assert a.keys() == b.keys() and "cls_token" in a and all(torch.equal(a[k], b[k]) for k in a)


def test_a_sit_run_exports_its_backbone_and_refuses_the_full_official_layout(tmp_path, capsys):
    cfg, method = checkpoint(tmp_path / "sit.pt", ["train.method=sit", "sit.decoder=linear", "sit.proj_hidden_dim=0",
                                                   "sit.proj_dim=16", *TINY[:6]])
    assert main(["export", str(tmp_path / "sit.pt")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no DINO head" in err and "--format" in err
    assert not (tmp_path / "sit_official.pth").exists()
    assert main(["export", str(tmp_path / "sit.pt"), "--format", "timm"]) == 0
    weights = read_dino_weights(tmp_path / "sit_timm")
    for name, t in method.teacher.backbone.state_dict().items():
        assert torch.equal(weights.teacher[f"backbone.{name}"], t), name


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    checkpoint(tmp_path / "last.pt")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text('{"architecture": "vit_tiny_patch16_224"}')
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text('{"architecture": "vit_tiny_patch16_224"}')
    torch.save({"cls_token": torch.zeros(1, 1, 192), "where": Path("/")}, pickled / "pytorch_model.bin")
    cases = [
        (["export", str(tmp_path / "last.pt"), "--format", "onnx"], "--format"),
        (["export", str(tmp_path / "last.pt"), "--format", "timm", "--out", str(full)], "not an empty folder"),
        (["export", str(tmp_path / "last.pt"), "--format", "hub", "--out", str(full)], "is a folder"),
        (["export", str(no_weights), "--format", "hub"], "has no weights"),
        (["export", str(pickled), "--format", "hub"], "pickled Python object"),
        (["knn", "--checkpoint", str(no_weights), "--train", str(tmp_path), "--val", str(tmp_path)], "has no weights"),
        (["export", str(tmp_path / "last.pt"), "--out", str(tmp_path / "nowhere" / "x.pth")],
         f"its folder {tmp_path / 'nowhere'} does not exist (an export makes no folders above its own: mkdir -p "),
        (["export", str(tmp_path / "last.pt"), "--format", "hf", "--out", str(full / "keep.txt")],
         f"--out {full / 'keep.txt'} is a file: the hf format writes a folder"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert [p.name for p in full.iterdir()] == ["keep.txt"]


def test_an_official_layout_of_a_timm_convnet_is_refused_before_any_work(tmp_path, capsys):
    """The official layouts cannot name a timm model and the official code cannot build one (export's
    official_layout_refusal): one line pointing to timm / hf, nothing written. timm/resnet18 is torchvision's
    network and keys: it goes out, and reads back as the resnet18 it is, --arch timm/resnet18 accepted."""
    tmp = tmp_path / "t"
    tmp.mkdir()
    interop_cases.checkpoint(tmp / "last.pt", ["model.arch=timm/resnet10t", *interop_cases.HEAD])
    for fmt in ("official", "official-backbone", "hub"):
        assert main(["export", str(tmp / "last.pt"), "--format", fmt]) == 2
        err = capsys.readouterr().err
        assert f"--format {fmt}: checkpoint {tmp / 'last.pt'} holds a timm/resnet10t backbone" in err, err
        assert "use --format timm or hf" in err and err.count("\n") == 1
        assert [p.name for p in tmp.iterdir()] == ["last.pt"]
    _, method = interop_cases.checkpoint(tmp_path / "last.pt", ["model.arch=timm/resnet18", *interop_cases.HEAD])
    assert main(["export", str(tmp_path / "last.pt"), "--format", "hub", "--out", str(tmp_path / "hub.pth")]) == 0
    loaded = load_teacher_backbone(tmp_path / "hub.pth", arch="timm/resnet18")
    assert loaded.spec.arch == "resnet18"
    x = interop_cases.images(64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), method.teacher.backbone.eval()(x), atol=0, rtol=0)


def test_a_run_folder_an_image_or_a_yaml_file_as_checkpoint_is_one_plain_line(tmp_path, capsys):
    """A run's folder suggests its last.pt; a file torch cannot read at all is said to be one, without torch's
    text on weights_only defaults."""
    run = tmp_path / "run"
    run.mkdir()
    checkpoint(run / "last.pt")
    (tmp_path / "empty").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")
    (tmp_path / "config.yaml").write_text("model:\n  arch: resnet18\n")
    data = ["--train", str(tmp_path), "--val", str(tmp_path)]
    cases = [
        (["export", str(run)], f"{run} is a folder without config.json", f"did you mean {run / 'last.pt'}?"),
        (["knn", "--checkpoint", str(tmp_path / "empty"), *data], "without config.json", ""),
        (["export", str(tmp_path / "photo.jpg")], f"checkpoint {tmp_path / 'photo.jpg'} is not a file torch can read",
         "neither a torch.save archive nor a pickle"),
        (["knn", "--checkpoint", str(tmp_path / "config.yaml"), *data], "config.yaml is not a file torch can read",
         "neither a torch.save archive nor a pickle"),
        (["finetune", str(tmp_path / "config.yaml"), *data], "config.yaml is not a file torch can read", ""),
    ]
    for argv, *words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert all(w in err for w in words) and err.count("\n") == 1, (argv, err)
        assert "weights_only" not in err and "PyTorch 2.6" not in err, err
        if not words[1]:
            assert "did you mean" not in err, err


def test_exports_start_evaluations_and_runs(tmp_path, capsys):
    demo = make_demo_dataset(tmp_path / "demo", n_train_per_class=2, n_val_per_class=1, size=32)
    cfg, method = checkpoint(tmp_path / "last.pt")
    for fmt in ("timm", "hf"):
        assert main(["export", str(tmp_path / "last.pt"), "--format", fmt]) == 0
        folder = tmp_path / f"last_{fmt}"
        common = ["--train", str(demo / "train"), "--val", str(demo / "val"), "--num-workers", "0"]
        assert main(["knn", "--checkpoint", str(folder), *common, "--k", "2"]) == 0
        assert main(["finetune", str(folder), *common, "--epochs", "1", "--batch-size", "4"]) == 0
        assert "fine-tuned top-1" in capsys.readouterr().out
    # a lone .safetensors file (transformers' names) starts a run: both backbones, tensor for tensor
    safetensors.save_file(to_hf(export_module.to_official_backbone(read_dino_weights(tmp_path / "last.pt"))),
                          tmp_path / "model.safetensors")
    fresh_cfg = load_config(None, TINY)
    fresh = build_method(fresh_cfg, torch.device("cpu"))
    init_from_weights(fresh, read_dino_weights(tmp_path / "model.safetensors"), fresh_cfg.dino.norm_last_layer)
    for name, t in method.teacher.backbone.state_dict().items():
        assert torch.equal(fresh.student_module().backbone.state_dict()[name], t), name


def test_an_out_named_like_the_other_kind_is_refused_before_any_work(tmp_path, capsys):
    checkpoint(tmp_path / "last.pt")
    (tmp_path / "empty.pth").mkdir()  # an existing empty folder is a folder, whatever its name
    cases = [("timm", "model.pth", "the timm format writes a folder (config.json, model.safetensors)"),
             ("hf", "x.safetensors", "the hf format writes a folder (config.json, model.safetensors, prepro"),
             ("hub", "x.safetensors", "writes a torch.save file, not safetensors"),
             ("official", "x.SafeTensors", "writes a torch.save file, not safetensors"),
             ("official", "x.json", "writes a torch.save file, not json"),
             ("official-backbone", "newdir/", "names a folder: the official-backbone format writes one file")]
    before = sorted(tmp_path.iterdir())
    for fmt, name, words in cases:
        out = str(tmp_path / name) + ("/" if name.endswith("/") else "")
        assert main(["export", str(tmp_path / "last.pt"), "--format", fmt, "--out", out]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--out {out}" in err and words in err, err
        assert sorted(tmp_path.iterdir()) == before  # nothing written, no temporary folder left
    assert main(["export", str(tmp_path / "last.pt"), "--format", "timm", "--out", str(tmp_path / "empty.pth")]) == 0
    assert sorted(p.name for p in (tmp_path / "empty.pth").iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_exports_get_the_mode_a_plain_open_gives(tmp_path, mask):
    checkpoint(tmp_path / "last.pt")
    old = os.umask(mask)
    try:  # safetensors' save_file alone gives 0600, mkdtemp's folder 0700
        written = [export(tmp_path / "last.pt", fmt=fmt, use_library=False) for fmt in ("timm", "hf", "hub")]
    finally:
        os.umask(old)
    timm, hf, hub = written
    for folder in (timm, hf):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~mask, folder
        files = sorted(folder.iterdir())
        assert "model.safetensors" in [f.name for f in files]
        for f in files:
            assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f
    assert hub.stat().st_mode & 0o777 == 0o666 & ~mask


def test_an_empty_folder_reached_through_a_link_receives_the_export(tmp_path):
    """--out a link to an empty folder (a scratch volume's): the folder it names gets the files, the link stays
    (the rmdir of the link itself failed, after the check, with ENOTDIR)."""
    checkpoint(tmp_path / "last.pt")
    (tmp_path / "scratch" / "timm").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "scratch" / "timm")
    assert export(tmp_path / "last.pt", tmp_path / "link", fmt="timm", use_library=False) == tmp_path / "link"
    assert (tmp_path / "link").is_symlink()
    assert sorted(p.name for p in (tmp_path / "scratch" / "timm").iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "link", "scratch"]  # no temporary left


def test_a_folder_fsync_a_file_system_refuses_is_not_an_error(tmp_path, monkeypatch):
    """Some network and FUSE file systems answer a folder's fsync with EINVAL: the export (or shard set) stands;
    a file's fsync failing is still an error."""
    import errno

    from fastdino.file_modes import fsync_path

    real = os.fsync

    def fsync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    fsync_path(tmp_path)
    (tmp_path / "f").write_text("x")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        fsync_path(tmp_path / "f")
