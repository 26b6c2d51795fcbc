"""Faults around a run, each replayed with its own inputs: a full disk at every file the run writes, Ctrl-C inside a
checkpoint write, a run folder used twice (at once, or by another run before), a run folder inside the data, data
that vanishes mid-run, out of memory. Each ends in the expected line and exit code with last.pt intact
(README, "What happens with bad input")."""

import errno
import fcntl
import importlib.abc
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastdino.engine.logging as run_logging
import fastdino.engine.trainer as trainer
from fastdino.cli import main
from fastdino.data.demo import make_demo_dataset
from fastdino.engine.checkpoint import load_checkpoint, temporary_files

TINY = [
    "model.arch=vit_tiny", "model.depth=1", "model.patch_size=8", "model.img_size=16", "model.drop_path_rate=0.0",
    "dino.out_dim=32", "dino.hidden_dim=16", "dino.bottleneck_dim=8", "data.global_size=16", "data.local_size=8",
    "data.local_crops_number=2", "data.num_workers=0", "optim.warmup_epochs=1", "train.knn_eval=false",
    "dino.head_bn=false", "health.enabled=false", "train.device=cpu", "data.batch_size=4", "train.epochs=2",
    "train.log_every=1", "train.ckpt_every=2",
]
ENOSPC = os.strerror(errno.ENOSPC)


@pytest.fixture
def run(tmp_path):
    """(args of a 6-iteration run: 12 images, batch 4, a checkpoint every 2 iterations, its folder)."""
    data = make_demo_dataset(tmp_path / "data", n_train_per_class=2, n_val_per_class=1, size=32)
    out = tmp_path / "run"
    return ["train", "configs/demo.yaml", *TINY, f"data.path={data}", f"train.output_dir={out}"], out


def one_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in re.split(r"[\r\n]", err) if line.startswith("fastdino: ")]
    assert len(lines) == 1, lines
    return lines[0]


def at_step(n: int, action):
    """Trainer.train_step that calls `action(trainer)` before step n (0-based) runs."""
    step = trainer.Trainer.train_step

    def patched(self, *args, **kwargs):
        if self.step == n:
            action(self)
        return step(self, *args, **kwargs)

    return patched


class FullAfter:
    """metrics.jsonl on a disk that fills after `n` lines: the next write leaves half a line and raises ENOSPC (as a
    file object's write does: no file name)."""

    def __init__(self, path, n):
        self.f, self.n = open(path, "a"), n

    def write(self, text):
        if self.n == 0:
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, ENOSPC)
        self.n -= 1
        return self.f.write(text)

    def __getattr__(self, name):
        return getattr(self.f, name)


def second_save_fails(error: BaseException):
    """torch.save whose second call writes part of the file, then fails with `error` as torch's writer reports
    it: wrapped in `RuntimeError: [enforce fail at inline_container.cc]`."""
    real, calls = torch.save, []

    def save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) < 2:
            return real(obj, f, *a, **k)
        f.write(b"partial")
        try:
            raise error
        except BaseException:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None

    return save


def test_full_disk_at_metrics_then_resume_skips_the_damaged_line(run, monkeypatch, capsys, caplog):
    args, out = run
    monkeypatch.setattr(run_logging, "_open_jsonl", lambda path: FullAfter(path, 3))
    assert main(args) == 5
    line = one_line(capsys.readouterr().err)
    assert line == (f"fastdino: training stopped: could not write {out / 'metrics.jsonl'} at iteration 4 ({ENOSPC}); "
                    f"{out / 'last.pt'} (after 3 iterations) is intact: free space and run again (train.resume=auto) "
                    "to continue")
    assert load_checkpoint(out / "last.pt")["step"] == 3
    assert not (out / "metrics.jsonl").read_text().endswith("\n")  # the half line a full disk leaves
    monkeypatch.undo()
    assert main(args) == 0
    assert "dropped a damaged last line" in caplog.text
    assert (out / "summary.json").is_file() and (out / "curves.png").is_file()
    assert main(args) == 0  # every later call in the folder works too


