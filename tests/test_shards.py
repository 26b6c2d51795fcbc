"""WebDataset tar shards (fastdino/data/shards.py, issue 24): a folder and the shards `fastdino shards` makes of it
give the same index, the same batches step for step on every backend (from step 0 and from a mid-epoch resume)
and the same fingerprint; a 2-process run on shards resumes bitwise after a kill; the index cache rebuilds when
a shard changes; damaged data is reported in one line naming shard:key, and nothing else is lost."""

import contextlib
import gzip
import io
import json
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from index_build_child import built_once
from PIL import Image
from same_run import assert_same_state

from fastdino.cli import main
from fastdino.data import shards as sh
from fastdino.data import tarscan
from fastdino.data.batch import CpuBatches
from fastdino.data.files import DataError, ImageFileDataset, ImageIndex, UnreadableImages, index_image_folder
from fastdino.data.gpu_augment import TorchGpuBatches
from fastdino.data.loader import dali_available
from fastdino.data.multicrop import multicrop_transform
from fastdino.engine.checkpoint import load_checkpoint
from fastdino.engine.resume import index_fingerprint
from fastdino.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
# Names whose sort order differs between naive key orders and the folder's: '-' < '.' < '/' < '_' in ASCII, a
# dot inside a name, a sub-folder beside a file of a similar name, '%' (the key's escape), a space in a class.
NAMES = ["a/x.jpg", "a/x-1.jpg", "a/x.v2.jpg", "a/sub/y.jpg", "a/sub-z.png", "a/50%.jpg", "a b/p.jpg",
         "a b/q.jpg", "b/0.jpg", "b/deep/er/1.png", "b/_2.jpg", "b/2.jpg"]


def _photo(i: int, width: int = 40, height: int = 32) -> Image.Image:
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * xx / width, 255 * yy / height, 127.5 + 100 * np.sin(xx / 5 + yy / 7 + i)], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def _image_tree(root: Path, names=NAMES, corrupt: str | None = None) -> Path:
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        _photo(i, 40 + 2 * i, 32 + i).save(path, quality=90) if name.endswith(".jpg") else _photo(i).save(path)
    if corrupt:
        (root / corrupt).write_bytes(b"\xff\xd8 not a jpeg")
    return root


def _shards(src: Path, out: Path, **kw) -> Path:
    sh.write_shards(src, out, shard_size=kw.pop("shard_size", 12_000), progress=False, **kw)
    return out


def _backdate(*paths, seconds=60):
    """Shards and folders changed within 2 s of indexing are never cached (their mtime may not move again)."""
    past = time.time() - seconds
    for path in paths:
        os.utime(path, (past, past))


def _same_index(a, b, root_a, root_b):
    assert (a.labels, a.classes) == (b.labels, b.classes)
    assert list(a.image_ids(root_a)) == list(b.image_ids(root_b))
    assert all(a.read(j) == b.read(j) for j in range(len(a)))


def test_shards_index_as_the_folder_does_whatever_order_the_shards_hold(tmp_path):
    src = _image_tree(tmp_path / "images")
    folder = index_image_folder(src)
    for seed in (0, 1):
        out = _shards(src, tmp_path / f"shards{seed}", seed=seed)
        assert len(list(out.glob("*.tar"))) >= 3
        index = sh.index_images(out)
        _same_index(folder, index, src, out)
        assert index_fingerprint(folder, src) == index_fingerprint(index, out)
        assert json.loads((out / "classes.json").read_text()) == folder.classes == ["a", "a b", "b"]
    held = [[m.name for m in tarfile.open(p)] for p in sorted((tmp_path / "shards0").glob("*.tar"))]
    assert held != [[m.name for m in tarfile.open(p)] for p in sorted((tmp_path / "shards1").glob("*.tar"))]
    assert sum(len(h) for h in held) == 2 * len(NAMES)  # every image with its .cls
    assert any(len({n.split("/")[0] for n in h}) > 1 for h in held)  # the shuffle mixes classes in a shard
    # the other ways to name the same shards
    tars = sorted(str(p) for p in (tmp_path / "shards0").glob("*.tar"))
    (tmp_path / "list.txt").write_text("# shards\n" + "\n".join(os.path.relpath(t, tmp_path) for t in tars) + "\n")
    pattern = str(tmp_path / "shards0" / f"shard-{{000000..{len(tars) - 1:06d}}}.tar")
    for spec in (tmp_path / "list.txt", pattern):
        other = sh.index_images(spec)
        assert list(other.image_ids(spec)) == list(folder.image_ids(src)) and other.labels == folder.labels


def test_keys_escape_dots_and_decode_back():
    for rel in ("a/x.v2.JPEG", "50%.jpg", "d.ir/%2E.png"):
        key = sh.encode_key(rel)
        assert "." not in key.rsplit("/", 1)[-1] and sh.decode_key(key) == rel
    assert sh.expand_braces("s-{08..10}-{a,b}.tar") == ["s-08-a.tar", "s-08-b.tar", "s-09-a.tar", "s-09-b.tar",
                                                        "s-10-a.tar", "s-10-b.tar"]


def _batches(source, epoch, start_step=0):
    batches = [([v.clone() for v in views], labels.clone(), bad)
               for views, labels, bad in source.epoch(epoch, start_step)]
    assert not [why for *_, bad in batches for _, why in bad if "object at 0x" in why]  # named by the image, not memory
    return [(views, labels, sorted(p for p, _ in bad)) for views, labels, bad in batches]


def _same_batches_skipping(folder, shards) -> tuple[set[str], set[str]]:
    """An epoch of cpu batches from the folder index and from the shards' is equal, step for step; returns the
    images each skipped as unreadable: (folder paths, shard keys)."""
    runs = []
    for index in (folder, shards):
        dataset = ImageFileDataset(index, multicrop_transform(32, 16, 2, blur_sigma=(0.1, 0.5)), seed=5)
        runs.append(_batches(CpuBatches(dataset, batch_size=4, num_workers=0, seed=5), 0))
    _equal(*runs)
    return ({name for _, _, bad in runs[0] for name in bad},
            {name.rsplit(".tar:", 1)[1] for _, _, bad in runs[1] for name in bad})


