"""The data floor: folder index, corrupt-file skipping, multi-crop, per-item determinism, the resumable
sharded sampler and loader, the demo data set."""

import io
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastdino.data.batch import ResumableShardedSampler, build_loader, steps_per_epoch
from fastdino.data.demo import DEMO_CLASSES, make_demo_dataset
from fastdino.data.files import DataError, ImageFileDataset, UnreadableImages, collate_views, index_image_folder
from fastdino.data.multicrop import IMAGENET_MEAN, IMAGENET_STD, eval_transform, multicrop_transform


def _image(seed: int = 0, size: tuple[int, int] = (40, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def _save(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _image(seed).save(path)
    return path


def _truncated_jpeg(path: Path) -> Path:
    buf = io.BytesIO()
    _image(99, (64, 64)).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def _small_folder(root: Path, n: int = 6) -> Path:
    for i in range(n):
        _save(root / ("a" if i % 2 else "b") / f"{i}.png", seed=i)
    return root


def _batches(loader) -> list:
    return [(views, labels) for views, labels, _ in loader]


def _assert_same_batches(got: list, want: list) -> None:
    assert len(got) == len(want)
    for (views_g, labels_g), (views_w, labels_w) in zip(got, want, strict=True):
        assert torch.equal(labels_g, labels_w)
        assert all(torch.equal(g, w) for g, w in zip(views_g, views_w, strict=True))


# --- index ---


def test_index_flat_folder(tmp_path):
    _save(tmp_path / "b.PNG")
    _save(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    _save(tmp_path / "._a.jpg")  # hidden: macOS resource forks are garbage with an image suffix
    index = index_image_folder(tmp_path)
    assert index.paths == [str(tmp_path / "a.jpg"), str(tmp_path / "b.PNG")]
    assert index.labels == [0, 0]
    assert index.classes == ["."]


def test_index_class_folders_recursive_and_sorted(tmp_path, caplog):
    _save(tmp_path / "dogs" / "x" / "2.webp")
    _save(tmp_path / "dogs" / "1.jpeg")
    _save(tmp_path / "cats" / "3.bmp")
    (tmp_path / "empty").mkdir()
    _save(tmp_path / "stray.jpg")
    index = index_image_folder(tmp_path)
    assert index.classes == ["cats", "dogs"]
    assert index.paths == [str(tmp_path / p) for p in ("cats/3.bmp", "dogs/1.jpeg", "dogs/x/2.webp")]
    assert index.labels == [0, 1, 1]
    assert str(tmp_path) in caplog.text and "ignoring 1 image" in caplog.text


def test_index_with_given_classes_shares_the_label_space(tmp_path):
    _save(tmp_path / "val" / "dogs" / "1.jpg")
    index = index_image_folder(tmp_path / "val", classes=["cats", "dogs"])
    assert index.labels == [1] and index.classes == ["cats", "dogs"]
    _save(tmp_path / "val" / "birds" / "1.jpg")
    with pytest.raises(DataError, match="birds"):
        index_image_folder(tmp_path / "val", classes=["cats", "dogs"])


@pytest.mark.parametrize("case", ["missing", "file", "empty", "no_images"])
def test_index_errors_name_the_path(tmp_path, case):
    root = tmp_path / "data"
    if case == "file":
        root.write_text("x")
    elif case == "empty":
        root.mkdir()
    elif case == "no_images":
        (root / "sub").mkdir(parents=True)
        (root / "sub" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=re.escape(str(root))):
        index_image_folder(root)


# --- corrupt files ---


def test_bad_files_are_substituted_and_reported_once_per_path(tmp_path, caplog):
    _save(tmp_path / "a" / "0.jpg")
    truncated = _truncated_jpeg(tmp_path / "a" / "1.jpg")
    garbage = tmp_path / "a" / "2.jpg"
    garbage.write_bytes(b"definitely not a jpeg" * 10)
    _save(tmp_path / "b" / "0.jpg", seed=1)
    _save(tmp_path / "b" / "1.jpg", seed=2)
    dataset = ImageFileDataset(index_image_folder(tmp_path), eval_transform(16))

    views, label, bad = dataset[1]  # a/1 and a/2 are bad: b/0 stands in
    assert label == 1 and [path for path, _ in bad] == [str(truncated), str(garbage)]
    assert views[0].shape == (3, 16, 16)
    assert dataset[2][1] == 1 and [path for path, _ in dataset[2][2]] == [str(garbage)]  # known bad: not re-read
    assert not caplog.records  # the dataset does not log: the main process's record does

    record = UnreadableImages()
    for _ in range(2):  # two epochs
        views, labels, bad = next(iter(build_loader(dataset, batch_size=5, num_workers=0, seed=0, epoch=0)))
        assert views[0].shape == (5, 3, 16, 16) and labels.shape == (5,)
        assert sorted(path for path, _ in bad) == sorted([str(truncated), str(garbage), str(garbage)])
        record.add(bad)
    assert len(record) == 2 and record.state() == sorted([str(truncated), str(garbage)])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "fastdino.data"]
    assert sum(str(truncated) in w for w in warnings) == 1 and sum(str(garbage) in w for w in warnings) == 1


def test_processes_exchange_only_unreadable_files_new_since_the_last_merge_and_a_resume_keeps_them_all(caplog):
    """What Trainer.save gathers: each process's `news()`; after `merge` every record is the union, and the next
    exchange sends only what was met since; a record rebuilt from a checkpoint sends none of it again."""

    def save(records):  # an all_gather_object of each process's news, then merged on every process
        sent = [record.news() for record in records]
        for record in records:
            record.merge([list(paths) for paths in sent])
        return sent

    ranks = [UnreadableImages(), UnreadableImages()]
    ranks[0].add([("a", "bad")])
    ranks[1].add([("b", "bad"), ("a", "bad")])
    assert save(ranks) == [["a"], ["a", "b"]] and [r.state() for r in ranks] == [["a", "b"]] * 2
    ranks[1].add([("a", "again"), ("c", "bad")])  # "a" is known: not news
    assert save(ranks) == [[], ["c"]] and [r.state() for r in ranks] == [["a", "b", "c"]] * 2
    assert save(ranks) == [[], []]

    caplog.clear()
    resumed = [UnreadableImages.from_state(ranks[0].state()) for _ in range(2)]  # every process loads last.pt
    resumed[0].add([("b", "bad")])  # met again after the resume: neither warned nor sent
    resumed[1].add([("d", "bad")])
    assert save(resumed) == [[], ["d"]] and [r.state() for r in resumed] == [["a", "b", "c", "d"]] * 2
    assert [r.getMessage() for r in caplog.records] == ["unreadable image d (skipped): bad"]


def test_only_bad_files_raise(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(b"garbage")
    dataset = ImageFileDataset(index_image_folder(tmp_path), eval_transform(16))
    with pytest.raises(DataError, match="no readable image"):
        dataset[0]


# --- multi-crop ---


def test_multicrop_counts_shapes_and_normalisation():
    views = multicrop_transform(global_size=32, local_size=16, n_local=3)(_image(size=(48, 40)))
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for v in views:
        assert v.dtype == torch.float32 and type(v) is torch.Tensor
        pixels = v * std + mean
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert len(multicrop_transform(32, 16, n_local=0)(_image())) == 2
    with pytest.raises(ValueError, match="local_scale"):
        multicrop_transform(local_scale=(0.5, 0.4))


def test_eval_transform_normalises_to_imagenet_statistics():
    x = eval_transform(24)(_image(size=(64, 48)))  # uniform noise: mean 0.5 per channel
    assert x.shape == (3, 24, 24)
    expected = (0.5 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x.mean(dim=(1, 2)), expected, atol=0.1, rtol=0)


# --- determinism ---


def test_views_depend_only_on_seed_epoch_and_index(tmp_path):
    _save(tmp_path / "0.png")
    dataset = ImageFileDataset(index_image_folder(tmp_path), multicrop_transform(32, 16, 2), seed=5)
    first = dataset[0][0]
    torch.manual_seed(1234)
    random.seed(1234)
    again = dataset[0][0]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0][0][0], first[0])
    other_seed = ImageFileDataset(dataset.index, dataset.transform, seed=6)
    assert not torch.equal(other_seed[0][0][0], first[0])


def test_in_process_loading_leaves_global_rng_untouched(tmp_path):
    dataset = ImageFileDataset(index_image_folder(_small_folder(tmp_path)), multicrop_transform(16, 8, 2))
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    assert len(_batches(build_loader(dataset, batch_size=2, num_workers=0, seed=0, epoch=3))) == 3
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == python_state


def test_workers_give_the_batches_of_in_process_loading_and_resume_matches(tmp_path):
    dataset = ImageFileDataset(index_image_folder(_small_folder(tmp_path)), multicrop_transform(16, 8, 2))
    in_process = _batches(build_loader(dataset, batch_size=2, num_workers=0, seed=7, epoch=1))
    _assert_same_batches(_batches(build_loader(dataset, batch_size=2, num_workers=2, seed=7, epoch=1)), in_process)
    resumed = _batches(build_loader(dataset, batch_size=2, num_workers=0, seed=7, epoch=1, start_step=1))
    _assert_same_batches(resumed, in_process[1:])


def test_collate_stacks_crop_by_crop_and_drops_skipped_items():
    item = ([torch.zeros(3, 4, 4), torch.ones(3, 2, 2)], 3, (("x.jpg", "bad"),))
    skipped = (None, 5, (("y.jpg", "worse"),))
    views, labels, bad = collate_views([item, skipped, item])
    assert [tuple(v.shape) for v in views] == [(2, 3, 4, 4), (2, 3, 2, 2)]
    assert labels.tolist() == [3, 3] and labels.dtype == torch.int64
    assert bad == [("x.jpg", "bad"), ("y.jpg", "worse"), ("x.jpg", "bad")]
    views, labels, bad = collate_views([skipped])
    assert views == [] and labels.shape == (0,) and bad == [("y.jpg", "worse")]


# --- sampler ---


def test_sampler_is_deterministic_and_changes_with_epoch():
    order = list(ResumableShardedSampler(23, 4, seed=1, epoch=0))
    assert order == list(ResumableShardedSampler(23, 4, seed=1, epoch=0))
    assert order != list(ResumableShardedSampler(23, 4, seed=1, epoch=1))
    assert list(ResumableShardedSampler(5, 2, seed=1, epoch=0, shuffle=False, drop_last=False)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("drop_last", [True, False])
def test_shards_are_disjoint_and_cover_the_epoch(drop_last):
    n, batch, world = 23, 2, 3
    shards = [
        list(ResumableShardedSampler(n, batch, 0, 0, rank=r, world_size=world, drop_last=drop_last)) for r in range(3)
    ]
    steps = steps_per_epoch(n, batch, world, drop_last)
    assert {len(s) for s in shards} == {8 if not drop_last else steps * batch}
    flat = [i for s in shards for i in s]
    if drop_last:
        assert len(set(flat)) == len(flat) == world * steps * batch  # disjoint, whole global batches only
    else:
        assert set(flat) == set(range(n)) and len(flat) == 24  # covering, one index repeated as padding


@pytest.mark.parametrize("drop_last", [True, False])
def test_start_step_skips_to_the_tail_of_the_epoch(drop_last):
    for rank in range(2):
        full = list(ResumableShardedSampler(29, 3, 4, 2, rank=rank, world_size=2, drop_last=drop_last))
        for start in range(steps_per_epoch(29, 3, 2, drop_last) + 1):
            tail = ResumableShardedSampler(29, 3, 4, 2, start, rank=rank, world_size=2, drop_last=drop_last)
            assert list(tail) == full[start * 3 :] and len(tail) == len(full[start * 3 :])
    with pytest.raises(ValueError, match="start_step"):
        ResumableShardedSampler(29, 3, 4, 2, start_step=5, world_size=2)


@pytest.mark.parametrize(("n", "batch", "world", "drop_last"), [(10, 3, 1, True), (10, 3, 1, False), (11, 2, 2, False)])
def test_steps_per_epoch_matches_the_loader(tmp_path, n, batch, world, drop_last):
    dataset = ImageFileDataset(index_image_folder(_small_folder(tmp_path, n)), eval_transform(8))
    for rank in range(world):
        loader = build_loader(dataset, batch, 0, seed=0, epoch=0, rank=rank, world_size=world, drop_last=drop_last)
        assert len(loader) == len(list(loader)) == steps_per_epoch(n, batch, world, drop_last)


def test_loader_refuses_an_epoch_without_a_batch(tmp_path):
    dataset = ImageFileDataset(index_image_folder(_small_folder(tmp_path, 3)), eval_transform(8))
    with pytest.raises(DataError, match="one global batch"):
        build_loader(dataset, batch_size=4, num_workers=0, seed=0, epoch=0)


# --- demo data set ---


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def test_demo_dataset_is_deterministic_balanced_and_decodes(tmp_path):
    a = make_demo_dataset(tmp_path / "a", n_train_per_class=3, n_val_per_class=2, size=32, seed=3)
    b = make_demo_dataset(tmp_path / "b", n_train_per_class=3, n_val_per_class=2, size=32, seed=3)
    assert _tree(a) == _tree(b) and len(_tree(a)) == 5 * len(DEMO_CLASSES)
    assert _tree(make_demo_dataset(tmp_path / "c", 3, 2, size=32, seed=4)) != _tree(a)
    for split, n in (("train", 3), ("val", 2)):
        index = index_image_folder(a / split)
        assert index.classes == list(DEMO_CLASSES)
        assert np.bincount(index.labels).tolist() == [n] * len(DEMO_CLASSES)
        for path in index.paths:
            with Image.open(path) as img:
                img.load()
                assert img.mode == "RGB" and img.size == (32, 32)


def test_demo_dataset_is_idempotent_and_regenerates_when_needed(tmp_path):
    root = make_demo_dataset(tmp_path, n_train_per_class=2, n_val_per_class=1, size=32)
    first = tmp_path / "train" / DEMO_CLASSES[0] / "0000.jpg"
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*.jpg")}
    before = _tree(root)
    make_demo_dataset(tmp_path, n_train_per_class=2, n_val_per_class=1, size=32)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.jpg")} == stamps  # nothing rewritten

    first.unlink()
    make_demo_dataset(tmp_path, n_train_per_class=2, n_val_per_class=1, size=32)
    assert _tree(root) == before

    make_demo_dataset(tmp_path, n_train_per_class=3, n_val_per_class=1, size=32)
    grown = _tree(root)
    assert len(grown) == len(before) + len(DEMO_CLASSES)
    assert all(grown[name] == data for name, data in before.items())  # growing a count keeps the old images


def test_demo_images_are_grey_two_level_patterns_that_fill_the_image():
    """The design the demo.py docstring argues for: grey, two levels, solarisation-safe, and every crop shows
    the class (each quadrant has the whole image's foreground share); stripes run the way their name says."""
    from fastdino.data.demo import draw_demo_image

    for i, name in enumerate(DEMO_CLASSES):
        img = np.asarray(draw_demo_image(name, 64, np.random.default_rng(i)), dtype=np.float64)
        assert np.abs(img - img.mean(axis=2, keepdims=True)).max() < 20  # grey up to pixel noise
        grey = img.mean(axis=2)
        fg = grey > 96
        pattern, background = grey[grey > 130], grey[grey < 60]  # away from the anti-aliased edges
        assert 0.1 < fg.mean() < 0.6, name
        assert 150 < pattern.mean() < 170 and 22 < background.mean() < 38, name
        assert 255 - pattern.mean() > background.mean() + 40, name  # solarised, the pattern still stands out
        quadrants = [fg[r:r + 32, c:c + 32].mean() for r in (0, 32) for c in (0, 32)]
        assert max(abs(q - fg.mean()) for q in quadrants) < 0.15, (name, quadrants)
        along_rows, along_cols = grey.std(axis=1).mean(), grey.std(axis=0).mean()
        if name == "hstripes":
            assert along_rows < 0.5 * along_cols
        elif name == "vstripes":
            assert along_cols < 0.5 * along_rows
        else:
            assert 0.5 < along_rows / along_cols < 2.0, name
    with pytest.raises(ValueError, match="unknown demo class 'circle'"):
        draw_demo_image("circle", 64, np.random.default_rng(0))


def test_colour_strength_and_blur_sigma_reach_every_crop():
    from torchvision.transforms import v2

    from fastdino.data.multicrop import RandomGaussianBlur

    crops = multicrop_transform(32, 24, 2, color_strength=2.0, blur_sigma=(0.05, 0.4))
    for pipeline in (crops.global1, crops.global2, crops.local):
        jitters = [t for r in pipeline.transforms if isinstance(r, v2.RandomApply) for t in r.transforms
                   if isinstance(t, v2.ColorJitter)]
        blurs = [t for r in pipeline.transforms if isinstance(r, v2.RandomApply) for t in r.transforms
                 if isinstance(t, RandomGaussianBlur)]
        assert jitters[0].brightness == pytest.approx((0.2, 1.8)) and jitters[0].hue == pytest.approx((-0.2, 0.2))
        assert blurs[0].sigma == (0.05, 0.4)
    with pytest.raises(ValueError, match="color_strength"):
        multicrop_transform(32, 24, 2, color_strength=-1.0)
    with pytest.raises(ValueError, match="blur_sigma"):
        multicrop_transform(32, 24, 2, blur_sigma=(0.5, 0.1))
