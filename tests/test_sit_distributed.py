"""SiT under data parallelism (gloo, CPU): two processes of batch B train like one process of batch 2B.

What makes them agree: the InfoNCE keys are all-gathered (the global batch is every query's negatives), the L1
is divided by the global count of corrupted pixels, and each image's blocks, kinds, grey / blur blocks and
rotation are its global row's draw (data/masking.py BatchRows). Noise values and `replace` partners are drawn
per process (tests/test_masking.py says how), and drop path draws per process as for DINO, so these runs use
zeros as the only fill and no drop path: then the runs agree up to float rounding (a different summation order
in the all-reduce and the per-process matmuls: 1e-5 relative here).
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from fastdino.config import load_config
from fastdino.data.demo import make_demo_dataset
from fastdino.engine.checkpoint import load_checkpoint
from fastdino.methods import build_method

# a tiny SiT with every corruption whose draws are per image: zeros, unchanged, grey and blurred blocks; rotation
SIT = [
    "train.method=sit", "model.arch=vit_tiny", "model.depth=1", "model.patch_size=8", "model.img_size=32",
    "model.drop_path_rate=0.0", "sit.decoder_hidden_dim=32", "sit.proj_hidden_dim=32", "sit.proj_dim=16",
    "sit.corruption=zeros", "sit.keep_prob=0.2", "sit.grey_prob=0.5", "sit.blur_prob=0.5", "sit.rotation=true",
    "data.global_size=32",
]
MODES = {"momentum": [], "online": ["sit.contrastive_target=online", "sit.uncertainty_weights=true"]}
PER_PROCESS, STEPS = 3, 3


def _global_views():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2 * PER_PROCESS, 3, 32, 32, generator=g) for _ in range(2)]  # 2 views of the global batch


def _steps(mode: str, views: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict, dict]:
    """STEPS SGD steps of SiT on fixed views (DDP-wrapped under a process group) with a teacher EMA; returns the
    losses and the student's and teacher's final weights."""
    torch.manual_seed(0)  # the same weights and the same shared random stream on every process
    method = build_method(load_config(None, SIT + MODES[mode]), torch.device("cpu"))
    student = method.student
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    if dist.is_initialized():
        method.student = torch.nn.parallel.DistributedDataParallel(student)
    losses = []
    for _ in range(STEPS):
        loss, _ = method(views, epoch=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for t, s in zip(method.teacher.parameters(), student.parameters()):
                t.lerp_(s, 0.2)
        losses.append(loss.detach())
    return losses, student.state_dict(), method.teacher.state_dict()


def _worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        local = [v[rank::2] for v in _global_views()]  # every 2nd image from `rank`, as the training sampler shards
        torch.save({mode: _steps(mode, local) for mode in MODES}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _assert_same_weights(got: dict, want: dict, what: str, key_bias_atol: float = 1e-5) -> None:
    """Equal within rtol 1e-4, atol 1e-5; the attention's key bias within key_bias_atol: its gradient is 0 in
    exact arithmetic (softmax ignores a shift shared by every key), so it is rounding noise, which Adam turns
    into steps of up to the learning rate in either direction."""
    assert got.keys() == want.keys()
    for name, value in want.items():
        if name.endswith("attn.qkv.bias"):
            q, k, v = value.chunk(3)
            gq, gk, gv = got[name].chunk(3)
            torch.testing.assert_close(torch.cat((gq, gv)), torch.cat((q, v)), rtol=1e-4, atol=1e-5, msg=name)
            torch.testing.assert_close(gk, k, rtol=0, atol=key_bias_atol, msg=f"{what}.{name} (key part)")
        else:
            torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=f"{what}.{name}")


def test_two_gloo_processes_give_the_losses_and_weights_of_one_process_of_the_global_batch(tmp_path):
    """Per step, the mean of the two processes' losses (what DDP's gradient average differentiates) is the
    one-process loss of the global batch, within 1e-5; after 3 steps the student and the EMA teacher agree."""
    torch.multiprocessing.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path / "run")), nprocs=2)
    ranks = [torch.load(tmp_path / f"run.{r}") for r in (0, 1)]
    for mode in MODES:
        losses, student, teacher = _steps(mode, _global_views())
        for step, loss in enumerate(losses):
            mean = (ranks[0][mode][0][step] + ranks[1][mode][0][step]) / 2
            torch.testing.assert_close(mean, loss, rtol=1e-5, atol=1e-6, msg=f"{mode} loss at step {step}")
        assert not torch.equal(ranks[0][mode][0][0], ranks[1][mode][0][0])  # the processes saw different images
        for rank in ranks:
            _assert_same_weights(rank[mode][1], student, f"{mode} student")
            _assert_same_weights(rank[mode][2], teacher, f"{mode} teacher")


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_torchrun_sit_run_matches_one_process_of_the_global_batch(tmp_path):
    """The whole trainer (sampler, augmentations, corruption, DDP, AdamW, EMA, checkpoint): `fastdino train` of
    SiT on 2 gloo processes of batch 2 has the gradient norms of 1 process of batch 4 at each of 3 iterations
    and ends with its weights."""
    data = make_demo_dataset(tmp_path / "data", n_train_per_class=2, n_val_per_class=1, size=32)  # 3 steps / epoch
    base = ["-m", "fastdino.cli", "train", "configs/sit_demo.yaml", *SIT, f"data.path={data}", "data.num_workers=0",
            "optim.warmup_epochs=1", "train.epochs=1", "train.knn_eval=false", "train.log_every=1"]
    single = subprocess.run([sys.executable, *base, "data.batch_size=4", f"train.output_dir={tmp_path}/one"],
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", *base, "data.batch_size=2",
                          f"train.output_dir={tmp_path}/two"], capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = load_checkpoint(tmp_path / "one" / "last.pt"), load_checkpoint(tmp_path / "two" / "last.pt")
    assert one["step"] == two["step"] == 3
    lr = 0.008 * 4 / 256  # configs/sit_demo.yaml's optim.lr for the global batch of 4: the largest Adam step
    for key in ("student", "teacher"):
        _assert_same_weights(two[key], one[key], key, key_bias_atol=STEPS * lr)

    def grad_norms(run):  # the global gradient's norm before clipping, logged every step
        lines = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return torch.tensor([x["grad_norm"] for x in lines if "grad_norm" in x])

    assert len(grad_norms("one")) == STEPS
    torch.testing.assert_close(grad_norms("two"), grad_norms("one"), rtol=1e-4, atol=0)
