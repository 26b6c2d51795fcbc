"""timm folders out and in (interop/timm.py): `fastdino export --format timm` loads in timm itself with the same
class tokens (a convnet: pooled features, at any input size) and preprocessing, round-trips through
train.init_from tensor for tensor, and a model timm built and saved reads into fastdino with timm's features."""

import json
import logging

import numpy as np
import pytest
import torch
from interop_cases import (
    CONVNETS,
    HEAD,
    ODD_SIZE,
    SIZES,
    assert_loads_back_tensor_for_tensor,
    checkpoint,
    eval_image_sizes,
    export_checkpoint,
    images,
)
from PIL import Image

from fastdino.cli import main
from fastdino.config import load_config
from fastdino.data.multicrop import eval_transform
from fastdino.errors import CheckpointError
from fastdino.interop.official import init_from_weights, load_teacher_backbone, read_dino_weights
from fastdino.interop.timm import timm_class_token, timm_convnet_features
from fastdino.methods import build_method

timm = pytest.importorskip("timm")
pytest.importorskip("safetensors")


@pytest.fixture(scope="module", params=list(SIZES))
def exported(request, tmp_path_factory):
    return export_checkpoint(tmp_path_factory, request.param, SIZES[request.param], "timm")


def test_timm_loads_the_export_three_ways_with_fastdinos_class_tokens(exported):
    cfg, method, folder = exported
    size = cfg.model.img_size
    x = images(size)
    with torch.no_grad():
        ours = method.teacher.backbone.eval()(x)
        config = json.loads((folder / "config.json").read_text())
        weights = str(folder / "model.safetensors")
        models = [
            timm.create_model(f"local-dir:{folder}", pretrained=True),
            timm.create_model(config["architecture"], pretrained=True, num_classes=0,
                              pretrained_cfg_overlay={"file": weights}, **config["model_args"]),
            timm.create_model(config["architecture"], checkpoint_path=weights, num_classes=0, **config["model_args"]),
        ]
        for model in models:
            assert model.num_features == ours.shape[1]
            torch.testing.assert_close(model.eval()(x), ours, atol=1e-5, rtol=0)
    assert config["num_classes"] == 0 and config["num_features"] == ours.shape[1]
    assert config["pretrained_cfg"]["input_size"] == [3, size, size]


def test_timm_preprocessing_is_fastdinos_eval_transform(exported):
    cfg, _, folder = exported
    model = timm.create_model(f"local-dir:{folder}", pretrained=False)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((400, 300), Image.BILINEAR)
    torch.testing.assert_close(transform(img), eval_transform(cfg.model.img_size)(img), atol=1e-5, rtol=0)


def test_timm_export_round_trips_through_init_from_tensor_for_tensor(exported):
    assert_loads_back_tensor_for_tensor(*exported, "timm")


