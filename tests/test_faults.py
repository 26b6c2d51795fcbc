"""Faults: a checkpoint write that fails (disk full), and one of two processes killed mid-run.

What happens, as documented in the README ("When a process fails", "What happens with bad input"):
- A failed checkpoint write stops training (exit code 5) with one line naming the file, the OS error and the
  iteration the previous `last.pt` holds; that file is untouched (atomic write: temporary file, rename).
- Under torchrun, a process that dies makes torchrun's elastic agent stop the others at once and exit non-zero,
  naming the failed rank and its exit code; a launcher without such an agent leaves the others blocked in the
  next collective for at most `train.dist_timeout` seconds. `train.resume=auto` continues from the last
  complete `last.pt`.
"""

import errno
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from fastdino.cli import main
from fastdino.data.demo import make_demo_dataset
from fastdino.engine.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.arch=vit_tiny", "model.depth=1", "model.patch_size=8", "model.img_size=16", "model.drop_path_rate=0.0",
    "dino.out_dim=32", "dino.hidden_dim=16", "dino.bottleneck_dim=8", "data.global_size=16", "data.local_size=8",
    "data.local_crops_number=2", "data.num_workers=0", "optim.warmup_epochs=1", "train.knn_eval=false",
    "train.log_every=1", "dino.head_bn=false", "health.enabled=false", "train.device=cpu",
]


def test_failed_checkpoint_write_keeps_the_previous_one_and_stops_in_one_line(tmp_path, monkeypatch, capsys):
    data = make_demo_dataset(tmp_path / "data", n_train_per_class=2, n_val_per_class=1, size=32)
    out = tmp_path / "run"
    args = ["train", "configs/demo.yaml", *TINY, f"data.path={data}", "data.batch_size=4", "train.epochs=2",
            "train.ckpt_every=1", f"train.output_dir={out}"]
    real_save, calls = torch.save, []

    def save(obj, f, *a, **k):  # the first two checkpoints are written, the third finds the disk full
        calls.append(1)
        if len(calls) >= 3:
            f.write(b"partial")  # a partial temporary file, as a full disk leaves it
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    assert main(args) == 5
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (err,) = [line for line in err.splitlines() if "fastdino: " in line]  # one line (beside the progress bar)
    assert f"could not write checkpoint {out / 'last.pt'} at iteration 3 (No space left on device)" in err
    assert "(after 2 iterations) is intact" in err and "train.resume=auto" in err
    assert load_checkpoint(out / "last.pt")["step"] == 2  # the previous checkpoint, whole
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temporary file left

    monkeypatch.setattr(torch, "save", real_save)  # space freed: the run continues from iteration 2 to its end
    assert main(args) == 0
    assert load_checkpoint(out / "last.pt")["step"] == 6


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=rank among `parent`'s children (Linux /proc)."""
    for task in Path(f"/proc/{parent}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(child)
    return None


@pytest.mark.skipif(shutil.which("torchrun") is None or not Path("/proc").is_dir(), reason="torchrun and /proc")
def test_killed_rank_ends_the_run_naming_it_and_resume_continues(tmp_path):
    data = make_demo_dataset(tmp_path / "data", n_train_per_class=4, n_val_per_class=1, size=32)  # 24 images
    out = tmp_path / "run"
    cmd = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "fastdino", "train", "configs/demo.yaml", *TINY,
           f"data.path={data}", "data.batch_size=2", "train.epochs=20", "train.ckpt_every=1",
           f"train.output_dir={out}", "train.dist_timeout=30"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "last.pt").is_file() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert run.poll() is None, "the run ended before a checkpoint was written"
        victim = _rank_pid(run.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = run.communicate(timeout=60)  # bounded: torchrun stops the other rank, no hang
    finally:
        if run.poll() is None:
            run.kill()
    assert time.monotonic() - killed_at < 60
    assert run.returncode != 0
    assert "rank      : 1" in stderr and "Signal 9 (SIGKILL)" in stderr, stderr[-3000:]

    saved = load_checkpoint(out / "last.pt")["step"]  # the last complete checkpoint (atomic writes)
    assert 1 <= saved < 120
    resume = subprocess.run([*cmd[:-2], "train.max_steps=" + str(saved + 2), f"train.output_dir={out}"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert resume.returncode == 0, resume.stderr[-3000:]
    assert f"resumed from {out / 'last.pt'} at iteration {saved}" in resume.stderr
    assert load_checkpoint(out / "last.pt")["step"] == saved + 2


def _hanging_peer_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch.distributed as dist

    from fastdino.engine.distributed import init_distributed

    init_distributed(torch.device("cpu"), timeout_s=2)
    if rank == 1:  # alive but silent: never joins the next all-reduce
        time.sleep(12)
        os._exit(0)
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(3))
        Path(out).write_text("no error")
    except RuntimeError as exc:
        Path(out).write_text(f"{time.monotonic() - start:.1f} {exc}")
    os._exit(0)


def test_dist_timeout_bounds_the_wait_for_a_hanging_peer(tmp_path):
    """train.dist_timeout reaches the process group: a collective waiting for a silent peer raises after it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.txt"
    torch.multiprocessing.start_processes(_hanging_peer_worker, args=(port, str(out)), nprocs=2, start_method="spawn")
    waited, message = out.read_text().split(" ", 1)
    assert 1.5 <= float(waited) < 10, message
