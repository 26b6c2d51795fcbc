"""Images decoded as a viewer shows them, and unreadable or repeated files handled once (issue 12, section 5).

References are written here from the format definitions (the EXIF orientation table, a linear 16-bit to
8-bit map), not from Pillow's helpers.
"""

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fastdino.cli import main
from fastdino.config import EvalConfig, load_config
from fastdino.data.demo import make_demo_dataset
from fastdino.data.files import (
    IMAGE_EXTENSIONS,
    DataError,
    ImageFileDataset,
    decode_rgb,
    index_image_folder,
)
from fastdino.engine.checkpoint import load_checkpoint
from fastdino.engine.trainer import Trainer, train
from fastdino.eval.attention import read_image
from fastdino.eval.knn import knn_evaluate
from fastdino.eval.linear import ProbeImages

TINY = [
    "model.arch=vit_tiny", "model.depth=2", "model.patch_size=8", "model.img_size=16",
    "dino.out_dim=32", "dino.hidden_dim=16", "dino.bottleneck_dim=8",
    "data.global_size=16", "data.local_size=8", "data.local_crops_number=1", "data.batch_size=4",
    "data.num_workers=0", "optim.warmup_epochs=1", "train.epochs=3", "train.log_every=1", "train.knn_eval=false",
    "health.enabled=false",
]


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float64)


def _keep_image(img: Image.Image) -> list[torch.Tensor]:
    """A dataset transform that hands the decoded image back unchanged, as a (H, W, 3) uint8 tensor."""
    return [torch.from_numpy(np.array(img))]


# --- EXIF orientation ---