def _equal(a, b):
    assert len(a) == len(b)
    for (va, la, _), (vb, lb, _) in zip(a, b, strict=True):
        assert torch.equal(la, lb) and all(torch.equal(x, y) for x, y in zip(va, vb, strict=True))


BACKENDS = ["cpu", "torch_gpu", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(),
                                                                              reason="NVIDIA DALI not installed"))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_folder_and_its_shards_give_the_same_batches_from_step_0_and_from_a_resume(tmp_path, backend, caplog):
    src = _image_tree(tmp_path / "images", corrupt="b/2.jpg")
    out = _shards(src, tmp_path / "shards")
    runs = []
    for index in (index_image_folder(src), sh.index_images(out)):
        dataset = ImageFileDataset(index, multicrop_transform(32, 16, 2, blur_sigma=(0.1, 0.5)), seed=5)
        if backend == "cpu":
            source = CpuBatches(dataset, batch_size=4, num_workers=1, seed=5)
        elif backend == "torch_gpu":
            source = TorchGpuBatches(dataset, batch_size=4, num_workers=1, seed=5, device="cpu")
        else:
            from fastdino.data.dali import DaliBatches

            source = DaliBatches(dataset, batch_size=4, num_workers=0, seed=5, device="cpu", num_threads=1)
        runs.append((_batches(source, 1), _batches(source, 1, start_step=1)))
    (folder, folder_resumed), (shards, shards_resumed) = runs
    assert len(folder) == 3
    _equal(folder, shards)
    _equal(folder[1:], folder_resumed)
    _equal(shards[1:], shards_resumed)
    bad_folder = [name for _, _, bad in folder for name in bad]
    bad_shards = [name for _, _, bad in shards for name in bad]
    assert bad_folder == [str(src / "b" / "2.jpg")]
    (bad,) = bad_shards  # the corrupt member, named shard:key
    assert bad.startswith(str(out / "shard-")) and bad.endswith(".tar:" + sh.encode_key("b/2.jpg"))
    for batches in (folder + folder_resumed, shards + shards_resumed):  # one name however often met: warned once
        record = UnreadableImages()
        with caplog.at_level(logging.WARNING, "fastdino.data"):
            record.add((name, "") for _, _, names in batches for name in names)
        assert len(record) == 1
    assert sum(r.getMessage().startswith("unreadable image") for r in caplog.records) == 2


def test_fastdino_shards_warns_of_each_corrupt_image_keeps_it_and_gives_the_folders_batches(tmp_path, capsys,
                                                                                            caplog):
    """A JPEG cut short, a text file named .jpg, a zero-byte file and a PNG cut short: one warning line each at
    conversion, naming the file; each is kept (the folder's index keeps it too, and training skips it at decode on
    both), so the shards still give the folder's index, fingerprint and batches; a sound image is never named,
    nor one Pillow reads whole (a PNG without its end chunk)."""
    src = _image_tree(tmp_path / "images")
    cut = {"a/x.jpg": 0.6, "b/deep/er/1.png": 0.5}
    for name, keep in cut.items():
        data = (src / name).read_bytes()
        (src / name).write_bytes(data[: int(len(data) * keep)])
    (src / "b/_2.jpg").write_text("not an image, whatever its name")
    (src / "a b/q.jpg").write_bytes(b"")
    data = (src / "a/sub-z.png").read_bytes()
    (src / "a/sub-z.png").write_bytes(data[:-4])  # the end chunk's checksum missing: Pillow decodes it
    corrupt = ["a/x.jpg", "b/deep/er/1.png", "b/_2.jpg", "a b/q.jpg"]
    out = tmp_path / "shards"
    with caplog.at_level(logging.WARNING, "fastdino.data"):
        assert main(["shards", str(src), str(out), "--shard-size", "20KB"]) == 0
    printed = capsys.readouterr().out
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sorted(line.split("corrupt image ")[1].split(" (")[0] for line in warned) == sorted(
        str(src / name) for name in corrupt), warned
    assert all("\n" not in line and "kept in the shards" in line for line in warned)
    reasons = " ".join(warned)
    assert "Truncated" in reasons and "truncated" in reasons and "cannot identify image" in reasons
    assert "empty file (0 bytes)" in reasons
    assert f"wrote {len(NAMES)} images" in printed and "kept 4 corrupt images" in printed
    folder, shards = index_image_folder(src), sh.index_images(out)
    _same_index(folder, shards, src, out)
    assert index_fingerprint(folder, src) == index_fingerprint(shards, out)
    bad_folder, bad_shards = _same_batches_skipping(folder, shards)
    assert bad_folder == {str(src / n) for n in corrupt} and bad_shards == {sh.encode_key(n) for n in corrupt}