@pytest.mark.parametrize("where", ["summary.json", "curves.png"])
def test_full_disk_at_the_report(run, monkeypatch, capsys, where):
    args, out = run

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, ENOSPC, str(out / where))

    if where == "summary.json":
        monkeypatch.setattr(trainer, "write_run_report", full)
    else:
        monkeypatch.setattr(run_logging, "plot_run_curves", full)
    assert main(args) == 5
    line = one_line(capsys.readouterr().err)
    assert f"could not write {out / where} at iteration 6 ({ENOSPC}); {out / 'last.pt'} (after 6 iterations)" in line


def test_full_disk_inside_torch_save(run, monkeypatch, capsys):
    """torch.save's writer turns the file's OSError into `RuntimeError: [enforce fail at inline_container.cc]`."""
    args, out = run
    monkeypatch.setattr(torch, "save", second_save_fails(OSError(errno.ENOSPC, ENOSPC)))
    assert main(args) == 5
    line = one_line(capsys.readouterr().err)
    assert f"could not write checkpoint {out / 'last.pt'} at iteration 3 ({ENOSPC}); the previous" in line
    assert load_checkpoint(out / "last.pt")["step"] == 2 and temporary_files(out / "last.pt") == []


def test_full_disk_at_deepspeeds_files(run, monkeypatch, capsys):
    deepspeed = pytest.importorskip("deepspeed")
    args, out = run

    def save_checkpoint(self, folder, tag=None, **kwargs):
        try:
            raise OSError(errno.ENOSPC, ENOSPC)
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from None

    monkeypatch.setattr(deepspeed.runtime.engine.DeepSpeedEngine, "save_checkpoint", save_checkpoint)
    assert main([*args, "train.engine=deepspeed", "train.resume=auto"]) == 5
    line = one_line(capsys.readouterr().err)
    assert f"could not write checkpoint {out / 'deepspeed'} at iteration 2 ({ENOSPC}); no checkpoint" in line


def test_ctrl_c_inside_a_checkpoint_write(run, monkeypatch, capsys):
    args, out = run
    monkeypatch.setattr(torch, "save", second_save_fails(KeyboardInterrupt()))
    assert main(args) == 130
    assert one_line(capsys.readouterr().err).startswith("fastdino: interrupted; the last checkpoint")
    assert load_checkpoint(out / "last.pt")["step"] == 2 and temporary_files(out / "last.pt") == []


