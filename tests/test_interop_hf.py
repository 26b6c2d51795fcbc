"""Hugging Face transformers folders out and in (interop/hf.py): `fastdino export --format hf` loads as a
`ViTModel` with the same class tokens and an `AutoImageProcessor` that gives fastdino's evaluation transform,
round-trips through train.init_from tensor for tensor, and a ViT transformers built and saved reads into fastdino
with its features."""

import json
import logging

import numpy as np
import pytest
import torch
from interop_cases import HEAD, SIZES, assert_loads_back_tensor_for_tensor, checkpoint, images
from PIL import Image

from fastdino.cli import main
from fastdino.data.multicrop import eval_transform
from fastdino.errors import CheckpointError
from fastdino.interop.hf import hf_class_token
from fastdino.interop.official import load_teacher_backbone

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

@pytest.fixture(scope="module", params=list(SIZES))
def exported(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    cfg, method = checkpoint(tmp / "last.pt", SIZES[request.param] + HEAD)
    assert main(["export", str(tmp / "last.pt"), "--format", "hf", "--out", str(tmp / "hf")]) == 0
    return cfg, method, tmp / "hf"


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
