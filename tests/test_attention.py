"""Attention maps: parity with a float64 restatement of the last block, the 60% mask against a brute-force
search, nearest upsampling, the PNG grid, and the CLI's one-line errors."""

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastdino.cli import main
from fastdino.config import config_to_dict, load_config
from fastdino.engine.checkpoint import save_checkpoint
from fastdino.eval.attention import (
    _TO_INPUT,
    class_attention_maps,
    crop_to_patches,
    mass_mask,
    upsample_patches,
    write_attention_maps,
)
from fastdino.methods import build_method
from fastdino.models.vit import build_backbone


def tiny_vit(patch_size=8, attention="sdpa"):
    return build_backbone("vit_tiny", depth=2, patch_size=patch_size, img_size=32, attention=attention).eval()


def reference_maps(backbone, x):
    """float64: the class-token row of the last block's softmax(q k^T / sqrt(d)), patches only, renormalised."""
    m = copy.deepcopy(backbone).double()
    tokens = m.prepare_tokens(x[None].double())
    for block in m.blocks[:-1]:
        tokens = block(tokens)
    last = m.blocks[-1]
    h = last.attn.num_heads
    b, n, c = tokens.shape
    qkv = last.attn.qkv(last.norm1(tokens)).reshape(n, 3, h, c // h)
    q, k = qkv[:, 0].transpose(0, 1), qkv[:, 1].transpose(0, 1)  # (h, n, d)
    scores = (q[:, :1] @ k.transpose(1, 2)) / math.sqrt(c // h)  # (h, 1, n): the class token's row
    row = scores.softmax(-1)[:, 0, 1:]  # (h, N)
    return row / row.sum(-1, keepdim=True)


@pytest.mark.parametrize("patch_size,size", [(8, (40, 24)), (16, (64, 48))])
def test_maps_match_float64_reference_and_sum_to_one(patch_size, size):
    backbone = tiny_vit(patch_size)
    x = torch.randn(3, size[1], size[0])
    maps = class_attention_maps(backbone, x)
    gh, gw = size[1] // patch_size, size[0] // patch_size
    assert maps.shape == (3, gh, gw) and maps.dtype == torch.float32
    ref = reference_maps(backbone, x)
    torch.testing.assert_close(maps.flatten(1).double(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(maps.flatten(1).sum(-1), torch.ones(3))


def test_mask_keeps_the_mass_with_fewest_patches_brute_force():
    maps = torch.rand(5, 3, 3) ** 3  # skewed, like attention
    maps[4] = torch.tensor([[0.5, 0.1, 0.1], [0.1, 0.1, 0.1], [0.0, 0.0, 0.0]])  # exactly 0.6 at two patches
    for mass in (0.6, 0.3, 1.0):
        masks = mass_mask(maps, mass)
        assert masks.shape == maps.shape and masks.dtype == torch.bool
        for m, keep in zip(maps.double(), masks):
            flat, total = m.flatten().tolist(), float(m.sum())
            best = next(
                (k, max(sum(flat[i] for i in s) for s in itertools.combinations(range(9), k)))
                for k in range(10)
                if any(sum(flat[i] for i in s) >= mass * total - 1e-12 for s in itertools.combinations(range(9), k))
            )
            assert int(keep.sum()) == best[0]
            kept = float(m[keep].sum())
            assert kept >= mass * total - 1e-12 and kept == pytest.approx(best[1])


def test_mask_refuses_bad_mass():
    with pytest.raises(ValueError, match="mass"):
        mass_mask(torch.rand(2, 2), 0.0)


def test_upsample_repeats_each_patch():
    maps = torch.arange(6.0).reshape(1, 2, 3)
    up = upsample_patches(maps, 4)
    assert up.shape == (1, 8, 12)
    for i, j in itertools.product(range(2), range(3)):
        assert (up[0, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4] == maps[0, i, j]).all()


def test_crop_to_patches_any_size():
    img = Image.new("RGB", (45, 37))
    assert crop_to_patches(img, 8).size == (40, 32)
    assert crop_to_patches(img, 16, image_size=50).size == (48, 48)  # short side 37 -> 50: 61x50
    with pytest.raises(ValueError, match="smaller than one"):
        crop_to_patches(Image.new("RGB", (7, 30)), 8)


def _image(path, size, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_png_grid_written(tmp_path):
    backbone = tiny_vit(8)
    a = _image(tmp_path / "a.png", (45, 37))
    b = _image(tmp_path / "a.jpg", (40, 40), seed=2)
    (tmp_path / "sub").mkdir()
    c = _image(tmp_path / "sub" / "a.jpg", (64, 64), seed=1)  # same stems: no PNG may overwrite another
    paths = write_attention_maps(backbone, [a, b, c], tmp_path / "out", image_size=0)
    folder = tmp_path.name
    assert [p.name for p in paths] == [f"{folder}_a_attention.png", f"{folder}_a-1_attention.png",
                                       "sub_a_attention.png"]
    for p in paths:
        assert p.stat().st_size > 1000
        with Image.open(p) as png:
            assert png.format == "PNG" and png.width > png.height  # 2 rows of 1 + 3 heads + 1 mean
    x = _TO_INPUT(crop_to_patches(Image.open(a).convert("RGB"), 8))
    assert x.shape == (3, 32, 40)


def _fastdino_checkpoint(path):
    cfg = load_config(None, ["model.arch=vit_tiny", "model.depth=2", "model.patch_size=8", "model.img_size=32",
                             "dino.out_dim=32", "dino.hidden_dim=16", "dino.bottleneck_dim=8"])
    method = build_method(cfg, torch.device("cpu"))
    save_checkpoint({"config": config_to_dict(cfg), "teacher": method.teacher.state_dict()}, path)
    return method.teacher.backbone


def test_cli_attention_writes_png_and_refuses_bad_input(tmp_path, capsys):
    backbone = _fastdino_checkpoint(tmp_path / "last.pt")
    img = _image(tmp_path / "x.png", (48, 40))
    rc = main(["attention", str(img), "--checkpoint", str(tmp_path / "last.pt"), "--out", str(tmp_path / "o"),
               "--image-size", "0"])
    assert rc == 0 and (tmp_path / "o" / "x_attention.png").stat().st_size > 1000
    assert "x_attention.png" in capsys.readouterr().out
    maps = class_attention_maps(backbone.eval(), _TO_INPUT(Image.open(img).convert("RGB")))
    assert maps.shape == (3, 5, 6)

    def one_line_error(argv, *words):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and all(w in err for w in words), err

    one_line_error(["attention", str(tmp_path / "nope.png"), "--checkpoint", str(tmp_path / "missing.pt")],
                   "nope.png", "does not exist")
    one_line_error(["attention", str(img), "--checkpoint", str(tmp_path / "missing.pt")], "missing.pt")
    torch.save({"model": {}}, tmp_path / "official.pth")
    one_line_error(["attention", str(img), "--checkpoint", str(tmp_path / "official.pth"), "--arch", "vit_small"],
                   "official.pth", "no ViT state dict")
    one_line_error(["attention", str(img), "--checkpoint", str(tmp_path / "last.pt"), "--patch-size", "16"],
                   "--patch-size 16")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    one_line_error(["attention", str(tmp_path / "bad.jpg"), "--checkpoint", str(tmp_path / "last.pt")],
                   "bad.jpg", "unreadable")
    one_line_error(["attention", str(img), "--checkpoint", str(tmp_path / "last.pt"), "--mass", "1.5"], "--mass")


def test_a_wide_strip_is_capped_to_a_patch_count_that_fits(caplog):
    """A 400x16 strip at the default 480 px short side would be 12000x480 px (22,500 patches, ~97 GB of attention
    for ViT-S); it is scaled down to at most MAX_PATCHES patches, aspect kept, with a warning."""
    from fastdino.eval.attention import MAX_PATCHES

    img = crop_to_patches(Image.new("RGB", (400, 16)), 16, 480)
    w, h = img.size
    assert (w // 16) * (h // 16) <= MAX_PATCHES and w % 16 == h % 16 == 0 and abs(w / h - 25) < 2
    assert "would hold 22500 patches" in caplog.text
    assert crop_to_patches(Image.new("RGB", (640, 480)), 16, 480).size == (640, 480)  # within the cap: as before
