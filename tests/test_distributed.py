"""torchrun + DDP on the CPU (gloo): two processes of batch 2 train like one process of batch 4.

The sampler hands each global step one contiguous slice of the permutation, augmentations are seeded per
image, DDP averages gradients and the center is all-reduced: so the runs agree up to float rounding.
"""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from same_run import assert_same_state

from fastdino.data.demo import make_demo_dataset
from fastdino.engine.checkpoint import load_checkpoint

COMMON = [
    "model.arch=vit_tiny", "model.depth=1", "model.patch_size=8", "model.img_size=16", "model.drop_path_rate=0.0",
    "dino.out_dim=32", "dino.hidden_dim=16", "dino.bottleneck_dim=8", "data.global_size=16", "data.local_size=8",
    "data.local_crops_number=2", "data.num_workers=0", "optim.warmup_epochs=1", "train.epochs=1",
    "train.knn_eval=false", "train.log_every=1",
    "dino.head_bn=false",  # BN statistics are per process on the CPU: 2 x batch 2 is not 1 x batch 4 with them
]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_two_process_ddp_matches_single_process(tmp_path):
    data = make_demo_dataset(tmp_path / "data", n_train_per_class=2, n_val_per_class=1, size=32)
    base = ["-m", "fastdino.cli", "train", "configs/demo.yaml", *COMMON, f"data.path={data}"]
    single = subprocess.run([sys.executable, *base, "data.batch_size=4", f"train.output_dir={tmp_path}/one"],
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(
        ["torchrun", "--standalone", "--nproc_per_node=2", *base, "data.batch_size=2",
         f"train.output_dir={tmp_path}/two"],
        capture_output=True, text=True, timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = load_checkpoint(tmp_path / "one" / "last.pt"), load_checkpoint(tmp_path / "two" / "last.pt")
    assert one["step"] == two["step"] == 3
    for key in ("student", "teacher"):
        for name, value in one[key].items():
            torch.testing.assert_close(two[key][name], value, rtol=1e-4, atol=1e-5, msg=f"{key}.{name}")
    torch.testing.assert_close(two["center"]["center"], one["center"]["center"], rtol=1e-4, atol=1e-6)

    bn = subprocess.run(  # the demo's BN head under CPU DDP: plain BatchNorm per process, training goes through
        ["torchrun", "--standalone", "--nproc_per_node=2", *base, "data.batch_size=2", "dino.head_bn=true",
         f"train.output_dir={tmp_path}/bn"],
        capture_output=True, text=True, timeout=300,
    )
    assert bn.returncode == 0, bn.stderr[-3000:]
    assert load_checkpoint(tmp_path / "bn" / "last.pt")["step"] == 3


def test_sync_batchnorm_only_for_cuda_processes():
    """SyncBatchNorm is GPU-only in torch: CPU (gloo) processes keep plain BN, CUDA ones get the global batch."""
    from fastdino.engine.distributed import DistInfo, sync_batchnorm
    from fastdino.models.heads import DINOHead

    head = DINOHead(8, 4, 16, 8, use_bn=True)
    two = DistInfo(rank=0, world_size=2)
    assert sync_batchnorm(head, DistInfo(), torch.device("cuda")) is head
    assert sync_batchnorm(head, two, torch.device("cpu")) is head
    synced = sync_batchnorm(head, two, torch.device("cuda"))  # conversion itself needs no GPU
    assert [type(m).__name__ for m in synced.mlp].count("SyncBatchNorm") == 2
    assert synced.state_dict().keys() == head.state_dict().keys()  # checkpoints load either way


def _center_worker(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from fastdino.losses.dino import TeacherCenter

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        rows = torch.Generator().manual_seed(0)
        teacher = torch.randn(8, 16, generator=rows)[:3] if rank == 0 else torch.randn(8, 16, generator=rows)[3:]
        center = TeacherCenter(16, momentum=0.7)
        center.center.copy_(torch.linspace(-1, 1, 16))
        center.update(teacher.sum(0), teacher.shape[0])  # rank 0: 3 rows, rank 1: 5 rows
        torch.save(center.center.clone(), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_center_all_reduce_with_different_local_batches_is_the_global_mean(tmp_path):
    """3 rows on rank 0, 5 on rank 1: every rank's center moves towards the mean of the 8 rows (not of 3 + 5 rows
    each counted as 4)."""
    torch.multiprocessing.spawn(_center_worker, args=(str(tmp_path / "init"), str(tmp_path / "center")), nprocs=2)
    teacher = torch.randn(8, 16, generator=torch.Generator().manual_seed(0)).double()
    expected = 0.7 * torch.linspace(-1, 1, 16).double() + 0.3 * teacher.mean(0)  # float64 reference
    for rank in (0, 1):
        got = torch.load(tmp_path / f"center.{rank}")
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_two_process_resume_continues_bitwise(tmp_path):
    """2 processes stopped mid-epoch (train.max_steps=2 of 6) and resumed end bitwise where 2 processes that ran
    through end: weights, teacher, center and AdamW state; with stochastic depth, so the RNG restore counts."""
    data = make_demo_dataset(tmp_path / "data", n_train_per_class=2, n_val_per_class=1, size=32)  # 3 steps / epoch
    base = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "fastdino.cli", "train", "configs/demo.yaml",
            *COMMON, f"data.path={data}", "data.batch_size=2", "train.epochs=2",
            "model.drop_path_rate=0.2"]  # stochastic depth: a resume without the RNG restore would draw other paths

    def run(out, *extra):
        done = subprocess.run([*base, f"train.output_dir={tmp_path / out}", *extra], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    run("through")
    run("stopped", "train.max_steps=2")
    assert load_checkpoint(tmp_path / "stopped" / "last.pt")["step"] == 2
    assert "resumed from" in run("stopped").stderr
    a, b = load_checkpoint(tmp_path / "through" / "last.pt"), load_checkpoint(tmp_path / "stopped" / "last.pt")
    assert a["step"] == b["step"] == 6
    assert "optimizer" in a
    assert_same_state(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_one_gpu_under_torchrun_then_resume(tmp_path):
    """The DDP engine on CUDA under torchrun (1 process: torchrun's environment, LOCAL_RANK -> cuda:0, bf16 autocast,
    the Triton loss and EMA), stopped after 2 of 6 iterations; a resume restores the student, teacher, center and
    AdamW state bitwise and runs to the end. With one process torchrun opens no process group (DDP over a group
    of one would only add its reducer): NCCL runs in the DeepSpeed GPU tests, where DeepSpeed opens a group of one."""
    from fastdino.config import load_config
    from fastdino.engine.trainer import Trainer

    root = Path(__file__).resolve().parents[1]
    data = make_demo_dataset(tmp_path / "data", n_train_per_class=2, n_val_per_class=1, size=32)  # 3 steps / epoch
    out = tmp_path / "run"
    args = [*COMMON, f"data.path={data}", "data.batch_size=4", "train.epochs=2", "train.device=cuda",
            f"train.output_dir={out}", "data.backend=cpu"]  # not about data: auto would pick a GPU decoder
    run = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=1", "-m", "fastdino", "train",
                          str(root / "configs" / "demo.yaml"), *args, "train.max_steps=2"],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["step"] == 2 and ckpt["world_size"] == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == "cuda:0" and summary["precision"] == "bf16"

    trainer = Trainer(load_config(str(root / "configs" / "demo.yaml"), args))  # train.resume=auto
    assert trainer.step == 2
    for key, module in (("student", trainer.method.student_module()), ("teacher", trainer.method.teacher)):
        for name, value in module.state_dict().items():
            assert torch.equal(value.cpu(), ckpt[key][name]), f"{key}.{name}"
    assert torch.equal(trainer.method.center.center.cpu(), ckpt["center"]["center"])
    for i, state in trainer.optimizer.state_dict()["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value).cpu(), torch.as_tensor(ckpt["optimizer"]["state"][i][name]))
    result = trainer.fit()
    assert result.steps_done == 6 and math.isfinite(result.last_loss)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_two_process_convnet_keeps_per_process_batchnorm_on_the_cpu(tmp_path):
    """A BatchNorm convnet (timm's test ResNet, issue 22) under 2 gloo processes: torch's SyncBatchNorm is GPU-only,
    so each process normalises by its own batch (engine/distributed.sync_batchnorm's CPU fallback) and training
    goes through; the checkpoint holds rank 0's running statistics, finite and moved from their init."""
    pytest.importorskip("timm")
    data = make_demo_dataset(tmp_path / "data", n_train_per_class=2, n_val_per_class=1, size=32)
    run = subprocess.run(
        ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "fastdino.cli", "train", "configs/demo_convnet.yaml",
         "model.arch=timm/test_resnet", "dino.out_dim=32", "dino.hidden_dim=16", "dino.bottleneck_dim=8",
         "data.global_size=32", "data.local_size=16", "data.batch_size=2", "data.num_workers=0", "train.epochs=1",
         "train.knn_eval=false", f"data.path={data}", f"train.output_dir={tmp_path}/run"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["step"] == 3
    for key in ("student", "teacher"):
        means = [v for k, v in ckpt[key].items() if k.endswith("running_mean")]
        assert means and all(torch.isfinite(m).all() for m in means)
        assert any(m.abs().sum() > 0 for m in means)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_two_process_checkpoint_keeps_every_process_bad_files(tmp_path):
    """A bad image only rank 1 meets before the checkpoint is in last.pt (rank 0 writes it), so the resumed run,
    where rank 0 meets it too, warns about it no more, and skipped_images counts it. Each save's gather sends only
    what is new since the last one (the restored list is not sent again): the resumed run's checkpoint still
    holds the restored file and a second one that only rank 1 meets after the resume."""
    from fastdino.data.batch import ResumableShardedSampler
    from fastdino.data.files import index_image_folder

    data = make_demo_dataset(tmp_path / "data", n_train_per_class=2, n_val_per_class=1, size=32)  # 3 steps / epoch
    paths = index_image_folder(data / "train").paths

    def slots(rank: int, epoch: int, steps: int) -> list[int]:
        return list(ResumableShardedSampler(len(paths), 2, 0, epoch, rank=rank, world_size=2))[: 2 * steps]

    # only rank 1 reads it in the 2 steps before the checkpoint (a bad slot substitutes the next index: not it)
    bad = next(j for j in slots(1, 0, 2) if j not in slots(0, 0, 3) and j - 1 not in slots(0, 0, 3))
    Path(paths[bad]).write_bytes(b"not a JPEG")
    base = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "fastdino.cli", "train", "configs/demo.yaml",
            *COMMON, f"data.path={data}", "data.batch_size=2", "train.epochs=3",
            f"train.output_dir={tmp_path / 'run'}"]
    first = subprocess.run([*base, "train.max_steps=2"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stderr.count(f"unreadable image {paths[bad]}") == 1  # warned by rank 1
    assert load_checkpoint(tmp_path / "run" / "last.pt")["skipped_images"] == [paths[bad]]
    assert any(bad in slots(0, epoch, 3) for epoch in (1, 2))  # rank 0 meets it after the resume

    def after_resume(rank: int) -> list[int]:
        return slots(rank, 0, 3)[4:] + slots(rank, 1, 3) + slots(rank, 2, 3)

    # spoilt after the first run; rank 0 never reads it after the resume (nor substitutes it for `bad`)
    second = next(j for j in after_resume(1) if j not in after_resume(0) and j not in (bad, bad + 1))
    Path(paths[second]).write_bytes(b"not a JPEG either")
    resumed = subprocess.run(base, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and f"unreadable image {paths[bad]}" not in resumed.stderr
    assert resumed.stderr.count(f"unreadable image {paths[second]}") == 1  # warned by rank 1
    assert resumed.stderr.count("unreadable image file(s) were skipped") == 1  # the run's summary, from rank 0
    assert load_checkpoint(tmp_path / "run" / "last.pt")["skipped_images"] == sorted([paths[bad], paths[second]])


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_stop_mode_processes_agree_whether_to_checkpoint(tmp_path):
    """health.on_collapse=stop with a condition pending on rank 1 only: no process checkpoints (before, rank 0
    saved, and its all-reduce and gather met rank 1's next DDP all-reduce), and the run ends."""
    import os

    data = make_demo_dataset(tmp_path / "data", n_train_per_class=2, n_val_per_class=1, size=32)  # 3 steps / epoch
    done = subprocess.run(
        ["torchrun", "--standalone", "--nproc_per_node=2", str(Path(__file__).parent / "unhealthy_rank.py"),
         "train", "configs/demo.yaml", *COMMON, f"data.path={data}", "data.batch_size=2", "train.ckpt_every=1",
         "health.enabled=true", "health.on_collapse=stop", "train.dist_timeout=60",
         f"train.output_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "FASTDINO_TEST_UNHEALTHY_RANK": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "run" / "last.pt").exists()