def test_the_restatement_of_timms_vit_matches_timm(exported):
    """The check used when timm is not installed computes what timm computes."""
    cfg, _, folder = exported
    x = images(cfg.model.img_size)
    with torch.no_grad():
        torch.testing.assert_close(timm_class_token(folder, x, use_library=False),
                                   timm_class_token(folder, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("save", ["save_for_hf", "state_dict_pth"])
def test_a_model_timm_built_reads_with_timms_features(save, tmp_path):
    model = timm.create_model("vit_tiny_patch16_224", patch_size=8, img_size=32, depth=3, num_classes=5).eval()
    if save == "save_for_hf":
        pytest.importorskip("huggingface_hub")
        timm.models.save_for_hf(model, str(tmp_path / "m"), safe_serialization=True)
        source = tmp_path / "m"
    else:
        source = tmp_path / "m.pth"
        torch.save(model.state_dict(), source)  # with its classifier head.*: not part of the backbone
    loaded = load_teacher_backbone(source)
    x = images(32)
    with torch.no_grad():
        theirs = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(loaded.model(x), theirs, atol=1e-5, rtol=0)
    assert (loaded.spec.arch, loaded.spec.patch_size, loaded.spec.depth, loaded.image_size) == ("vit_tiny", 8, 3, 32)


@pytest.fixture(scope="module", params=list(CONVNETS))
def convnet_exported(request, tmp_path_factory):
    """(config, method, timm folder, what the `timm` loggers said during the export)."""
    tmp = tmp_path_factory.mktemp(request.param)
    cfg, method = checkpoint(tmp / "last.pt", CONVNETS[request.param] + HEAD)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("timm")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)  # as a user's INFO logging would let through
    try:
        assert main(["export", str(tmp / "last.pt"), "--format", "timm", "--out", str(tmp / "timm")]) == 0
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return cfg, method, tmp / "timm", [r.getMessage() for r in records]


def test_timm_builds_a_convnet_export_with_fastdinos_pooled_features(convnet_exported):
    """resnet18: timm's `resnet18` (the same v1.5 network and key names); timm/resnet10t: `resnet10t`. At the check
    size and at an odd one, where every stride-2 stage rounds."""
    cfg, method, folder, _ = convnet_exported
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == cfg.model.arch.removeprefix("timm/") and config["num_classes"] == 0
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert model.num_classes == 0 and model.num_features == config["num_features"]
    with torch.no_grad():
        for size in (64, ODD_SIZE):
            x = images(size)
            ours = method.teacher.backbone.eval()(x)
            assert ours.shape == (2, model.num_features)
            torch.testing.assert_close(model(x), ours, atol=1e-5, rtol=0)


def test_timm_convnet_preprocessing_is_fastdinos_eval_transform(convnet_exported):
    folder = convnet_exported[2]
    model = timm.create_model(f"local-dir:{folder}", pretrained=False)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((400, 300), Image.BILINEAR)
    torch.testing.assert_close(transform(img), eval_transform(224)(img), atol=1e-5, rtol=0)


def test_a_convnet_export_declares_the_crop_its_run_trained_on(tmp_path_factory, monkeypatch):
    """A resnet18 run on 32 px global crops: timm's data config crops 32 (fastdino's eval transform at 32, as
    `knn` on last.pt uses), and knn / finetune read the export at the checkpoint's size."""
    cfg, _, folder = export_checkpoint(tmp_path_factory, "resnet18_32", ["model.arch=resnet18", "data.global_size=32"],
                                       "timm")
    model = timm.create_model(f"local-dir:{folder}", pretrained=False)
    data_config = timm.data.resolve_data_config({}, model=model)
    assert tuple(data_config["input_size"]) == (3, 32, 32)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((400, 300), Image.BILINEAR)
    torch.testing.assert_close(timm.data.create_transform(**data_config)(img), eval_transform(32)(img), atol=1e-5,
                               rtol=0)
    assert eval_image_sizes(monkeypatch, folder) == eval_image_sizes(monkeypatch, folder.parent / "last.pt") == (32, 32)


def test_timm_convnet_export_round_trips_through_init_from_tensor_for_tensor(convnet_exported):
    assert_loads_back_tensor_for_tensor(*convnet_exported[:3], "timm")


def test_a_timm_resnet_and_torchvisions_load_each_others_exports(tmp_path):
    """timm/resnet18 exported to timm reads back as `resnet18` (timm's ResNet is torchvision's network and keys);
    it starts a timm/resnet18 run and a resnet18 run alike, tensor for tensor; a resnet34 run is still refused."""
    cfg, method = checkpoint(tmp_path / "last.pt", ["model.arch=timm/resnet18", *HEAD])
    assert main(["export", str(tmp_path / "last.pt"), "--format", "timm", "--out", str(tmp_path / "timm")]) == 0
    weights = read_dino_weights(tmp_path / "timm")
    for arch in ("timm/resnet18", "resnet18"):
        fresh = build_method(load_config(None, [f"model.arch={arch}", *HEAD]), torch.device("cpu"))
        init_from_weights(fresh, weights, cfg.dino.norm_last_layer)
        for name, t in method.teacher.backbone.state_dict().items():
            assert torch.equal(fresh.teacher.backbone.state_dict()[name], t), (arch, name)
    with pytest.raises(CheckpointError, match="model.arch: file 'resnet18' vs config 'timm/resnet34'"):
        init_from_weights(build_method(load_config(None, ["model.arch=timm/resnet34", *HEAD]), torch.device("cpu")),
                          weights, cfg.dino.norm_last_layer)


def test_the_export_check_does_not_show_the_temporary_folder(convnet_exported):
    """timm's loader logs the folder it loads: during the check, a temporary one the user never sees."""
    folder, said = convnet_exported[2], convnet_exported[3]
    assert not [m for m in said if f".{folder.name}." in m], said


def test_the_convnet_check_without_timm_matches_timm(convnet_exported):
    """use_library=False (timm not installed): fastdino's backbone loaded strictly from the folder's tensors."""
    cfg, _, folder, _ = convnet_exported
    x = images(ODD_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(timm_convnet_features(folder, cfg.model.arch, x, use_library=False),
                                   timm_convnet_features(folder, cfg.model.arch, x), atol=1e-5, rtol=0)
