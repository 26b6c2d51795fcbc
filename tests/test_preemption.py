"""A scheduler's stop (SIGTERM, SIGUSR1): the step in flight finishes, every process stops at the same iteration,
last.pt is written there, one line names it, exit code 128 + signal; the resumed run ends bitwise where an
uninterrupted one does (docs/preemption.md).

The signals are sent from inside the run at chosen iterations (tests/signal_at_step.py patches the step to signal its
own process, as a scheduler's signal lands in the step in flight), from seeded random draws, or from outside to the
whole process group while DataLoader workers are busy.
"""

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from same_run import assert_same_state

import fastdino.engine.preempt as preempt
import fastdino.engine.trainer as trainer
from fastdino.cli import main
from fastdino.data.demo import make_demo_dataset
from fastdino.engine.checkpoint import load_checkpoint, temporary_files

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.arch=vit_tiny", "model.depth=1", "model.patch_size=8", "model.img_size=16", "model.drop_path_rate=0.2",
    "dino.out_dim=32", "dino.hidden_dim=16", "dino.bottleneck_dim=8", "data.global_size=16", "data.local_size=8",
    "data.local_crops_number=2", "data.num_workers=0", "optim.warmup_epochs=1", "train.knn_eval=false",
    "dino.head_bn=false", "health.enabled=false", "train.device=cpu", "data.batch_size=2", "train.epochs=2",
]
STOP_LINE = re.compile(r"fastdino: stopped by (SIG\w+) after (\d+) iterations; (\S+) holds iteration (\d+): run the "
                       r"same command again \(train.resume=auto\) to continue from it")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
torchrun = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")


@pytest.fixture
def data(tmp_path):
    return make_demo_dataset(tmp_path / "data", n_train_per_class=2, n_val_per_class=1, size=32)  # 12 images


