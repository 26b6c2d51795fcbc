"""Hugging Face transformers folders out and in (interop/hf.py): `fastdino export --format hf` loads as a
`ViTModel` with the same class tokens and an `AutoImageProcessor` that gives fastdino's evaluation transform,
round-trips through train.init_from tensor for tensor, and a ViT transformers built and saved reads into fastdino
with its features. Convnets: a torchvision ResNet as a `ResNetModel`, a timm/<name> one as a `TimmWrapperModel`,
both through `AutoModel`, with fastdino's pooled features at any input size."""

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

import fastdino.interop.export as export_module
from fastdino.cli import main
from fastdino.data.multicrop import eval_transform
from fastdino.errors import CheckpointError
from fastdino.interop.export import ExportCheckError, export
from fastdino.interop.hf import hf_class_token, hf_convnet_features
from fastdino.interop.official import load_teacher_backbone

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")


@pytest.fixture(scope="module", params=list(SIZES))
def exported(request, tmp_path_factory):
    return export_checkpoint(tmp_path_factory, request.param, SIZES[request.param], "hf")


def test_vitmodel_loads_the_export_with_fastdinos_class_tokens(exported):
    cfg, method, folder = exported
    model = transformers.ViTModel.from_pretrained(folder, add_pooling_layer=False).eval()
    c = model.config
    assert (c.layer_norm_eps, c.hidden_size, c.num_attention_heads, c.image_size, c.patch_size, c.qkv_bias) == (
        1e-6, method.teacher.backbone.embed_dim, method.teacher.backbone.blocks[0].attn.num_heads,
        cfg.model.img_size, cfg.model.patch_size, True)
    x = images(cfg.model.img_size)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).last_hidden_state[:, 0],
                                   method.teacher.backbone.eval()(x), atol=1e-5, rtol=0)


def test_auto_image_processor_gives_fastdinos_eval_transform(exported):
    """transformers' PIL backend gives the same pixels; its default (torchvision) backend resizes the uint8
    tensor instead of the PIL image: the same geometry, a few grey levels apart."""
    cfg, _, folder = exported
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((400, 300), Image.BILINEAR)
    ours = eval_transform(cfg.model.img_size)(img)
    pil = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")
    torch.testing.assert_close(pil(img, return_tensors="pt")["pixel_values"][0], ours, atol=1e-5, rtol=0)
    default = transformers.AutoImageProcessor.from_pretrained(folder)(img, return_tensors="pt")["pixel_values"][0]
    assert default.shape == ours.shape
    assert (default - ours).abs().mean() < 0.01 and (default - ours).abs().max() < 0.1


def test_hf_export_round_trips_through_init_from_tensor_for_tensor(exported):
    assert_loads_back_tensor_for_tensor(*exported, "hf")


