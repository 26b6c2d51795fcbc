"""The image-index cache (issue 13, large folders): a hit equals a fresh walk and walks nothing; any added, removed
or renamed file or folder, or a moved folder link, invalidates it; a corrupt cache is rebuilt; the data folder
is never written to. Processes starting at once build it once (one builds, the others wait and read it); a killed
builder blocks nobody; without flock every process builds, as before."""

import errno
import fcntl
import logging
import os
import signal
import time

import pytest
from index_build_child import WAITING, builds, built_once, one_builds_one_waits

from fastdino.data import files
from fastdino.data.files import index_image_folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(files.INDEX_CACHE_ENV, str(folder))
    return folder


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")  # the index never opens a file: empty files are enough


def _backdate(root, seconds=60):
    """Set every folder's mtime in the past: a folder changed within the last 2 s is never cached."""
    past = time.time() - seconds
    for folder, _, _ in os.walk(root):
        os.utime(folder, (past, past))


def _tree(tmp_path):
    root = tmp_path / "data"
    for rel in ("a/1.jpg", "a/2.png", "a/sub/3.jpg", "a/sub/deep/4.tif", "b/5.jpg", "b/we\nird.jpg", "b/x.txt",
                "b/.hidden.jpg"):
        _touch(root / rel)
    _touch(root / os.fsdecode(b"b/not-utf8-\xff.jpg"))  # a Linux file name need not be valid UTF-8
    return root


def _fresh(root, monkeypatch, **kw):
    with monkeypatch.context() as m:
        m.setenv(files.INDEX_CACHE_ENV, "off")
        return index_image_folder(root, **kw)


def _same(a, b):
    return (a.paths, a.labels, a.classes) == (b.paths, b.labels, b.classes)


def _no_walk(monkeypatch):
    def walk(root):
        raise AssertionError(f"{root} was walked: the cache was not used")

    monkeypatch.setattr(files, "_scan_folder", walk)


def _state(root):
    """Every entry below root with its mtime: what a read-only folder must keep."""
    return sorted((p, os.lstat(os.path.join(p, n) if n else p).st_mtime_ns)
                  for p, dirs, names in os.walk(root) for n in ["", *dirs, *names])


def test_a_cache_hit_equals_a_fresh_walk_and_walks_nothing(tmp_path, cache, monkeypatch):
    root = _tree(tmp_path)
    _backdate(root)
    first = index_image_folder(root)
    assert len(first) == 7 and first.classes == ["a", "b"]
    assert len(list(cache.glob("*.idx"))) == 1
    assert _same(first, _fresh(root, monkeypatch))
    given = _fresh(root, monkeypatch, classes=["c", "a", "b"])
    _no_walk(monkeypatch)
    assert _same(index_image_folder(root), first)
    assert _same(index_image_folder(root, classes=["c", "a", "b"]), given)  # labels applied after the cache


def test_the_cached_paths_keep_the_folder_as_given(tmp_path, cache, monkeypatch):
    flat = tmp_path / "flat"
    for name in ("1.jpg", "2.jpg"):
        _touch(flat / name)
    _backdate(flat)
    monkeypatch.chdir(tmp_path)
    for given in ("flat", "./flat", str(flat)):  # "./flat" is "flat" to pathlib
        index_image_folder(given)
    assert len(list(cache.glob("*.idx"))) == 2  # one per spelling: the paths start with it
    _no_walk(monkeypatch)
    assert index_image_folder("flat").paths == ["flat/1.jpg", "flat/2.jpg"]
    assert index_image_folder(str(flat)).paths == [str(flat / "1.jpg"), str(flat / "2.jpg")]