def _stored_for_orientation(upright: np.ndarray, orientation: int) -> np.ndarray:
    """The pixel array a camera stores for `upright` (H, W, 3) under EXIF tag 0x0112 = `orientation`.

    The EXIF 2.32 table says where the stored 0th row and 0th column appear when viewed; from it,
    stored[r, c] = upright[row(r, c), col(r, c)].
    """
    h, w = upright.shape[:2]
    transposed = orientation >= 5
    r, c = np.indices((w, h) if transposed else (h, w))
    row, col = {
        1: (r, c),                  # 0th row top, 0th column left
        2: (r, w - 1 - c),          # top, right
        3: (h - 1 - r, w - 1 - c),  # bottom, right
        4: (h - 1 - r, c),          # bottom, left
        5: (c, r),                  # 0th row left, 0th column top
        6: (c, w - 1 - r),          # right, top
        7: (h - 1 - c, w - 1 - r),  # right, bottom
        8: (h - 1 - c, r),          # left, bottom
    }[orientation]
    return upright[row, col]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_the_upright_image_before_cropping(tmp_path, orientation):
    blocks = np.random.default_rng(orientation).integers(0, 256, size=(3, 5, 3))  # 8 px blocks, 40 x 24 upright
    upright = np.kron(blocks, np.ones((8, 8, 1))).astype(np.uint8)  # (24, 40, 3)
    stored = _stored_for_orientation(upright, orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.jpg"
    Image.fromarray(stored).save(path, quality=95, subsampling=0, exif=exif.tobytes())

    dataset = ImageFileDataset(index_image_folder(tmp_path), _keep_image)
    probe = ProbeImages(index_image_folder(tmp_path), _keep_image)  # linear probe
    for decoded in (dataset[0][0][0], probe[0][0][0], _keep_image(read_image(path))[0]):  # + attention maps
        decoded = decoded.numpy().astype(np.float64)  # what the crops are taken from
        assert decoded.shape == upright.shape
        centres = decoded[4::8, 4::8]  # one pixel per block, away from JPEG's block edges
        assert np.abs(centres - blocks).max() <= 8
    if orientation != 1:  # the test can fail: the stored pixels read as they lie are not the upright image
        assert stored.shape != upright.shape or np.abs(stored[4::8, 4::8] - blocks).max() > 8


# --- 16-bit and float samples ---


def _png_16bit(path: Path, samples: np.ndarray) -> Path:
    """A 16-bit PNG written from the PNG specification: (H, W) greyscale or (H, W, 3) RGB uint16 samples."""
    h, w = samples.shape[:2]
    color_type = 2 if samples.ndim == 3 else 0
    rows = samples.reshape(h, -1).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every scanline

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def test_16_bit_grey_png_maps_the_full_range_linearly(tmp_path):
    samples = np.array([[0, 257, 32768, 65535], [1000, 12345, 50000, 65534]], dtype=np.uint16)
    img = decode_rgb(str(_png_16bit(tmp_path / "g.png", samples)))
    out = _pixels(img)
    assert img.mode == "RGB" and out.shape == (2, 4, 3)
    assert np.array_equal(out[..., 0], out[..., 2])
    want = samples.astype(np.float64) * 255 / 65535
    assert np.abs(out[..., 0] - want).max() <= 0.5 + 1e-9  # rounded, never clipped
    assert out[0].tolist() == [[0] * 3, [1] * 3, [128] * 3, [255] * 3]
    assert (out[..., 0] == 255).sum() == 2  # only 65534 and 65535 (Pillow's own conversion made 6 of 8 white)


def test_16_bit_rgb_png_is_linear_not_clipped(tmp_path):
    samples = np.array([[[0, 32768, 65535], [1000, 20000, 40000]]], dtype=np.uint16)
    out = _pixels(decode_rgb(str(_png_16bit(tmp_path / "rgb.png", samples))))
    assert out.shape == (1, 2, 3)
    assert np.abs(out - samples.astype(np.float64) * 255 / 65535).max() <= 1.0
    assert abs(out[0, 0, 1] - 128) <= 1


def test_integer_and_float_tiffs_scale_by_their_range(tmp_path):
    in_16_bit = np.array([[0, 32768, 65535]], dtype=np.int32)  # a 32-bit "I" image holding 16-bit data
    Image.fromarray(in_16_bit).save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    assert _pixels(decode_rgb(str(tmp_path / "i.tif")))[0, :, 0].tolist() == [0, 128, 255]

    wide = np.array([[-100, 0, 99_900]], dtype=np.int32)  # beyond 16 bits: its own min..max
    Image.fromarray(wide).save(tmp_path / "wide.tif")
    want = (wide[0] + 100) * 255 / 100_000
    assert np.abs(_pixels(decode_rgb(str(tmp_path / "wide.tif")))[0, :, 0] - want).max() <= 0.5

    values = np.array([[-1.0, 0.0, 0.5, 3.0, np.nan]], dtype=np.float32)
    Image.fromarray(values).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    out = _pixels(decode_rgb(str(tmp_path / "f.tif")))[0, :, 0]
    want = (np.array([-1.0, 0.0, 0.5, 3.0]) + 1) * 255 / 4  # finite min..max -> 0..255
    assert np.abs(out[:4] - want).max() <= 0.5 and out[4] == 0  # NaN -> the low end


# --- formats ---


def test_every_still_image_format_is_indexed_and_decoded(tmp_path):
    assert {".tif", ".tiff", ".jpg", ".png", ".webp", ".bmp", ".gif", ".jp2", ".ppm"} <= IMAGE_EXTENSIONS
    assert not {".pdf", ".eps", ".ps", ".mpg", ".h5", ".txt"} & IMAGE_EXTENSIONS
    grey16 = np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000
    Image.fromarray(grey16).save(tmp_path / "micro.tif")
    Image.fromarray(np.full((3, 4, 3), 200, np.uint8)).save(tmp_path / "rgb.TIFF")
    frames = [Image.new("RGB", (4, 3), (v, 0, 0)) for v in (10, 250)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    (tmp_path / "stack.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.4")

    index = index_image_folder(tmp_path)
    assert [Path(p).name for p in index.paths] == ["anim.gif", "micro.tif", "rgb.TIFF"]  # an animation is one image
    dataset = ImageFileDataset(index, _keep_image)
    anim, micro, rgb = (dataset[i][0][0].numpy() for i in range(3))
    assert anim.shape == (3, 4, 3) and abs(int(anim[0, 0, 0]) - 10) <= 2  # the first frame
    assert np.abs(micro[..., 1] - grey16.astype(np.float64) * 255 / 65535).max() <= 0.5
    assert (rgb == 200).all()
    assert all(dataset[i][2] == () for i in range(3))


# --- symlinks ---


def test_symlinks_are_followed_without_loops_or_repeats(tmp_path, caplog):
    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    for rel in ("a/0.png", "a/1.png", "a/sub/2.png", "b/x.png", "elsewhere/3.png"):
        path = tmp_path / ("" if rel.startswith("elsewhere") else "data") / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(path)
    os.symlink(root / "a", root / "a" / "sub" / "up")  # back to its parent: a loop
    os.symlink(root, root / "a" / "to_root")  # to the data root
    os.symlink(root / "b", root / "a" / "to_b")  # into another class: its images stay in b
    os.symlink(root / "b" / "x.png", root / "b" / "l1.png")  # two more paths to one file
    os.symlink("../b/x.png", root / "b" / "l2.png")
    os.symlink(elsewhere, root / "c")  # a class folder that is a link: followed

    index = index_image_folder(root)
    assert index.classes == ["a", "b", "c"]
    assert index.paths == [str(root / p) for p in ("a/0.png", "a/1.png", "a/sub/2.png", "b/l1.png", "c/3.png")]
    assert index.labels == [0, 0, 0, 1, 2]
    assert len({os.path.realpath(p) for p in index.paths}) == 5  # each real file once
    assert "2 path(s) lead to files already indexed" in caplog.text


# --- evaluation skips, training substitutes ---


def _warnings_about(caplog, path: Path) -> int:
    return sum(str(path) in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def _colour_folder(root: Path, images: dict[str, list[tuple[int, int, int] | None]]) -> Path:
    """root/<class>/<i>.png filled with one colour each; None writes a corrupt file."""
    for name, colours in images.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, colour in enumerate(colours):
            path = root / name / f"{i}.png"
            if colour is None:
                path.write_bytes(b"not a png")
            else:
                Image.new("RGB", (24, 24), colour).save(path)
    return root


RED, BLUE = (220, 20, 20), (20, 20, 220)


def test_knn_skips_an_unreadable_image_instead_of_scoring_a_substitute(tmp_path, caplog):
    train_dir = _colour_folder(tmp_path / "train", {"blue": [BLUE] * 3, "red": [RED] * 3})
    # val/blue/0 is corrupt; red/2 is blue, so it is the one query scored wrong: 3 of 4 right = 75%.
    # Substituting blue/1 for blue/0 would score 5 queries, 4 right (80%).
    val_dir = _colour_folder(tmp_path / "val", {"blue": [None, BLUE], "red": [RED, RED, BLUE]})
    mean_colour = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (B, 3): separates the two colours
    result = knn_evaluate(mean_colour, train_dir, val_dir, 16, EvalConfig(knn_k=3, batch_size=2),
                          torch.device("cpu"))
    assert (result.top1, result.n_train, result.n_val, result.skipped_images) == (75.0, 6, 4, 1)
    assert _warnings_about(caplog, val_dir / "blue" / "0.png") == 1

    train = ImageFileDataset(index_image_folder(val_dir), _keep_image)  # training mode still substitutes
    assert train[0][1] == 0 and train[0][0] is not None and len(train[0][2]) == 1

    for path in (val_dir / "blue" / "1.png", *(val_dir / "red").iterdir()):
        path.write_bytes(b"broken")
    with pytest.raises(DataError, match=f"{val_dir}.*no readable image"):
        knn_evaluate(mean_colour, train_dir, val_dir, 16, EvalConfig(), torch.device("cpu"))


@pytest.fixture(scope="module")
def demo_train(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train_per_class=2, n_val_per_class=1, size=32)


def _with_corrupt_file(demo_root: Path, into: Path, n_per_class: int = 2) -> tuple[Path, Path]:
    """The first `n_per_class` training images of each demo class, one of them truncated."""
    for path in sorted((demo_root / "train").rglob("*.jpg")):
        if int(path.stem) < n_per_class:
            (into / path.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, into / path.parent.name / path.name)
    victim = sorted(into.rglob("*.jpg"))[3]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    return into, victim


def test_cli_knn_prints_the_skipped_count(demo_train, tmp_path, capsys):
    val, _ = _with_corrupt_file(demo_train, tmp_path / "val")
    cfg = load_config(None, TINY + [f"data.path={demo_train}", f"train.output_dir={tmp_path / 'run'}"])
    Trainer(cfg).save()  # a step-0 checkpoint is enough to evaluate
    rc = main(["knn", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--train", str(demo_train / "train"),
               "--val", str(val), "--num-workers", "0"])
    out = capsys.readouterr().out
    assert rc == 0 and "of 11 images" in out and "skipped 1 unreadable images" in out


def test_a_bad_file_is_warned_once_and_counted_once_per_run_and_across_a_resume(demo_train, tmp_path, caplog):
    data, victim = _with_corrupt_file(demo_train, tmp_path / "data", n_per_class=1)  # 6 images

    def cfg(out, *extra):
        return load_config(None, TINY + [f"data.path={data}", f"train.output_dir={out}", "data.batch_size=3", *extra])

    result = train(cfg(tmp_path / "once", "data.num_workers=2"))  # 3 epochs, workers rebuilt each epoch
    assert result.steps_done == 6 and result.skipped_images == 1
    assert _warnings_about(caplog, victim) == 2  # when first met, and in the end-of-run summary
    lines = [json.loads(x) for x in (tmp_path / "once" / "metrics.jsonl").read_text().splitlines()]
    assert {x["skipped_images"] for x in lines[2:]} == {1}  # one file, met in every epoch
    assert load_checkpoint(tmp_path / "once" / "last.pt")["skipped_images"] == [str(victim)]

    train(cfg(tmp_path / "twice", "train.max_steps=2"))  # the whole first epoch: the file is met
    older = load_checkpoint(tmp_path / "twice" / "last.pt")
    assert older["step"] == 2 and older["skipped_images"] == [str(victim)]
    caplog.clear()
    result = train(cfg(tmp_path / "twice"))  # resumed: the file is known from the checkpoint
    assert result.skipped_images == 1 and _warnings_about(caplog, victim) == 1  # the summary only

    older["skipped_images"] = 7  # checkpoints before the paths were kept: an int counting substitutions
    torch.save(older, tmp_path / "older.pt")
    trainer = Trainer(cfg(tmp_path / "older", f"train.resume={tmp_path / 'older.pt'}"))
    assert trainer.step == 2 and len(trainer.unreadable) == 0  # loads; its files are counted again when met


def test_transparent_pixels_are_composited_onto_white(tmp_path):
    """Two PNGs that look the same (fully transparent, different hidden colours) decode the same; half-transparent
    black is mid grey on white; a palette's transparent colour is white too."""
    for name, colour in (("a", (10, 200, 30, 0)), ("b", (200, 10, 130, 0)), ("half", (0, 0, 0, 128))):
        Image.new("RGBA", (4, 4), colour).save(tmp_path / f"{name}.png")
    a, b, half = (np.asarray(decode_rgb(str(tmp_path / f"{n}.png"))) for n in ("a", "b", "half"))
    assert (a == 255).all() and (b == 255).all() and (half == 127).all()
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 9, 9, 9] + [0] * 762)
    palette.putpixel((0, 0), 1)
    palette.save(tmp_path / "p.png", transparency=1)
    assert np.asarray(decode_rgb(str(tmp_path / "p.png"))).tolist() == [[[255, 255, 255], [0, 0, 0]]]
    la = Image.new("LA", (2, 2), (40, 0))
    la.save(tmp_path / "la.png")
    assert (np.asarray(decode_rgb(str(tmp_path / "la.png"))) == 255).all()