def test_a_second_run_into_a_folder_in_use_is_refused(run, capsys, caplog):
    """Another process holds the folder's lock: refused in one line, exit 2, nothing written. A lock file left by a
    process that is gone (killed: no flock any more) is taken over, said in the log."""
    args, out = run
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, os, sys, time
fd = os.open({str(out / '.fastdino.lock')!r}, os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b"process 4242 on elsewhere, started 2026-12-07 10:00:00 UTC")
print("locked", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert main(args) == 2
        assert one_line(capsys.readouterr().err) == (
            f"fastdino: error: train.output_dir {out} is in use by another run (process 4242 on elsewhere, started "
            "2026-12-07 10:00:00 UTC): wait for it to end, or give this run another train.output_dir")
        assert sorted(p.name for p in out.iterdir()) == [".fastdino.lock"]
    finally:
        holder.kill()
        holder.wait()
    assert main(args) == 0  # the holder is gone: its lock file is taken over
    assert "took over the lock of a run that ended without releasing it (process 4242 on elsewhere" in caplog.text
    with open(out / ".fastdino.lock") as f:  # released at the end of the run
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_fresh_run_never_mixes_with_another_runs_files(run, capsys, caplog):
    args, out = run
    assert main([*args, "train.max_steps=2"]) == 0
    assert main([*args, "train.resume=none"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"fastdino: error: train.output_dir {out} holds another run's files (last.pt, "
                           "metrics.jsonl, summary.json, curves.png): with train.resume=none")
    (out / "last.pt").unlink()  # a run stopped before its first checkpoint: resume=auto starts afresh beside it
    assert main(args) == 0
    (aside,) = out.glob("previous-*")
    assert sorted(p.name for p in aside.iterdir()) == ["curves.png", "metrics.jsonl", "summary.json"]
    assert "this run starts afresh" in caplog.text
    summary = (out / "summary.json").read_text()
    assert '"iterations": 6' in summary and '"start_iteration": 0' in summary


def test_run_folder_inside_the_data_is_refused(tmp_path, capsys):
    data = make_demo_dataset(tmp_path / "data", n_train_per_class=2, n_val_per_class=1, size=32)
    out = data / "train" / "runs" / "x"
    assert main(["train", "configs/demo.yaml", *TINY, f"data.path={data}", f"train.output_dir={out}"]) == 2
    assert f"train.output_dir {out} lies inside the data folder {data / 'train'}" in one_line(capsys.readouterr().err)
    assert not out.exists()
    beside = data / "run"  # in data.path itself, beside train/ and val/
    assert main(["train", "configs/demo.yaml", *TINY, f"data.path={data}", f"train.output_dir={beside}"]) == 2
    assert f"train.output_dir {beside} lies inside the data folder {data}" in one_line(capsys.readouterr().err)
    assert not beside.exists()


def test_data_that_vanishes_mid_run(run, monkeypatch, capsys):
    args, out = run
    data = Path(args[-2].split("=", 1)[1])
    monkeypatch.setattr(trainer.Trainer, "train_step", at_step(3, lambda t: shutil.rmtree(data / "train")))
    code = main(args)
    line = one_line(capsys.readouterr().err)
    assert code == 8 and line.startswith(f"fastdino: training stopped: the training data {data / 'train'} is gone at "
                                         "iteration "), line
    assert f"{out / 'last.pt'} (after 4 iterations) is intact" in line  # the batch of step 3 was decoded before
    assert load_checkpoint(out / "last.pt")["step"] == 4


def test_shards_that_vanish_mid_run_or_never_decode(tmp_path, monkeypatch, capsys):
    """A shard set behaves as a folder: shards deleted mid-run stop the run naming the data (exit 8); shards of
    undecodable images are one line before any step (exit 2); never a traceback."""
    images = make_demo_dataset(tmp_path / "images", n_train_per_class=2, n_val_per_class=1, size=32)
    assert main(["shards", str(images), str(tmp_path / "shards")]) == 0
    capsys.readouterr()
    train_shards = tmp_path / "shards" / "train"
    out = tmp_path / "run"
    args = ["train", "configs/demo.yaml", *TINY, f"data.path={tmp_path / 'shards'}", f"train.output_dir={out}"]
    def vanish(t):
        shutil.rmtree(train_shards)
        t.index.members.__init__(**{k: getattr(t.index.members, k) for k in ("shards", "keys", "shard", "offset",
                                                                            "size")})  # open files dropped too

    monkeypatch.setattr(trainer.Trainer, "train_step", at_step(3, vanish))
    assert main(args) == 8
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"fastdino: training stopped: the training data {train_shards} is gone at "), line
    monkeypatch.undo()
    bad = tmp_path / "bad"
    for k in range(6):
        (bad / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        (bad / f"c{k % 2}" / f"{k}.jpg").write_bytes(bytes(range(256)) * 4)
    assert main(["shards", str(bad), str(tmp_path / "bad_shards")]) == 0
    capsys.readouterr()
    args = ["train", "configs/demo.yaml", *TINY, f"data.path={tmp_path / 'bad_shards'}",
            f"train.output_dir={tmp_path / 'run2'}"]
    assert main(args) == 2
    assert "no readable image" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: not enough memory: you tried to "
                 "allocate 103079215104 bytes."),
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 96.00 GiB. GPU 0 has a total capacity of "
                                "79.19 GiB\nOf the allocated memory ..."),
])
def test_out_of_memory_is_one_line(run, monkeypatch, capsys, error):
    args, out = run

    def oom(t):
        raise error

    monkeypatch.setattr(trainer.Trainer, "train_step", at_step(3, oom))
    assert main(args) == 7
    line = one_line(capsys.readouterr().err)
    assert line.startswith("fastdino: training stopped: out of memory on cpu at iteration 3 with data.batch_size=4 "
                           "per process (")
    assert "model.grad_checkpointing=true" in line and f"{out / 'last.pt'} (after 3 iterations) is intact" in line