def test_the_restatement_of_transformers_vit_matches_transformers(exported):
    cfg, _, folder = exported
    x = images(cfg.model.img_size)
    with torch.no_grad():
        torch.testing.assert_close(hf_class_token(folder, x, use_library=False), hf_class_token(folder, x),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("head", ["ViTModel", "ViTForImageClassification"])
def test_a_vit_transformers_built_reads_with_its_features(head, tmp_path):
    config = transformers.ViTConfig(hidden_size=192, num_hidden_layers=3, num_attention_heads=3,
                                    intermediate_size=768, image_size=32, patch_size=8, layer_norm_eps=1e-6,
                                    num_labels=5)
    torch.manual_seed(3)
    model = getattr(transformers, head)(config).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = load_teacher_backbone(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["architectures"] == [head]
    x = images(32)
    with torch.no_grad():
        vit = model if head == "ViTModel" else model.vit
        theirs = vit(pixel_values=x).last_hidden_state[:, 0]
        torch.testing.assert_close(loaded.model(x), theirs, atol=1e-5, rtol=0)
    assert (loaded.kind, loaded.spec.arch, loaded.spec.patch_size, loaded.spec.depth) == ("hf", "vit_tiny", 8, 3)


def test_transformers_default_eps_reads_with_a_warning_and_stray_tensors_are_refused(tmp_path, caplog):
    """ViTConfig's default layer_norm_eps is 1e-12 (facebook/dino-vits16 carries it); a tensor fastdino's ViT has
    no place for stops the read instead of being dropped."""
    from safetensors.torch import load_file, save_file

    config = transformers.ViTConfig(hidden_size=192, num_hidden_layers=1, num_attention_heads=3,
                                    intermediate_size=768, image_size=32, patch_size=8)
    transformers.ViTModel(config).save_pretrained(tmp_path / "m")
    with caplog.at_level(logging.WARNING, logger="fastdino"):
        load_teacher_backbone(tmp_path / "m")
    assert "layer_norm_eps 1e-12" in caplog.text
    weights = tmp_path / "m" / "model.safetensors"
    save_file({**load_file(weights), "encoder.layer.0.attention.attention.extra": torch.zeros(3)}, weights)
    with pytest.raises(CheckpointError, match="no place for: encoder.layer.0.attention.attention.extra"):
        load_teacher_backbone(tmp_path / "m")


@pytest.fixture(scope="module", params=list(CONVNETS))
def convnet_exported(request, tmp_path_factory):
    return export_checkpoint(tmp_path_factory, request.param, CONVNETS[request.param], "hf")


def test_automodel_loads_a_convnet_export_with_fastdinos_pooled_features(convnet_exported):
    """resnet18 -> ResNetModel (ResNetModel.from_pretrained too), timm/resnet10t -> TimmWrapperModel; pooler_output
    flattened at the check size and at an odd one."""
    cfg, method, folder = convnet_exported
    tv = cfg.model.arch == "resnet18"
    models = [transformers.AutoModel.from_pretrained(folder)]
    if tv:
        models.append(transformers.ResNetModel.from_pretrained(folder))
        c = models[1].config
        assert (c.downsample_in_bottleneck, c.downsample_in_first_stage, c.layer_type) == (False, False, "basic")
    assert type(models[0]).__name__ == ("ResNetModel" if tv else "TimmWrapperModel")
    with torch.no_grad():
        for size in (64, ODD_SIZE):
            x = images(size)
            ours = method.teacher.backbone.eval()(x)
            for model in models:
                torch.testing.assert_close(model.eval()(pixel_values=x).pooler_output.flatten(1), ours, atol=1e-5,
                                           rtol=0)


def test_auto_image_processor_of_a_convnet_export_gives_fastdinos_eval_transform(convnet_exported):
    """ResNet: the folder's preprocessor_config.json (PIL backend); timm/<name>: TimmWrapperImageProcessor reads
    timm's pretrained_cfg from config.json."""
    folder = convnet_exported[2]
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((400, 300), Image.BILINEAR)
    processor = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")
    torch.testing.assert_close(processor(img, return_tensors="pt")["pixel_values"][0], eval_transform(224)(img),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(CONVNETS))
def test_a_convnet_export_declares_the_crop_its_run_trained_on(name, tmp_path_factory, monkeypatch):
    """A run on 32 px global crops: AutoImageProcessor (ResNet: preprocessor_config.json; timm/<name>:
    config.json's pretrained_cfg) crops 32 with fastdino's eval transform, and knn / finetune read the export at
    the checkpoint's size."""
    _, _, folder = export_checkpoint(tmp_path_factory, f"{name}_32", CONVNETS[name] + ["data.global_size=32"], "hf")
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((400, 300), Image.BILINEAR)
    processor = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")
    pixels = processor(img, return_tensors="pt")["pixel_values"][0]
    assert pixels.shape == (3, 32, 32)
    torch.testing.assert_close(pixels, eval_transform(32)(img), atol=1e-5, rtol=0)
    assert eval_image_sizes(monkeypatch, folder) == eval_image_sizes(monkeypatch, folder.parent / "last.pt") == (32, 32)


def test_hf_convnet_export_round_trips_through_init_from_tensor_for_tensor(convnet_exported):
    assert_loads_back_tensor_for_tensor(*convnet_exported, "hf")


def test_the_convnet_check_without_transformers_matches_transformers(convnet_exported):
    cfg, _, folder = convnet_exported
    x = images(ODD_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(hf_convnet_features(folder, cfg.model.arch, x, use_library=False),
                                   hf_convnet_features(folder, cfg.model.arch, x), atol=1e-5, rtol=0)


def test_a_resnet_config_with_the_stride_elsewhere_is_refused_by_the_check(tmp_path, monkeypatch):
    """downsample_in_bottleneck puts a bottleneck's stride on its 1x1 conv (ResNet v1, not torchvision's v1.5):
    transformers computes other features, the restatement refuses the config; nothing is written."""
    checkpoint(tmp_path / "last.pt", ["model.arch=resnet50"] + HEAD)
    real = export_module.hf_resnet_config
    monkeypatch.setattr(export_module, "hf_resnet_config",
                        lambda *a: {**real(*a), "downsample_in_bottleneck": True})
    for use_library, why in ((True, "differ from fastdino's"), (False, "downsample_in_bottleneck True")):
        with pytest.raises(ExportCheckError, match=why):
            export(tmp_path / "last.pt", tmp_path / "hf", "hf", use_library=use_library)
        assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.*"))


def test_a_resnet_transformers_built_reads_with_its_features_and_a_v1_stride_is_refused(tmp_path, capsys):
    config = transformers.ResNetConfig(depths=[2, 2, 2, 2], layer_type="basic", hidden_sizes=[64, 128, 256, 512],
                                       num_labels=5)
    torch.manual_seed(3)
    model = transformers.ResNetForImageClassification(config).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = load_teacher_backbone(tmp_path / "m")
    assert (loaded.kind, loaded.spec.arch, loaded.image_size) == ("hf", "resnet18", 224)
    x = images(ODD_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model.resnet(pixel_values=x).pooler_output.flatten(1),
                                   atol=1e-5, rtol=0)
    v1 = transformers.ResNetConfig(depths=[1, 1, 1, 1], downsample_in_bottleneck=True)
    transformers.ResNetModel(v1).save_pretrained(tmp_path / "v1")
    with pytest.raises(CheckpointError, match="downsample_in_bottleneck True"):
        load_teacher_backbone(tmp_path / "v1")
    capsys.readouterr()  # transformers' "Writing model shards" bar
    assert main(["export", str(tmp_path / "v1"), "--format", "hub", "--out", str(tmp_path / "v1.pth")]) == 2
    err = capsys.readouterr().err
    assert "downsample_in_bottleneck True" in err and err.count("\n") == 1 and not (tmp_path / "v1.pth").exists()


def test_a_timm_model_transformers_wrapped_and_saved_reads_with_its_features(tmp_path):
    """save_pretrained of a TimmWrapperForImageClassification: keys behind `timm_model.`, a classifier `fc`,
    `model_args: null` and no pretrained_cfg in config.json."""
    pytest.importorskip("timm")
    torch.manual_seed(4)
    model = transformers.TimmWrapperForImageClassification(
        transformers.TimmWrapperConfig(architecture="resnet10t", num_labels=5)).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = load_teacher_backbone(tmp_path / "m")
    assert (loaded.kind, loaded.spec.arch, loaded.image_size) == ("hf", "timm/resnet10t", 224)
    x = images(ODD_SIZE)
    with torch.no_grad():
        theirs = model.timm_model.forward_head(model.timm_model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(loaded.model(x), theirs, atol=1e-5, rtol=0)