def _left_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_an_interrupted_conversion_leaves_nothing_and_a_rerun_publishes_the_whole_set(tmp_path, monkeypatch, capsys,
                                                                                     caplog):
    """Ctrl-C (from the CLI: exit code 130, a line saying nothing was written) or an error once a shard is complete
    leaves neither OUT_DIR nor the partial folder beside it; an empty OUT_DIR is kept empty, then replaced by the
    rerun's whole set (with a plain folder's mode); a partial folder a killed conversion left is named."""
    src = _image_tree(tmp_path / "images")
    real_member, calls = sh._member, []

    def stop_at(exc):
        def member(tar, name, data):
            calls.append(name)
            if len(calls) == 2 * len(NAMES) - 4:  # a few images short of the end: shards written already
                raise exc
            real_member(tar, name, data)
        return member

    out = tmp_path / "out" / "shards"
    monkeypatch.setattr(sh, "_member", stop_at(KeyboardInterrupt()))
    assert main(["shards", str(src), str(out), "--shard-size", "12KB"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "fastdino: interrupted; nothing was written (the shard folder appears only when complete)")
    assert not (tmp_path / "out").exists()  # the folder made to hold OUT_DIR too
    out.mkdir(parents=True)  # an empty OUT_DIR: kept as it is by a failed conversion
    calls.clear()
    monkeypatch.setattr(sh, "_member", stop_at(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space left"):
        _shards(src, out)
    assert _left_in(tmp_path / "out") == ["shards"] and _left_in(out) == []
    monkeypatch.setattr(sh, "_member", real_member)
    (tmp_path / "out" / ".shards.partial-killed").mkdir()  # as a SIGKILL leaves it
    out.chmod(0o2750)  # a shared folder an admin made: its mode (setgid too) and group stay
    with caplog.at_level(logging.WARNING, "fastdino.data"):
        assert main(["shards", str(src), str(out), "--shard-size", "12KB"]) == 0
    (warned,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert f"{tmp_path / 'out' / '.shards.partial-killed'} is left by a conversion to {out}" in warned
    assert _left_in(tmp_path / "out") == [".shards.partial-killed", "shards"]
    assert len(list(out.glob("shard-*.tar"))) >= 3 and not list(out.glob(".*"))
    assert out.stat().st_mode & 0o7777 == 0o2750
    _same_index(index_image_folder(src), sh.index_images(out), src, out)


def test_an_empty_out_dir_that_is_a_mount_point_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """A volume mounted at OUT_DIR: the finished set could not be renamed onto it (EBUSY), after hours of work."""
    src, out = _image_tree(tmp_path / "images"), tmp_path / "volume"
    out.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: os.fspath(p) == str(out) or real(p))
    assert main(["shards", str(src), str(out)]) == 2
    assert capsys.readouterr().err == (f"fastdino: error: {out} is a mount point: the shard set is built beside it and "
                                       "renamed onto it when complete, which Linux refuses there; name a new folder "
                                       f"inside it, e.g. {out / 'shards'}\n")
    assert _left_in(tmp_path) == ["images", "volume"] and _left_in(out) == []


def test_the_interrupted_line_fits_the_command(monkeypatch, capsys):
    """Only the commands that write checkpoints say one is intact; export publishes whole or nothing."""
    import fastdino.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    for name in ("_train", "_export", "_budget"):
        monkeypatch.setattr(cli, name, interrupted)
    for argv, line in ((["train", "c.yaml"], "fastdino: interrupted; the last checkpoint written is intact "
                                              "(train.resume=auto continues from it)"),
                       (["export", "c.pt"], "fastdino: interrupted; nothing was written"),
                       (["budget", "c.yaml", "--gpus", "1"], "fastdino: interrupted")):
        assert main(argv) == 130
        assert capsys.readouterr().err.strip() == line


def test_unreadable_files_are_kept_as_empty_members_with_the_folders_index_and_batches(tmp_path, monkeypatch,
                                                                                      capsys, caplog):
    """A dangling link and a file whose read is refused (PermissionError; tests run as root, whom chmod 000 does
    not stop) are indexed by the folder like any image; the conversion warns naming each and keeps it as an empty
    member under its key, so the shards give the folder's index, fingerprint and batches (training skips both on
    each, one warning a file) and a run moves between the two."""
    src = _image_tree(tmp_path / "images")
    (src / "a" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    denied = str(src / "b" / "0.jpg")
    real_read = ImageIndex.read

    def read(index, j):
        if index.members is None and index.paths[j] == denied:
            raise PermissionError(13, "Permission denied", denied)
        return real_read(index, j)

    monkeypatch.setattr(ImageIndex, "read", read)
    out = tmp_path / "shards"
    with caplog.at_level(logging.WARNING, "fastdino.data"):
        assert main(["shards", str(src), str(out), "--shard-size", "20KB"]) == 0
    monkeypatch.setattr(ImageIndex, "read", real_read)
    warned = sorted(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert [line.split(" (")[0] for line in warned] == [f"cannot read {src / 'a' / 'gone.jpg'}",
                                                        f"cannot read {denied}"]
    assert "No such file or directory" in warned[0] and "Permission denied" in warned[1]
    assert all("kept in the shards as an empty member" in line for line in warned)
    printed = capsys.readouterr().out
    assert f"wrote {len(NAMES) + 1} images" in printed and "kept 2 files that could not be read" in printed
    folder, shards = index_image_folder(src), sh.index_images(out)
    assert len(folder) == len(shards) == len(NAMES) + 1
    assert list(folder.image_ids(src)) == list(shards.image_ids(out)) and folder.labels == shards.labels
    assert index_fingerprint(folder, src) == index_fingerprint(shards, out)
    position = {name: j for j, name in enumerate(folder.image_ids(src))}
    assert shards.read(position["a/gone.jpg"]) == shards.read(position["b/0.jpg"]) == b""
    # training on the folder cannot read b/0.jpg either (as chmod 000 stops another user): a dangling link stands in
    (src / "b" / "0.jpg").unlink()
    (src / "b" / "0.jpg").symlink_to(tmp_path / "nowhere-else.jpg")  # not gone.jpg's: one real file is indexed once
    folder = index_image_folder(src)
    bad_folder, bad_shards = _same_batches_skipping(folder, shards)
    assert bad_folder == {str(src / "a" / "gone.jpg"), denied}
    assert bad_shards == {sh.encode_key("a/gone.jpg"), sh.encode_key("b/0.jpg")}


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), children first."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in map(int, (task / "children").read_text().split()):
                found += [child, *_descendants(child)]
    return found


@pytest.mark.skipif(shutil.which("torchrun") is None or not Path("/proc").is_dir(), reason="torchrun and /proc")
def test_two_processes_on_shards_resume_bitwise_after_a_kill(tmp_path):
    from fastdino.data.demo import make_demo_dataset

    data = make_demo_dataset(tmp_path / "data", n_train_per_class=4, n_val_per_class=1, size=32)  # 24 images
    shards = _shards(data, tmp_path / "shards", shard_size=20_000)
    assert len(list((shards / "train").glob("*.tar"))) > 1
    tiny = ["model.arch=vit_tiny", "model.depth=1", "model.patch_size=8", "model.img_size=16", "dino.out_dim=32",
            "dino.hidden_dim=16", "dino.bottleneck_dim=8", "data.global_size=16", "data.local_size=8",
            "data.local_crops_number=2", "data.num_workers=1", "train.knn_eval=false", "dino.head_bn=false",
            "health.enabled=false", "train.device=cpu", "data.batch_size=2", "train.ckpt_every=1"]
    base = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "fastdino", "train", "configs/demo.yaml", *tiny,
            f"data.path={shards}", "train.epochs=20"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    run = subprocess.Popen([*base, f"train.output_dir={killed}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (killed / "last.pt").is_file() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert run.poll() is None, "the run ended before a checkpoint was written"
    finally:
        for pid in [run.pid, *_descendants(run.pid)]:  # torchrun, both ranks (their own sessions), their workers
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        run.wait()
    saved = load_checkpoint(killed / "last.pt")["step"]
    stop = [f"train.max_steps={saved + 3}"]  # across the epoch boundary when saved is late in epoch 1 (6 steps)
    for out in (killed, tmp_path / "through"):
        done = subprocess.run([*base, *stop, f"train.output_dir={out}"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert (f"resumed from {killed / 'last.pt'} at iteration {saved}" in done.stderr) == (out == killed)
    a, b = load_checkpoint(tmp_path / "through" / "last.pt"), load_checkpoint(killed / "last.pt")
    assert a["step"] == b["step"] == saved + 3
    assert "optimizer" in a
    assert_same_state(a, b)


def _add_sample(shard: Path, key: str, data: bytes, label: bytes | None = b"0", suffix: str = "jpg") -> None:
    with tarfile.open(shard, "a") as tar:
        for name, blob in ((f"{key}.{suffix}", data), (f"{key}.cls", label)):
            if blob is not None:
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))


def test_the_index_cache_is_used_and_rebuilt_when_a_shard_changes(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FASTDINO_INDEX_CACHE", str(tmp_path / "cache"))
    out = _shards(_image_tree(tmp_path / "images"), tmp_path / "shards")
    tars = sorted(out.glob("*.tar"))
    _backdate(*tars, out / "classes.json", out)
    first = sh.index_images(out)
    assert len(list((tmp_path / "cache").glob("*.idx"))) == 1

    def no_scan(*a):
        raise AssertionError("scanned: the cache was not used")

    with monkeypatch.context() as m:
        m.setattr(sh, "_scan_tar", no_scan)
        again = sh.index_images(out)
    _same_index(first, again, out, out)
    buf = io.BytesIO()
    _photo(99).save(buf, format="JPEG")
    _add_sample(tars[0], "a/zz", buf.getvalue())
    _backdate(tars[0], seconds=30)
    with caplog.at_level(logging.INFO, "fastdino.data"):
        changed = sh.index_images(out)
    assert "out of date" in caplog.text
    ids = list(changed.image_ids(out))
    assert len(changed) == len(first) + 1 and ids.index("a/zz") == 6  # last of class a, in the folder's order
    assert changed.read(6) == buf.getvalue() and changed.labels[6] == 0


def test_processes_starting_at_once_scan_the_shards_once(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDINO_INDEX_CACHE", str(tmp_path / "cache"))
    out = _shards(_image_tree(tmp_path / "images"), tmp_path / "shards")
    _backdate(*out.glob("*.tar"), out / "classes.json", out)
    built = built_once(out, tmp_path)
    folder = index_image_folder(tmp_path / "images")
    assert (built["ids"], built["labels"]) == (list(folder.image_ids(tmp_path / "images")), list(folder.labels))


def test_bench_times_processes_starting_at_once_before_and_after_the_build_lock(tmp_path, capsys):
    from perf.bench_data import at_once_timings

    at_once_timings(tmp_path, 200, 2)
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    found = [(row[0].split(",")[1].split(":")[0].strip(), row[1].strip(), row[3].strip()) for row in rows]
    # before: each process scans unless the other's cache is already written when it looks (a loaded machine)
    assert found[0] in [("before", "200 samples each", "2 scan(s)"), ("before", "200 samples each", "1 scan(s)")]
    assert found[1:] == [("after", "200 samples each", "1 scan(s)")]


def test_damaged_shards_are_named_by_shard_and_key_and_nothing_else_is_lost(tmp_path, caplog):
    src = _image_tree(tmp_path / "images")
    out = _shards(src, tmp_path / "shards")
    tars = sorted(out.glob("*.tar"))
    n = len(NAMES)
    _add_sample(tars[0], "a/only-a-label", None)  # a member without an image
    _add_sample(tars[0], "b/a-clip", b"\0" * 9, None, suffix="mp4")  # no member fastdino knows
    jpeg = io.BytesIO()
    _photo(7, 200, 200).save(jpeg, format="JPEG")
    _add_sample(tars[1], "b/zz-cut", jpeg.getvalue())
    with tarfile.open(tars[1]) as tar:
        cut = tar.getmember("b/zz-cut.jpg").offset_data + 100
    with open(tars[1], "r+b") as f:  # cut inside the last image: the end of the shard is lost
        f.truncate(cut)
    with caplog.at_level(logging.WARNING, "fastdino.data"):
        index = sh.index_images(out)
    lines = [r.getMessage() for r in caplog.records]
    why = "an image's suffix must be one Pillow reads: .jpg, .png, ...): left out"
    assert f"{tars[0]}:a/only-a-label has no image member (it holds .cls; {why}" in lines
    assert f"{tars[0]}:b/a-clip has no image member (it holds .mp4; {why}" in lines  # never an empty list
    assert any(line.startswith(f"{tars[1]}:b/zz-cut") and "truncated" in line for line in lines), lines
    assert len(index) == n  # every other image kept
    # a shard that vanished after indexing, one cut short: their lost members are reported by shard:key, the
    # others still read
    victim = tars[2]
    lost = {name for name in index.paths if name.startswith(f"{victim}:")}
    victim.unlink()
    members = index.members
    shortened = members.shards.index(str(tars[3]))
    cut = min(int(members.offset[j] + members.size[j]) for j in range(len(index)) if members.shard[j] == shortened)
    cut_short = {index.paths[j] for j in range(len(index)) if members.shard[j] == shortened
                 and members.offset[j] + members.size[j] > cut}
    with open(tars[3], "r+b") as f:
        f.truncate(cut)
    assert cut_short and not cut_short & lost
    dataset = ImageFileDataset(index, multicrop_transform(32, 16, 0), seed=0)
    record = UnreadableImages()
    with caplog.at_level(logging.WARNING, "fastdino.data"):
        for epoch in (0, 1):
            dataset.set_epoch(epoch)
            for i in range(len(dataset)):
                views, _, bad = dataset[i]
                assert views is not None
                record.add(bad)
    assert lost and set(record.paths) == lost | cut_short
    reasons = {r.getMessage().split(" (skipped)")[0].removeprefix("unreadable image "): r.getMessage()
               for r in caplog.records if "unreadable image" in r.getMessage()}
    assert all("FileNotFoundError" in reasons[name] for name in lost)
    assert all("truncated after indexing" in reasons[name] for name in cut_short)


def _damaged_set(tmp_path: Path) -> Path:
    """Shards with a member without an image, a bad class member, a key repeated in a later shard, a shard that
    ends inside a header and one cut inside its last image."""
    out = _shards(_image_tree(tmp_path / "images"), tmp_path / "shards", shard_size=8_000)
    tars = sorted(out.glob("*.tar"))
    assert len(tars) >= 5
    jpeg = io.BytesIO()
    _photo(7, 200, 200).save(jpeg, format="JPEG")
    _add_sample(tars[0], "a/only-a-label", None)
    _add_sample(tars[1], "b/bad-label", jpeg.getvalue(), b"seven")
    _add_sample(tars[2], "b/twice", jpeg.getvalue(), b"2")  # class 2 is 'b', the class folder of the key
    _add_sample(tars[3], "b/twice", jpeg.getvalue(), b"2")
    for shard, key, inside in ((tars[3], "b/lost", "header"), (tars[4], "b/zz-cut", "image")):
        _add_sample(shard, key, jpeg.getvalue(), b"2")
        with tarfile.open(shard) as tar:
            member = tar.getmember(f"{key}.jpg")
        with open(shard, "r+b") as f:
            f.truncate(member.offset + 256 if inside == "header" else member.offset_data + 100)
    return out


def test_a_scan_spread_over_processes_gives_what_one_process_gives(tmp_path, monkeypatch, caplog):
    out = _damaged_set(tmp_path)
    shards, _, classes_file = sh.resolve_shards(out)
    listed = [*shards, str(tmp_path / "gone.tar")]  # and one that vanished since the list was made
    one = sh._scan(listed, classes_file, processes=1)
    expected = [f"{shards[0]}:a/only-a-label has no image member", f"{shards[1]}:b/bad-label: unreadable class",
                f"shard {shards[3]} is damaged after", f"{shards[3]}:b/twice repeats a key of {shards[2]}",
                f"{shards[4]}:b/zz-cut: the shard is truncated inside this sample",
                f"shard {listed[-1]} cannot be read"]
    assert [line[:len(e)] for line, e in zip(one.problems, expected, strict=True)] == expected, one.problems

    def here(*a):
        raise AssertionError("a shard was scanned in the calling process")

    with monkeypatch.context() as m:
        m.setattr(sh, "_scan_tar", here)  # the scan processes are fresh interpreters: theirs is unpatched
        many = sh._scan(listed, classes_file, processes=3)
    assert (many.shards, many.keys, many.names, many.classes_json) == (one.shards, one.keys, one.names,
                                                                      one.classes_json)
    assert many.problems == one.problems
    for name, array in one.arrays.items():
        assert many.arrays[name].dtype == array.dtype and np.array_equal(many.arrays[name], array), name
    # through the index, as a first start chooses: the same index and the same warnings, in the same order
    monkeypatch.setenv("FASTDINO_INDEX_CACHE", "off")
    monkeypatch.setattr(sh, "PARALLEL_SCAN_BYTES", 0)
    seen = {}
    for processes in ("1", "2"):
        monkeypatch.setenv(sh.INDEX_PROCESSES_ENV, processes)
        caplog.clear()
        with caplog.at_level(logging.INFO, "fastdino.data"):
            index = sh.index_images(out)
        assert f"indexing {len(shards)} shards ({processes} process{'es' if processes == '2' else ''})" in caplog.text
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        seen[processes] = (list(index.paths), index.labels, index.classes, [index.read(j) for j in range(len(index))],
                           warnings)
    assert seen["1"] == seen["2"] and seen["1"][4] == one.problems[:-1]
    assert len(seen["1"][0]) == len(NAMES) + 1  # and b/twice, from the first shard that holds it


def test_a_compressed_shard_is_refused_in_one_line_by_any_number_of_processes(tmp_path, monkeypatch):
    out = _shards(_image_tree(tmp_path / "images"), tmp_path / "shards")
    tars = sorted(out.glob("*.tar"))
    tars[1].write_bytes(gzip.compress(tars[1].read_bytes()))  # gzip-compressed under a .tar name
    shards, _, classes_file = sh.resolve_shards(out)
    messages = []
    for processes in (1, 2):
        with pytest.raises(DataError) as err:
            sh._scan(shards, classes_file, processes)
        messages.append(str(err.value))
    assert messages[0] == messages[1] and "\n" not in messages[0]
    assert messages[0].startswith(f"shard {tars[1]} is gzip-compressed")
    # a scan process that ends without answering (a bug, or killed) is not mistaken for a shard without samples
    monkeypatch.setattr(sh, "_SERVE", "import sys; sys.exit(3)")
    with pytest.raises(RuntimeError, match=r"process failed while (starting|scanning \S+shard-000000.tar) \((EOFError|"
                                           r"BrokenPipeError), exit code 3\): its error is printed above"):
        sh._scan(shards, classes_file, 2)


def test_scan_processes_survive_their_environment_and_a_caller_that_stops_reading(tmp_path, monkeypatch, caplog):
    """A site hook that prints (sitecustomize on PYTHONPATH) cannot corrupt the replies; a Python that cannot be
    started means a scan in this process, with a warning; a process whose caller stops reading ends quietly."""
    out = _shards(_image_tree(tmp_path / "images"), tmp_path / "shards")
    shards, _, classes_file = sh.resolve_shards(out)
    one = sh._scan(shards, classes_file, 1)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text("print('hello from a site hook')\n")
    monkeypatch.setenv("PYTHONPATH", str(hook))
    assert sh._scan(shards, classes_file, 2).keys == one.keys
    monkeypatch.setattr(sh.sys, "executable", str(tmp_path / "no-python"))
    with caplog.at_level(logging.WARNING, "fastdino.data"):
        assert sh._scan(shards, classes_file, 2).keys == one.keys
    assert "could not start shard-scanning processes" in caplog.text and "scanning in this process" in caplog.text
    monkeypatch.undo()
    root = str(Path(sh.__file__).resolve().parents[2])
    proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", sh._SERVE, root], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the caller is gone before the answer
    pickle.dump((None, sh.IMAGE_EXTENSIONS), proc.stdin)
    pickle.dump((0, shards[0]), proc.stdin)
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0 and proc.stderr.read() == b""


def test_the_scan_processes_follow_the_cpus_the_ranks_and_the_variable(monkeypatch):
    monkeypatch.delenv(sh.INDEX_PROCESSES_ENV, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    for cpus, ranks, expected in ((32, None, 8), (3, None, 3), (32, "8", 4), (32, "64", 1), (16, "8", 2)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)))
        if ranks:  # a job's CPU limit (16 of 32) is shared by its ranks when each scans: they divide it
            monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks)
        assert sh.index_processes(every_rank_scans=True) == expected, (cpus, ranks)
        assert sh.index_processes() == min(cpus, sh.MAX_INDEX_PROCESSES), cpus  # one scans for all: every CPU
    monkeypatch.setenv(sh.INDEX_PROCESSES_ENV, "12")
    assert sh.index_processes() == 12
    shards = [f"s{i}.tar" for i in range(5)]
    assert sh._scan_processes(shards, sh.PARALLEL_SCAN_BYTES, 12) == 5  # at most one a shard
    assert sh._scan_processes(shards, sh.PARALLEL_SCAN_BYTES - 1, 12) == 1  # a small set: not worth starting them
    assert sh._scan_processes(shards[:1], 10 * sh.PARALLEL_SCAN_BYTES, 12) == 1
    for bad in ("0", "-2", "two", "1.5"):
        monkeypatch.setenv(sh.INDEX_PROCESSES_ENV, bad)
        with pytest.raises(UserError, match=f"{sh.INDEX_PROCESSES_ENV}='{re.escape(bad)}' is not a positive number"):
            sh.index_images("/nonexistent/shard-{0..1}.tar")  # refused before the shards are looked at


def test_refusals_are_one_line_before_any_work(tmp_path, capsys):
    src = _image_tree(tmp_path / "images")
    out = _shards(src, tmp_path / "shards")
    # `fastdino shards` never writes into a non-empty folder, nor inside the image folder
    for target in (out, src / "inside"):
        assert main(["shards", str(src), str(target)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(target) in err
    # refusals found by indexing leave no output folder behind: an empty folder, shards given as images, a
    # val/ class that train/ lacks (named with the set at fault)
    (tmp_path / "empty").mkdir()
    tree = tmp_path / "tree"
    _image_tree(tree / "train")
    _image_tree(tree / "val", names=["zebra/0.jpg"])
    for source, words in ((tmp_path / "empty", ["holds no images"]), (out, ["holds tar shards already"]),
                          (tree, [f"{tree / 'val'} has classes ['zebra'] that {tree / 'train'} lacks"])):
        assert main(["shards", str(source), str(tmp_path / "new")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(w in err for w in words), err
        assert not (tmp_path / "new").exists()
    # an output path through a file
    (tmp_path / "afile").write_text("")
    assert main(["shards", str(src), str(tmp_path / "afile" / "sub")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot create the shard folder" in err and "Not a directory" in err
    # compressed shards
    gz = tmp_path / "gz"
    gz.mkdir()
    (gz / "shard-000000.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(DataError, match="compressed"):
        sh.index_images(gz)
    # a listed shard that does not exist
    with pytest.raises(DataError, match=r"shard-000004.tar \(of .*shard-\{000000..000099\}.tar\) does not exist"):
        sh.index_images(str(out / "shard-{000000..000099}.tar"))
    # a shard named twice (here through a link) would count its images twice
    first = sorted(out.glob("*.tar"))[0]
    twice = tmp_path / "twice.txt"
    (tmp_path / "again.tar").symlink_to(first)
    twice.write_text(f"{first}\n{tmp_path / 'again.tar'}\n")
    with pytest.raises(DataError, match="names one shard twice"):
        sh.index_images(twice)
    # a label-less shard set: a training set of one class, refused by k-NN and as validation for labelled training
    flat = _shards(_image_tree(tmp_path / "flat", names=["0.jpg", "1.jpg", "2.png"]), tmp_path / "flat_shards")
    assert not (flat / "classes.json").exists()
    plain = sh.index_images(flat)
    assert plain.classes == ["."] and plain.labels == [0, 0, 0]
    with pytest.raises(DataError, match="no class labels"):
        sh.index_images(flat, classes=["a", "a b", "b"])
    from fastdino.config import EvalConfig
    from fastdino.eval.knn import knn_evaluate

    with pytest.raises(DataError, match="is not labelled"):
        knn_evaluate(torch.nn.Identity(), flat, out, 32, EvalConfig(), torch.device("cpu"))
    # a set labelled in part: named by shard:key
    mixed = tmp_path / "mixed"
    shutil.copytree(flat, mixed)
    _add_sample(sorted(mixed.glob("*.tar"))[0], "labelled", b"\xff\xd8", b"1")
    with pytest.raises(DataError, match=r"shard-\d+\.tar:\S+ has no class .* label every sample or none"):
        sh.index_images(mixed)


def test_train_and_val_shards_from_the_cli_round_trip_the_class_map(tmp_path, capsys):
    src = tmp_path / "images"
    _image_tree(src / "train")
    _image_tree(src / "val", names=["b/v.jpg", "a/w.png"])
    assert main(["shards", str(src), str(tmp_path / "out"), "--shard-size", "20KB", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {len(NAMES)} images in 4 shards" in printed and "wrote 2 images in 1 shard " in printed
    train, val = tmp_path / "out" / "train", tmp_path / "out" / "val"
    t = sh.index_images(train)
    v = sh.index_images(val, classes=t.classes)
    assert json.loads((val / "classes.json").read_text()) == t.classes == ["a", "a b", "b"]
    assert list(v.image_ids(val)) == ["a/w.png", "b/v.jpg"] and v.labels == [0, 2]
    assert [t.read(j) for j in range(len(t))] == [(src / "train" / n).read_bytes() for n in t.image_ids(train)]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_header_reader_lists_what_tarfile_lists(tmp_path, fmt):
    """Long names (ustar prefix, GNU long name, PAX path), non-ASCII names, directories and empty members."""
    path = tmp_path / "x.tar"
    names = ["a/" + "d" * 90 + "/" + "f" * 90 + ".jpg", "é/ü.png", "dir/", "short.cls", "empty.txt"]
    if fmt != tarfile.USTAR_FORMAT:
        names.append("x" * 150 + ".jpg")  # no ustar prefix split exists for it
    with tarfile.open(path, "w", format=fmt, encoding="utf-8") as tar:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name.rstrip("/"))
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = 3 * i
                tar.addfile(info, io.BytesIO(bytes(range(3 * i))))
    size = os.path.getsize(path)
    ours = list(tarscan._tar_members(path.read_bytes(), size))
    with tarfile.open(path) as tar:
        theirs = [(m.name, m.offset_data, m.size) for m in tar if m.isreg()]
    assert ours == theirs and len(ours) == len(names) - 1


def test_a_run_on_the_folder_resumes_on_its_shards_bitwise_with_knn_on_val_shards(tmp_path, capsys):
    """Training reads train/ shards and the k-NN val/ shards; a run stopped on the folder and resumed on its shards
    (same fingerprint) ends bitwise where the run on the folder alone ends, with the same k-NN figures."""
    from fastdino.data.demo import make_demo_dataset

    data = make_demo_dataset(tmp_path / "data", n_train_per_class=4, n_val_per_class=1, size=32)  # 24 + 6 images
    shards = _shards(data, tmp_path / "shards", shard_size=20_000)
    tiny = ["model.arch=vit_tiny", "model.depth=1", "model.patch_size=8", "model.img_size=16", "dino.out_dim=32",
            "dino.hidden_dim=16", "dino.bottleneck_dim=8", "data.global_size=16", "data.local_size=8",
            "data.local_crops_number=2", "data.num_workers=0", "dino.head_bn=false", "health.enabled=false",
            "train.device=cpu", "data.batch_size=8", "train.epochs=2"]
    args = ["train", "configs/demo.yaml", *tiny]
    assert main([*args, f"data.path={data}", f"train.output_dir={tmp_path / 'folder'}"]) == 0
    folder_out = capsys.readouterr().out
    moved = tmp_path / "moved"
    assert main([*args, f"data.path={data}", f"train.output_dir={moved}", "train.max_steps=4"]) == 0
    capsys.readouterr()
    assert main([*args, f"data.path={shards}", f"train.output_dir={moved}"]) == 0
    shards_out = capsys.readouterr().out
    knn = [line for line in folder_out.splitlines() if line.startswith("k-NN top-1")]
    assert len(knn) == 2 and knn[-1] in shards_out
    a, b = load_checkpoint(tmp_path / "folder" / "last.pt"), load_checkpoint(moved / "last.pt")
    assert a["step"] == b["step"] == 6 and a["index_fingerprint"] == b["index_fingerprint"]
    for key in ("student", "teacher", "center"):
        for name, value in a[key].items():
            assert torch.equal(b[key][name], value), f"{key}.{name}"


@pytest.mark.parametrize("layout", ["folder", "shards"])
def test_bad_images_are_warned_once_per_run_through_knn_passes_and_not_again_after_a_resume(tmp_path, caplog, layout):
    """A corrupt image in train/ and one in val/, plus what indexing reports (a stray image beside the class folders;
    a sample without an image in each shard set): each is warned about once in a run of 3 epochs with a k-NN pass
    after each, not once per pass; the run's checkpoint lists both images, so its resumption warns about neither."""
    from fastdino.data.demo import make_demo_dataset

    data = make_demo_dataset(tmp_path / "data", n_train_per_class=4, n_val_per_class=1, size=32)  # 24 + 6 images
    victims = [sorted((data / split).rglob("*.jpg"))[0] for split in ("train", "val")]
    for victim in victims:
        victim.write_bytes(b"\xff\xd8 not a jpeg")
    if layout == "folder":
        path = data
        shutil.copy(victims[0].with_name("0001.jpg"), data / "train" / "stray.jpg")
        bad = [str(v) for v in victims]
        indexing = [f"{data / 'train'}: ignoring 1 image(s) beside the class sub-folders"]
    else:
        path = _shards(data, tmp_path / "shards", shard_size=20_000)
        for split in ("train", "val"):
            _add_sample(sorted((path / split).glob("*.tar"))[0], "a/label-only", None)
        bad = [next(p for p in sh.index_images(path / split).paths if p.endswith(sh.encode_key(str(v.relative_to(
            data / split))))) for split, v in zip(("train", "val"), victims, strict=True)]
        indexing = [f"{path / split}/shard-000000.tar:a/label-only has no image member" for split in ("train", "val")]
    tiny = ["model.arch=vit_tiny", "model.depth=1", "model.patch_size=8", "model.img_size=16", "dino.out_dim=32",
            "dino.hidden_dim=16", "dino.bottleneck_dim=8", "data.global_size=16", "data.local_size=8",
            "data.local_crops_number=1", "data.num_workers=0", "dino.head_bn=false", "health.enabled=false",
            "train.device=cpu", "data.batch_size=8", "train.epochs=3", "train.knn_every=1", f"data.path={path}"]

    def warnings(start: str) -> int:
        return sum(r.getMessage().startswith(start) for r in caplog.records if r.levelname == "WARNING")

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["train", "configs/demo.yaml", *tiny, f"train.output_dir={tmp_path / 'run'}"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len([x for x in lines if "knn_top1" in x]) == 4  # at 0 and after each epoch
    assert [warnings(f"unreadable image {name} (skipped)") for name in bad] == [1, 1]
    assert not [r for r in caplog.records if "object at 0x" in r.getMessage()]  # reasons name the image, not memory
    assert [warnings(line) for line in indexing] == [1] * len(indexing)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["skipped_images"] == sorted(bad)

    with caplog.at_level(logging.WARNING):
        assert main(["train", "configs/demo.yaml", *tiny, f"train.output_dir={tmp_path / 'resumed'}",
                     "train.max_steps=4"]) == 0
        caplog.clear()
        assert main(["train", "configs/demo.yaml", *tiny, f"train.output_dir={tmp_path / 'resumed'}"]) == 0
    assert [warnings(f"unreadable image {name}") for name in bad] == [0, 0]  # known from the checkpoint
    assert [warnings(line) for line in indexing] == [1] * len(indexing)  # indexed once by this run


def test_train_and_val_sets_that_disagree_on_classes_are_refused_naming_the_set_at_fault(tmp_path):
    """k-NN, linear probes and fine-tuning index val/ in train/'s classes (`shards.index_in_classes_of`): when train/
    shards lost their classes.json their classes are the bare .cls integers, and the line names that file, not
    val/; a validation class that training lacks names val/; val/ .cls integers beyond train/'s classes name val/'s
    missing classes.json."""
    from fastdino.config import EvalConfig
    from fastdino.eval.finetune import finetune
    from fastdino.eval.knn import knn_evaluate
    from fastdino.eval.linear import linear_probe

    src = tmp_path / "images"
    _image_tree(src / "train")
    _image_tree(src / "val", names=["b/v.jpg", "a/w.png"])
    out = _shards(src, tmp_path / "out")
    train, val = out / "train", out / "val"
    (train / "classes.json").unlink()
    cpu = torch.device("cpu")
    evaluations = [
        lambda t, v: knn_evaluate(torch.nn.Identity(), t, v, 16, EvalConfig(), cpu),
        lambda t, v: linear_probe(torch.nn.Identity(), t, v, image_size=16),
        lambda t, v: finetune(torch.nn.Identity(), t, v, 16, cpu, num_workers=0),
    ]
    for evaluate in evaluations:
        for v in (val, src / "val"):  # val/ as shards or as a folder
            with pytest.raises(DataError) as refused:
                evaluate(train, v)
            assert str(refused.value).startswith(f"{train / 'classes.json'} is missing, so the training shards {train} "
                                                 "name their classes by their bare .cls integers ['0', '1', '2']")
            assert "\n" not in str(refused.value)

    zebra = tmp_path / "zebra"
    shutil.copytree(src / "val", zebra)
    shutil.copytree(zebra / "b", zebra / "zebra")
    labelled = _shards(src, tmp_path / "labelled") / "train"
    with pytest.raises(DataError, match=rf"^{zebra} has classes \['zebra'\] that the training shards {labelled} "
                                        rf"\({labelled / 'classes.json'}\) lack \(they have \['a', 'a b', 'b'\]\)"):
        sh.index_in_classes_of(zebra, labelled, sh.index_images(labelled))
    with pytest.raises(DataError, match=rf"^{zebra} has classes \['zebra'\] that the training images {src / 'train'} "
                                        "lack"):
        sh.index_in_classes_of(zebra, src / "train", index_image_folder(src / "train"))
    beyond = tmp_path / "beyond"
    beyond.mkdir()
    shutil.copy(next(val.glob("*.tar")), beyond)
    assert sh.index_in_classes_of(beyond, train, sh.index_images(train)).labels == [0, 2]  # integers meet integers
    _add_sample(next(beyond.glob("*.tar")), "c/new", b"\xff\xd8", b"3")  # a fourth class, unnamed
    with pytest.raises(DataError, match=rf"{beyond}/shard-000000\.tar:c/new has \.cls 3, beyond the 3 classes it is "
                                        rf"indexed in \({beyond / 'classes.json'} is missing"):
        sh.index_in_classes_of(beyond, train, sh.index_images(train))


def test_a_classes_json_from_another_conversion_is_refused(tmp_path, capsys):
    """Validation shards converted on their own (classes 'a b', 'b'), then given a copy of the training set's
    classes.json ('a', 'a b', 'b'): their .cls numbers would name other classes than the class folders their keys
    hold, and k-NN would score under the wrong classes. Refused in one line naming a sample and the file."""
    src = _image_tree(tmp_path / "images" / "train")
    out = _shards(src, tmp_path / "train")
    val = _shards(_image_tree(tmp_path / "images" / "val", names=["b/v.jpg", "a b/w.png"]), tmp_path / "val")
    assert sh.index_in_classes_of(val, out, sh.index_images(out)).labels == [1, 2]  # its own classes.json
    (val / "classes.json").write_text((out / "classes.json").read_text())
    with pytest.raises(DataError) as refused:
        sh.index_in_classes_of(val, out, sh.index_images(out))
    assert re.fullmatch(rf"{re.escape(str(val))}/shard-\d+\.tar:a b/w%2Epng lies in class folder 'a b' but its .cls "
                        rf"names 'a' in {re.escape(str(val / 'classes.json'))}: that classes.json is not the one of "
                        rf"the conversion that wrote {re.escape(str(val))}; put that conversion's classes.json there",
                        str(refused.value)), str(refused.value)
    assert len(sh.index_images(out)) == len(NAMES)  # a set keyed otherwise, or right, is not touched


def test_validation_shards_without_classes_json_are_refused_for_named_training_classes(tmp_path):
    """Validation shards whose labels are bare .cls integers (their classes.json lost, or written by another
    conversion) would be scored under whatever training class has that position: k-NN, linear probes, fine-tuning
    and the trainer's k-NN refuse them in one line naming the missing file, before any work; with the file back
    they are matched by name."""
    from fastdino.config import EvalConfig
    from fastdino.eval.knn import knn_evaluate

    src = tmp_path / "images"
    _image_tree(src / "train")
    _image_tree(src / "val", names=["b/v.jpg", "a/w.png"])
    out = _shards(src, tmp_path / "out")
    train, val = out / "train", out / "val"
    saved = (val / "classes.json").read_text()
    (val / "classes.json").unlink()
    for train_set in (train, src / "train"):  # named classes from shards' classes.json, or from class folders
        with pytest.raises(DataError) as refused:
            knn_evaluate(torch.nn.Identity(), train_set, val, 16, EvalConfig(), torch.device("cpu"))
        line = str(refused.value)
        assert line.startswith(f"{val / 'classes.json'} is missing, so the .cls integers of {val} name no class and "
                               "cannot be matched to the training classes ['a', 'a b', 'b'] by name"), line
        assert "\n" not in line
    (val / "classes.json").write_text(saved)
    assert sh.index_in_classes_of(val, train, sh.index_images(train)).labels == [0, 2]