CHANGES = {
    "added file": lambda r: _touch(r / "a/sub/deep/new.jpg"),
    "removed file": lambda r: (r / "a/sub/3.jpg").unlink(),
    "renamed file": lambda r: (r / "b/5.jpg").rename(r / "b/6.jpg"),
    "new class folder": lambda r: _touch(r / "c/7.jpg"),
    "new sub-folder": lambda r: _touch(r / "b/new/8.jpg"),
    "removed sub-folder": lambda r: [(r / "a/sub/deep/4.tif").unlink(), (r / "a/sub/deep").rmdir()],
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_change_below_the_folder_invalidates_the_cache(tmp_path, cache, monkeypatch, change):
    root = _tree(tmp_path)
    _backdate(root)
    before = index_image_folder(root)
    CHANGES[change](root)
    after = index_image_folder(root)
    assert not _same(after, before)
    assert _same(after, _fresh(root, monkeypatch))


def test_a_moved_or_new_link_target_invalidates_the_cache_and_links_do_not_loop(tmp_path, cache, monkeypatch):
    root = _tree(tmp_path)
    outside = tmp_path / "outside"
    _touch(outside / "one/9.jpg")
    _touch(outside / "two/10.jpg")
    (outside / "current").symlink_to(outside / "one")
    (root / "c").symlink_to(outside / "current")  # a class folder reached through two links
    (root / "a/sub/loop").symlink_to(root)  # a link back to the root
    (root / "b/later").symlink_to(outside / "later")  # dangling for now
    _backdate(tmp_path)
    before = index_image_folder(root)
    assert _same(before, _fresh(root, monkeypatch)) and str(root / "c/9.jpg") in before.paths
    with monkeypatch.context() as m:
        _no_walk(m)
        assert _same(index_image_folder(root), before)
    (outside / "current").unlink()  # changes `outside`, which the index never listed, not `root`
    (outside / "current").symlink_to(outside / "two")
    after = index_image_folder(root)
    assert str(root / "c/10.jpg") in after.paths and str(root / "c/9.jpg") not in after.paths
    assert _same(after, _fresh(root, monkeypatch))
    _backdate(tmp_path)
    index_image_folder(root)
    _touch(outside / "later/11.jpg")  # the dangling link's target appears
    assert str(root / "b/later/11.jpg") in index_image_folder(root).paths


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped path byte", "bad header", "empty"])
def test_a_corrupt_cache_is_rebuilt_not_trusted(tmp_path, cache, monkeypatch, caplog, damage):
    root = _tree(tmp_path)
    _backdate(root)
    want = index_image_folder(root)
    (file,) = cache.glob("*.idx")
    data = file.read_bytes()
    damaged = {"garbage": os.urandom(len(data)), "truncated": data[:-3],
               "flipped path byte": data[:-2] + bytes([data[-2] ^ 1]) + data[-1:],
               "bad header": data.replace(b'"duplicates": 0', b'"duplicates": [', 1), "empty": b""}[damage]
    file.write_bytes(damaged)
    with caplog.at_level(logging.WARNING, logger="fastdino.data"):
        assert _same(index_image_folder(root), want)
    assert "is corrupt" in caplog.text
    assert file.read_bytes() == data  # rewritten
    _no_walk(monkeypatch)
    assert _same(index_image_folder(root), want)


def test_a_read_only_data_folder_is_cached_elsewhere_and_left_untouched(tmp_path, cache, monkeypatch):
    root = _tree(tmp_path)
    _backdate(root)
    folders = [f for f, _, _ in os.walk(root)]
    for f in folders:
        os.chmod(f, 0o555)
    try:
        before = _state(root)
        want = index_image_folder(root)
        _no_walk(monkeypatch)
        assert _same(index_image_folder(root), want)
        assert _state(root) == before
        assert len(list(cache.glob("*.idx"))) == 1
    finally:
        for f in folders:
            os.chmod(f, 0o755)


def test_no_cache_when_off_for_a_folder_changing_now_or_when_unwritable(tmp_path, monkeypatch, caplog):
    root = _tree(tmp_path)
    monkeypatch.setenv(files.INDEX_CACHE_ENV, str(tmp_path / "cache"))
    index_image_folder(root)  # just written: a change in the same mtime tick would go unseen
    assert not list((tmp_path / "cache").glob("*.idx"))  # only the build's lock file
    _backdate(root)
    monkeypatch.setenv(files.INDEX_CACHE_ENV, "off")
    index_image_folder(root)
    assert not list((tmp_path / "cache").glob("*.idx"))
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(files.INDEX_CACHE_ENV, str(tmp_path / "a-file" / "cache"))
    with caplog.at_level(logging.WARNING, logger="fastdino.data"):
        assert _same(index_image_folder(root), _fresh(root, monkeypatch))
    assert "cannot write the index cache" in caplog.text and files.INDEX_CACHE_ENV in caplog.text


def test_processes_starting_at_once_walk_the_folder_once(tmp_path, cache, monkeypatch):
    root = _tree(tmp_path)
    _backdate(root)
    built = built_once(root, tmp_path)
    want = _fresh(root, monkeypatch)
    assert (built["ids"], built["classes"]) == (list(want.image_ids(root)), want.classes)


def test_a_killed_builder_leaves_no_lock_and_its_waiter_builds(tmp_path, cache, monkeypatch):
    root = _tree(tmp_path)
    _backdate(root)
    builder, waiter = one_builds_one_waits(root, tmp_path, tmp_path / "never")
    builder.proc.send_signal(signal.SIGKILL)  # mid-build: no cache written, the lock never released by the builder
    assert builder.proc.wait(timeout=10) == -signal.SIGKILL
    read = waiter.result()
    assert WAITING in waiter.text()  # it did wait for the lock the killed builder held
    assert builds(tmp_path) == [builder.proc.pid, waiter.proc.pid]
    want = _fresh(root, monkeypatch)
    assert (read["ids"], read["classes"]) == (list(want.image_ids(root)), want.classes)
    _no_walk(monkeypatch)  # the waiter cached what it built
    assert _same(index_image_folder(root), want)


def test_a_lock_held_too_long_is_named_and_indexing_goes_on_without_it(tmp_path, cache, monkeypatch, caplog):
    """A holder that never lets go (a suspended job sharing the cache, a stale network lock): after
    BUILD_LOCK_WAIT_S the waiter warns, naming the holder the lock file records, and indexes by itself."""
    root = _tree(tmp_path)
    _backdate(root)
    index_image_folder(root)  # creates the cache and its lock file
    (lock,) = cache.glob("*.idx.lock")
    for idx in cache.glob("*.idx"):
        idx.unlink()
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another open file: conflicts with the indexer's, even in this process
        os.ftruncate(fd, 0)
        os.write(fd, b"node7 pid 4242")
        monkeypatch.setattr(files, "BUILD_LOCK_WAIT_S", 0.5)
        with caplog.at_level(logging.INFO, logger="fastdino.data"):
            built = index_image_folder(root)
    finally:
        os.close(fd)
    assert f"waiting for another process's index build (node7 pid 4242 holds {lock})" in caplog.text
    assert f"node7 pid 4242 has held the index build lock {lock} for 0 s: indexing here without it" in caplog.text
    assert _same(built, _fresh(root, monkeypatch))


def test_without_flock_every_process_builds_as_before(tmp_path, cache, monkeypatch, caplog):
    root = _tree(tmp_path)
    _backdate(root)

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with caplog.at_level(logging.INFO, logger="fastdino.data"):
        built = index_image_folder(root)
    assert "cannot lock" in caplog.text and "No locks available" in caplog.text
    assert _same(built, _fresh(root, monkeypatch)) and len(list(cache.glob("*.idx"))) == 1


def test_the_default_cache_folder_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv(files.INDEX_CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert files.index_cache_dir() == tmp_path / "fastdino" / "index"
    monkeypatch.setenv(files.INDEX_CACHE_ENV, "OFF")
    assert files.index_cache_dir() is None


def test_bench_index_runs_on_a_small_tree(tmp_path, monkeypatch, capsys):
    from perf import bench_index

    monkeypatch.setenv(files.INDEX_CACHE_ENV, "off")  # the bench sets it per row; restored after the test
    assert bench_index.main(["--folder", str(tmp_path), "--files", "25", "--per-folder", "10"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    assert len(rows) == 3 and all("| 25 images |" in r for r in rows), rows