@pytest.fixture(autouse=True)
def _own_handlers():
    """An in-process stop leaves the stop signals ignored (the CLI's process is ending): put them back."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in before.items():
        signal.signal(s, handler)
    preempt._active = None


def stop_lines(stderr: str) -> list[str]:
    return [line for line in re.split(r"[\r\n]", stderr) if line.startswith("fastdino: ")]


def assert_same_run(a: Path, b: Path) -> None:
    """Two last.pt files hold the same state tensor for tensor (weights, teacher, center, AdamW, RNG)."""
    x, y = load_checkpoint(a), load_checkpoint(b)
    assert x["step"] == y["step"]
    assert_same_state(x, y)
    assert torch.equal(x["rng"]["torch"], y["rng"]["torch"])


def test_one_process_stops_after_the_step_in_flight_and_resumes_bitwise(tmp_path, data, monkeypatch, capsys):
    """SIGTERM and SIGUSR1 at seeded random iterations of a 12-iteration run (log_every 5: one process does not wait
    for a log step): exit 128 + signal, one line naming iteration k + 1, last.pt holds it, and the resumed run ends
    equal to the uninterrupted one."""
    base = ["train", "configs/demo.yaml", *TINY, f"data.path={data}", "train.log_every=5"]
    assert main([*base, f"train.output_dir={tmp_path / 'whole'}"]) == 0
    step = trainer.Trainer.train_step
    for seed, sig in ((0, signal.SIGTERM), (1, signal.SIGUSR1), (2, signal.SIGTERM)):
        at = random.Random(seed).randrange(0, 11)
        out = tmp_path / f"stopped{seed}"

        def signalled(self, *args, _at=at, _sig=sig, **kwargs):
            if self.step == _at:
                os.kill(os.getpid(), _sig)  # lands in the step in flight
            return step(self, *args, **kwargs)

        capsys.readouterr()
        monkeypatch.setattr(trainer.Trainer, "train_step", signalled)
        assert main([*base, f"train.output_dir={out}"]) == 128 + sig
        err = capsys.readouterr().err
        assert "Traceback" not in err
        (line,) = stop_lines(err)
        name, after, path, held = STOP_LINE.fullmatch(line).groups()
        assert (name, int(after), int(held), path) == (sig.name, at + 1, at + 1, str(out / "last.pt")), line
        assert load_checkpoint(out / "last.pt")["step"] == at + 1
        monkeypatch.setattr(trainer.Trainer, "train_step", step)
        assert main([*base, f"train.output_dir={out}"]) == 0
        assert_same_run(tmp_path / "whole" / "last.pt", out / "last.pt")


def _run(cmd: list[str], env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=300,
                          **kwargs)


def _agreed(k: int, log_every: int, steps_per_epoch: int) -> int:
    """The iteration a signal that lands in step k (0-based) of one process stops every process at: the next log
    step or epoch end (where the processes' all-reduce already runs)."""
    n = k + 1
    while n % log_every and n % steps_per_epoch:
        n += 1
    return n


@torchrun
def test_two_processes_agree_on_one_iteration_and_resume_bitwise(tmp_path, data):
    """2 gloo processes under torchrun (batch 2 each: 3 iterations per epoch, 9 in all, log_every 2), stochastic depth
    on: SIGUSR1 to rank 1 alone at a random iteration, both stop at the next log step, one line; the resumed run then
    gets SIGTERM on both ranks; its resume ends equal to an uninterrupted run."""
    cmd = ["torchrun", "--standalone", "--nproc_per_node=2", str(ROOT / "tests" / "signal_at_step.py"), "train",
           "configs/demo.yaml", *TINY, f"data.path={data}", "train.log_every=2", "train.epochs=3"]
    whole = _run([*cmd, f"train.output_dir={tmp_path / 'whole'}"])
    assert whole.returncode == 0, whole.stderr[-3000:]
    out, rng, done = tmp_path / "parts", random.Random(0), 0
    for who, sig, last in (("1", "SIGUSR1", 4), ("*", "SIGTERM", 7)):
        at = rng.randrange(done, last)  # the agreed iterations stay below the run's 9
        run = _run([*cmd, f"train.output_dir={out}"], {"FASTDINO_TEST_SIGNAL": f"{who}:{at}:{sig}"})
        assert f"exitcode  : {128 + getattr(signal, sig)}" in run.stderr, run.stderr[-3000:]  # both ranks
        ours, _, launcher = run.stderr.partition("Traceback (most recent call last):\n  File")
        assert "torchrun" in launcher.split("\n")[0] and "Traceback" not in ours, ours[-3000:]  # torchrun's own
        (line,) = stop_lines(run.stderr)
        name, after, _, held = STOP_LINE.fullmatch(line).groups()
        done = _agreed(at, 2, 3)
        assert (name, int(after), int(held)) == (sig, done, done), (at, line)
        assert load_checkpoint(out / "last.pt")["step"] == done
    resumed = _run([*cmd, f"train.output_dir={out}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path / "whole" / "last.pt", out / "last.pt")


@torchrun
def test_deepspeed_two_processes_stop_and_resume_bitwise(tmp_path, data):
    """The same under train.engine=deepspeed (ZeRO-2, 2 processes, stochastic depth): DeepSpeed's files and last.pt
    at the agreed iteration, and the resume equal to the uninterrupted run."""
    pytest.importorskip("deepspeed")
    cmd = ["torchrun", "--standalone", "--nproc_per_node=2", str(ROOT / "tests" / "signal_at_step.py"), "train",
           "configs/demo.yaml", *TINY, f"data.path={data}", "train.log_every=1", "train.engine=deepspeed"]
    whole = _run([*cmd, f"train.output_dir={tmp_path / 'whole'}"])
    assert whole.returncode == 0, whole.stderr[-3000:]
    at = random.Random(3).randrange(0, 5)
    out = tmp_path / "parts"
    run = _run([*cmd, f"train.output_dir={out}"], {"FASTDINO_TEST_SIGNAL": f"0:{at}:SIGTERM"})
    assert run.stderr.count("exitcode  : 143") == 2, run.stderr[-3000:]
    (line,) = stop_lines(run.stderr)
    assert STOP_LINE.fullmatch(line).groups()[1::2] == (str(at + 1), str(at + 1)), line
    saved = load_checkpoint(out / "last.pt")
    assert saved["step"] == at + 1 and (out / "deepspeed" / saved["deepspeed"]["tag"]).is_dir()
    resumed = _run([*cmd, f"train.output_dir={out}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path / "whole" / "last.pt", out / "last.pt")


def test_sigkill_during_the_signals_checkpoint_keeps_the_previous_one(tmp_path, data):
    """SIGTERM in step 3 of a run that checkpoints every 3 iterations: the stop's save (iteration 4) hangs after its
    temporary file is written; a second SIGTERM does not cut it short; SIGKILL there leaves last.pt at iteration 3,
    loadable. The next start removes the temporary file, says so, and continues from iteration 3."""
    out, marker = tmp_path / "run", tmp_path / "hanging"
    cmd = [sys.executable, str(ROOT / "tests" / "signal_at_step.py"), "train", "configs/demo.yaml", *TINY,
           f"data.path={data}", "train.ckpt_every=3", f"train.output_dir={out}"]
    env = {**ENV, "FASTDINO_TEST_SIGNAL": "0:3:SIGTERM", "FASTDINO_TEST_HANG_SAVE": f"2:{marker}"}
    run = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.read_text() == "4"  # the stop's checkpoint, at the iteration after the step in flight
        run.send_signal(signal.SIGTERM)  # a second signal: noted, the save goes on
        time.sleep(0.5)
        assert run.poll() is None
        run.kill()
        run.communicate()
    finally:
        if run.poll() is None:
            run.kill()
    assert load_checkpoint(out / "last.pt")["step"] == 3
    (stale,) = temporary_files(out / "last.pt")
    resumed = _run(cmd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"removed {stale}" in resumed.stderr and "resumed from" in resumed.stderr
    assert temporary_files(out / "last.pt") == [] and load_checkpoint(out / "last.pt")["step"] == 12


def test_signal_to_the_process_group_while_workers_decode(tmp_path, data):
    """SIGUSR1 to the whole process group (as Kubernetes and some launchers send it) while 2 DataLoader workers
    decode: they ignore it and serve the batches the loop still needs; no hang, no traceback, the line and last.pt
    agree."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastdino", "train", "configs/demo.yaml", *TINY, f"data.path={data}",
           "data.num_workers=2", "train.epochs=40", "train.log_every=1", f"train.output_dir={out}"]
    run = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
            assert run.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(random.Random(4).random())
        os.killpg(run.pid, signal.SIGUSR1)
        _, stderr = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 128 + signal.SIGUSR1 and "Traceback" not in stderr, stderr[-3000:]
    (line,) = stop_lines(stderr)
    _, after, _, held = STOP_LINE.fullmatch(line).groups()
    assert after == held and load_checkpoint(out / "last.pt")["step"] == int(held) < 480


def test_signal_during_a_knn_pass(tmp_path, data):
    """SIGTERM inside the k-NN pass before training (a DataLoader worker decoding): the pass ends, the run stops at
    iteration 0 with its line and last.pt, no hang, no traceback."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "tests" / "signal_at_step.py"), "train", "configs/demo.yaml", *TINY,
           f"data.path={data}", "train.knn_eval=true", "data.num_workers=1", f"train.output_dir={out}"]
    run = _run(cmd, {"FASTDINO_TEST_KNN_SIGNAL": "SIGTERM"})
    assert run.returncode == 143 and "Traceback" not in run.stderr, run.stderr[-3000:]
    (line,) = stop_lines(run.stderr)
    assert STOP_LINE.fullmatch(line).groups()[1::2] == ("0", "0")
    assert load_checkpoint(out / "last.pt")["step"] == 0


def test_stop_signals_are_configurable(capsys):
    from fastdino.config import ConfigError, load_config

    assert load_config(None, ["train.stop_signals=usr2, SIGHUP"]).train.stop_signals == "usr2, SIGHUP"
    for bad in ("SIGINT", "SIGKILL", "SIGNOPE"):
        with pytest.raises(ConfigError, match="train.stop_signals"):
            load_config(None, [f"train.stop_signals={bad}"])