def test_a_multi_line_error_reaches_the_cli_as_one_line(run, capsys):
    """A checkpoint whose weights do not match (load_state_dict's message spans several lines), through the CLI."""
    args, out = run
    assert main([*args, "train.max_steps=2"]) == 0
    ckpt = load_checkpoint(out / "last.pt")
    ckpt["student"] = {k: v[..., :1] if v.ndim else v for k, v in ckpt["student"].items()}
    torch.save(ckpt, out / "last.pt")
    assert main(args) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"fastdino: error: checkpoint {out / 'last.pt'} does not match this run: Error(s) in "
                           "loading state_dict")


def test_a_broken_optional_dependency_is_reported_once_and_skipped(run, monkeypatch, capsys, caplog):
    """A TensorBoard whose import raises AttributeError (not ImportError) no longer ends the run before step 1."""
    args, out = run

    class Broken(importlib.abc.MetaPathFinder, importlib.abc.Loader):  # an installed package whose import fails
        def find_spec(self, name, path=None, target=None):
            return importlib.util.spec_from_loader(name, self) if name == "torch.utils.tensorboard" else None

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            raise AttributeError("module 'numpy' has no attribute 'object'")

    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    assert main(args) == 0
    assert caplog.text.count("tensorboard failed to start (AttributeError") == 1


def test_a_process_group_that_will_not_close_leaves_the_runs_own_error(run, monkeypatch, capsys, caplog):
    """A communicator holding an earlier error may refuse destroy_process_group: the run's error (here the one line
    of a user mistake, exit 2) is still what the user gets, and the refusal is a warning."""
    import fastdino.engine.trainer as trainer

    def refuse(agreed=True):
        raise RuntimeError("NCCL error: unhandled cuda error (ncclCommFinalize)")

    monkeypatch.setattr(trainer, "close_process_group", refuse)
    args, out = run
    assert main([*args, "train.max_steps=2", "data.path=/nonexistent/images"]) == 2
    assert "data.path" in capsys.readouterr().err
    assert "could not close the process group after ConfigError: NCCL error" in caplog.text


def test_a_resumed_run_says_what_it_trained_and_where_it_stands(run, capsys):
    """6 iterations: 2, then a resume for the other 4: `trained 4 iterations (2 to 6)`, not the run's total."""
    args, out = run
    assert main([*args, "train.max_steps=2"]) == 0
    assert capsys.readouterr().out.startswith("trained 2 iterations; last loss ")
    assert main([*args, "train.resume=auto"]) == 0
    assert capsys.readouterr().out.startswith("trained 4 iterations (2 to 6); last loss ")


def test_two_deepspeed_runs_in_one_process(run, tmp_path):
    """DeepSpeed caches a clone of the world group per process: an in-process run after the process group was
    closed (a notebook, this suite) starts on a new default group and must not reach for the old clone. A run
    closes the group it opened (NCCL warns at exit otherwise) and leaves open a group its caller opened."""
    pytest.importorskip("deepspeed")
    import torch.distributed as dist

    args, out = run
    try:
        assert main([*args, "train.engine=deepspeed", "train.max_steps=2"]) == 0
        assert not dist.is_initialized()  # the single-process run's group of one, closed by the run
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # the caller's own group
        assert main([*args[:-1], f"train.output_dir={tmp_path / 'again'}", "train.engine=deepspeed",
                     "train.max_steps=2"]) == 0
        assert dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
