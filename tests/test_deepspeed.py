"""DeepSpeed ZeRO-1/2 backend on DeepSpeed's CPU accelerator, against the DDP backend on the same batches.

Tolerances: the two backends run the same fp32 math except that ZeRO sums each parameter's squared
gradient norm from its partition slices (float rounding). Adam divides by sqrt(v), so a gradient that
is zero in exact arithmetic (the key part of the qkv bias: softmax ignores it) turns rounding noise
into an update of up to about lr; that part is checked against that bound, everything else to 1e-5.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("deepspeed")

from fastdino.cli import main  # noqa: E402
from fastdino.config import ConfigError, load_config  # noqa: E402
from fastdino.engine.checkpoint import load_checkpoint  # noqa: E402
from fastdino.engine.trainer import Trainer  # noqa: E402

TINY = [
    "model.arch=vit_tiny", "model.depth=2", "model.patch_size=8", "model.img_size=32", "model.drop_path_rate=0",
    "dino.out_dim=64", "dino.hidden_dim=64", "dino.bottleneck_dim=32", "dino.momentum_teacher=0.9",
    "dino.freeze_last_layer_epochs=1", "data.global_size=32", "data.local_size=24", "data.local_crops_number=2",
    "data.batch_size=3", "data.num_workers=0", "optim.lr=0.1", "optim.min_lr=1e-4", "optim.weight_decay=0.5",
    "optim.weight_decay_end=2", "optim.clip_grad=3.0", "optim.warmup_epochs=2", "train.epochs=4",
    "train.device=cpu", "train.precision=fp32", "train.resume=none", "train.knn_eval=false", "loss.impl=torch",
    "ema.impl=foreach", "health.enabled=false",
    "data.backend=cpu",  # the GPU tests below set train.device=cuda; they are not about data (auto: a GPU decoder)
]
LAST = "head.last_layer.parametrizations.weight.original1"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _release_process_group():
    """A 1-process DeepSpeed run opens a process group of one in this process: close it for later tests."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # weight_v of the weight-normed last layer


def image_folder(root, n):
    root.mkdir()
    for i in range(n):
        Image.new("RGB", (40, 40), (20 * i, 100, 200)).save(root / f"{i}.png")
    return root


def steps(tmp_path, engine: str, n_steps: int, extra=()):
    """n_steps of Trainer.train_step on seeded random views; yields (metrics, trainer) after each."""
    images = tmp_path / "images"
    if not images.exists():
        image_folder(images, 9)  # 3 iterations per epoch: the last-layer freeze ends at step 3
    cfg = load_config(None, TINY + [f"data.path={images}", f"train.output_dir={tmp_path / engine}",
                                    f"train.engine={engine}", *extra])
    trainer = Trainer(cfg)
    gen = torch.Generator().manual_seed(1)
    for step in range(n_steps):
        views = [torch.randn(3, 3, s, s, generator=gen) for s in (32, 32, 24, 24)]
        trainer.step = step
        yield trainer.train_step(views, step // trainer.steps_per_epoch), trainer


def snapshot(trainer) -> dict[str, torch.Tensor]:
    state = {f"student.{k}": v.clone() for k, v in trainer.method.student_module().state_dict().items()}
    state.update({f"teacher.{k}": v.clone() for k, v in trainer.method.teacher.state_dict().items()})
    return state


def assert_states_close(a: dict, b: dict, lr_bound: float, where: str):
    for name, x in a.items():
        y = b[name]
        if name.endswith("attn.qkv.bias"):  # the key third: zero gradient, Adam-normalised rounding noise
            d = x.numel() // 3
            assert (x[d:2 * d] - y[d:2 * d]).abs().max() <= lr_bound, f"{where}: {name} (key part)"
            x, y = torch.cat((x[:d], x[2 * d:])), torch.cat((y[:d], y[2 * d:]))
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5, msg=f"{where}: {name}")


@pytest.mark.parametrize("config", ["zero1", "zero2"])
def test_one_process_step_matches_ddp_backend(tmp_path, config):
    """8 steps across the end of the last-layer freeze: loss, grad norm, student, teacher, center."""
    ddp = [(m, snapshot(t), t.method.center.center.clone()) for m, t in steps(tmp_path, "ddp", 8)]
    extra = [f"train.deepspeed_config=configs/deepspeed/{config}.json"]
    for step, (m, t) in enumerate(steps(tmp_path, "deepspeed", 8, extra)):
        ref, ref_state, ref_center = ddp[step]
        where = f"{config}, step {step}"
        assert float(m["loss"]) == pytest.approx(float(ref["loss"]), rel=1e-5), where
        assert float(m["grad_norm"]) == pytest.approx(float(ref["grad_norm"]), rel=1e-5), where
        assert_states_close(ref_state, snapshot(t), lr_bound=2e-3, where=where)
        torch.testing.assert_close(t.method.center.center, ref_center, rtol=1e-5, atol=1e-6)


def test_zero2_sgd_matches_the_ddp_backend(tmp_path):
    """optim.name=sgd (issue 22) through DeepSpeed's flat partitions: the same steps as the DDP backend's fused SGD,
    across the end of the last layer's freeze (a parameter that joins the momentum late)."""
    sgd = ["optim.name=sgd", "optim.lr=20"]
    ddp = [(m, snapshot(t)) for m, t in steps(tmp_path, "ddp", 5, sgd)]
    extra = [*sgd, "train.deepspeed_config=configs/deepspeed/zero2.json"]
    for step, (m, t) in enumerate(steps(tmp_path, "deepspeed", 5, extra)):
        ref, ref_state = ddp[step]
        assert float(m["loss"]) == pytest.approx(float(ref["loss"]), rel=1e-5), f"sgd, step {step}"
        assert_states_close(ref_state, snapshot(t), lr_bound=1e-3, where=f"sgd, step {step}")
    assert t.optimizer.optimizer.__class__ is torch.optim.SGD


def test_zero2_freezes_last_layer_exactly_and_clips_per_parameter(tmp_path):
    """At ZeRO-2 the gradient lives in the partition after backward (p.grad is None already, so the DDP
    way of cancelling it cannot work); the frozen group is skipped by AdamW: the last layer is bitwise
    unchanged for the whole first epoch despite a weight decay of 0.5, and moves from step 3. Clipping is per
    parameter: each gradient above optim.clip_grad (3.0) ends at norm 3.0, each below it is left as it was (global
    clipping would scale them all by one factor)."""
    init, norms = None, []
    for step, (m, t) in enumerate(steps(tmp_path, "deepspeed", 4)):
        if step == 0:  # record each parameter's gradient norm before and after the clipping hook, from step 1 on
            opt, hook = t.backend.optimizer, t.backend.optimizer.unscale_and_clip_grads

            def recording(grads_flat, total_norm, _opt=opt, _hook=hook, _b=t.backend):
                grad = grads_flat[0]
                i = next(k for k, part in enumerate(_opt.single_partition_of_fp32_groups) if part.grad is grad)
                before = [float(grad[a:b].norm()) for _, a, b in _b._slices[i]]
                _hook(grads_flat, total_norm)
                norms.extend(zip(before, [float(grad[a:b].norm()) for _, a, b in _b._slices[i]]))

            opt.unscale_and_clip_grads = recording
        last = t.method.student_module().state_dict()[LAST]
        if init is None:
            init = last.clone()
            student = t.method.student_module()
            assert all(p.grad is None for p in student.parameters())  # reduced into the partitions
            assert float(m["grad_norm"]) > 3.0  # clipping at 3.0 per parameter was active
        if step < 3:
            assert torch.equal(last, init), f"step {step}: the frozen last layer moved"
        else:
            assert not torch.equal(last, init), "step 3: the last layer must train after the freeze"
    clipped = [(b, a) for b, a in norms if b > 3.0]
    assert clipped and len(clipped) < len(norms)
    for before, after in norms:
        assert after == pytest.approx(min(before, 3.0), rel=1e-5), (before, after)


def test_bf16_keeps_fp32_student_weights_for_the_ema(tmp_path):
    for _m, t in steps(tmp_path, "deepspeed", 1, ["train.precision=bf16"]):
        dtypes = {p.dtype for p in t.method.student_module().parameters()}
        assert dtypes == {torch.float32}, dtypes
        assert t.backend.ds_config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_bad_deepspeed_settings_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    images = image_folder(tmp_path / "images", 9)
    base = ["train", "configs/demo.yaml", f"data.path={images}", f"train.output_dir={tmp_path / 'run'}"]
    cases = {
        "zero3": (_write(tmp_path / "z3.json", {"zero_optimization": {"stage": 3}}), "ZeRO stage 3"),
        "owned": (_write(tmp_path / "b.json", {"zero_optimization": {"stage": 2}, "train_batch_size": 8}),
                  "train_batch_size"),
        "missing": (tmp_path / "nope.json", "no such file"),
    }
    for name, (path, words) in cases.items():
        assert main([*base, "train.engine=deepspeed", f"train.deepspeed_config={path}"]) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "train.deepspeed_config" in err and words in err, err
    assert main([*base, "train.engine=horovod"]) == 2
    assert "train.engine='horovod'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed
    assert main([*base, "train.engine=deepspeed"]) == 2
    err = capsys.readouterr().err
    assert "fastdino[deepspeed]" in err and "train.engine" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="train.engine"):
        load_config(None, ["train.engine=zero"])


def _fit(tmp_path, out, max_steps, extra=()):
    images = tmp_path / "images"
    if not images.exists():
        image_folder(images, 9)
    cfg = load_config(None, TINY + [f"data.path={images}", f"train.output_dir={out}", "train.engine=deepspeed",
                                    "train.resume=auto", f"train.max_steps={max_steps}", *extra])
    return Trainer(cfg).fit()


def test_resume_continues_a_deepspeed_run_exactly(tmp_path):
    """Stop after 2 iterations, resume to 5 (across the freeze): bitwise the uninterrupted 5 on the CPU. Stochastic
    depth on: a resume that skipped the RNG restore would draw other paths."""
    depth = ["model.drop_path_rate=0.2"]
    _fit(tmp_path, tmp_path / "whole", 5, depth)
    _fit(tmp_path, tmp_path / "parts", 2, depth)
    assert _fit(tmp_path, tmp_path / "parts", 5, depth).steps_done == 5
    whole, parts = load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(tmp_path / "parts" / "last.pt")
    assert whole["step"] == parts["step"] == 5
    for key in ("student", "teacher", "center"):
        for name, value in whole[key].items():
            assert torch.equal(parts[key][name], value), f"{key}.{name}"
    assert parts["deepspeed"]["tag"] == "step5" and (tmp_path / "parts" / "deepspeed" / "step5").is_dir()
    # the plain fastdino checkpoint: what `fastdino knn` reads
    assert main(["export", str(tmp_path / "parts" / "last.pt"), "--format", "official-backbone",
                 "--out", str(tmp_path / "b.pth")]) == 0


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_two_processes_zero2_match_one_process(tmp_path):
    """2 processes (torchrun, gloo) at batch 2 equal 1 process at batch 4 under ZeRO-2, within the tolerances above."""
    images = image_folder(tmp_path / "images", 8)
    common = [*TINY, f"data.path={images}", "train.engine=deepspeed", "train.resume=auto", "train.epochs=2"]
    common = [c for c in common if not c.startswith("data.batch_size")]
    one = subprocess.run([sys.executable, "-m", "fastdino", "train", "configs/demo.yaml", *common,
                          "data.batch_size=4", f"train.output_dir={tmp_path / 'one'}", "dino.head_bn=false"],
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", "-m", "fastdino", "train",
                          "configs/demo.yaml", *common, "data.batch_size=2", f"train.output_dir={tmp_path / 'two'}",
                          "dino.head_bn=false"], capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_checkpoint(tmp_path / "one" / "last.pt"), load_checkpoint(tmp_path / "two" / "last.pt")
    assert a["step"] == b["step"] == 4
    assert_states_close({f"s.{k}": v for k, v in a["student"].items()},
                        {f"s.{k}": v for k, v in b["student"].items()}, lr_bound=2e-3, where="2 processes")
    torch.testing.assert_close(b["center"]["center"], a["center"]["center"], rtol=1e-4, atol=1e-6)


# The README's multi-node launch lines, run on one machine: --nnodes=1 / a hostfile of one host (no ssh here).
LAUNCH_LINES = {
    "torchrun_rendezvous": ["torchrun", "--nnodes=1", "--nproc_per_node=2", "--rdzv_backend=c10d",
                            "--rdzv_endpoint=localhost:29571", "--rdzv_id=fastdino-test", "-m", "fastdino", "train"],
    "deepspeed_hostfile": ["deepspeed", "--hostfile", "{hostfile}", "--no_ssh", "--node_rank=0",
                           "--master_addr=localhost", "--master_port=29572", "--module", "fastdino", "train"],
}


@pytest.mark.parametrize("line", sorted(LAUNCH_LINES))
def test_multi_node_launch_lines_with_one_node(tmp_path, line):
    launcher = LAUNCH_LINES[line][0]
    if shutil.which(launcher) is None:
        pytest.skip(f"{launcher} is not on PATH")
    images = image_folder(tmp_path / "images", 8)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    command = [part.format(hostfile=hostfile) for part in LAUNCH_LINES[line]]
    overrides = [c for c in TINY if not c.startswith("data.batch_size")]
    run = subprocess.run([*command, "configs/demo.yaml", *overrides, "data.batch_size=2", "train.max_steps=2",
                          "dino.head_bn=false", f"data.path={images}", "train.engine=deepspeed",
                          f"train.output_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["step"] == 2 and ckpt["world_size"] == 2


@pytest.mark.parametrize("config", ["zero1_fp16", "zero2_fp16"])
def test_fp16_follows_the_ddp_grad_scaler_and_skips_overflows_everywhere(tmp_path, monkeypatch, config):
    """fp16: torch-autocast fp16 with fp32 weights, our dynamic loss scale, DeepSpeed's global overflow check.

    DeepSpeed's CPU accelerator lists no fp16 and fastdino refuses fp16 on the CPU, so the precision is forced
    here: the math is the GPU's. Against the DDP backend's GradScaler on the same batches (same initial scale
    2^16): loss, gradient norm and weights to the fp32 comparison's tolerances, while the weights stay fp32; an
    injected overflow skips the step of every group and halves the scale, as GradScaler does."""
    import fastdino.engine.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "resolve_precision", lambda precision, device: precision)
    extra = ["train.precision=fp16"]
    ddp = [(m, snapshot(t), float(t.backend.loss_scale())) for m, t in steps(tmp_path, "ddp", 8, extra)]
    skipped = []
    ds_config = [f"train.deepspeed_config=configs/deepspeed/{config}.json"]
    for step, (m, t) in enumerate(steps(tmp_path, "deepspeed", 8, extra + ds_config)):
        ref, ref_state, ref_scale = ddp[step]
        assert float(m["loss"]) == pytest.approx(float(ref["loss"]), rel=1e-5), step
        skipped.append(not torch.isfinite(ref["grad_norm"]))
        assert bool(torch.isfinite(m["grad_norm"])) != skipped[-1], f"step {step}: overflow in one backend only"
        if not skipped[-1]:
            assert float(m["grad_norm"]) == pytest.approx(float(ref["grad_norm"]), rel=1e-4), step
        assert_states_close(ref_state, snapshot(t), lr_bound=2e-3, where=f"fp16 step {step}")
        assert t.backend.scaler.scale == ref_scale, step  # the same scale after every step
    assert any(skipped) and not all(skipped), skipped  # 2^16 overflows at first here, then steps are taken
    assert {p.dtype for p in t.method.student_module().parameters()} == {torch.float32}

    before = snapshot(t)
    student = t.method.student_module()
    hook = student.backbone.blocks[0].attn.qkv.weight.register_hook(lambda g: g * float("inf"))
    gen = torch.Generator().manual_seed(2)
    views = [torch.randn(3, 3, s, s, generator=gen) for s in (32, 32, 24, 24)]
    t.step, scale = 8, t.backend.scaler.scale
    m = t.train_step(views, 2)
    hook.remove()
    assert not torch.isfinite(m["grad_norm"])
    assert t.backend.scaler.scale == scale / 2
    saved = t.backend.state_dict()  # the loss scale travels with DeepSpeed's files in last.pt
    assert saved["deepspeed"]["loss_scale"] == {"scale": scale / 2, "good_steps": 0}
    t.backend.scaler.scale = 1.0
    t.backend.load_state_dict(saved, t.output_dir / "last.pt")
    assert t.backend.scaler.scale == scale / 2
    after = snapshot(t)
    for name, value in before.items():
        if name.startswith("student."):  # no group stepped, weight decay included
            assert torch.equal(after[name], value), name


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_two_processes_fp16_zero2_follow_the_ddp_grad_scaler(tmp_path):
    """fp16 with 2 processes (torchrun, gloo, precision forced on the CPU by tests/fp16_on_cpu.py): ZeRO-2 against
    the DDP engine's GradScaler step, same global batch (2 x 2), 12 iterations from the initial scale 2^16.

    Tolerances: the overflow steps and the loss scale after the run are the same exactly; up to the first step
    taken the weights are untouched, so the losses agree to 1e-6. DeepSpeed's torch-autocast mode reduces the
    gradients of Linear weights in the autocast dtype (fp16: relative rounding 2^-11), DDP in fp32: the first
    step's gradient norm agrees to 1e-4. From there fp16 forward passes amplify the difference (Adam turns the
    rounding noise of near-zero gradients, such as the key part of the qkv bias, into steps of up to lr, and
    fp16 casts of the weights turn those into rounding flips): losses and gradient norms within 1e-3, weights
    within half the peak learning rate (the key part of the qkv bias: 2e-3, as above), center within 1e-4."""
    images = image_folder(tmp_path / "images", 12)  # 3 iterations per epoch
    common = [c for c in TINY if not c.startswith(("data.batch_size", "train.precision", "train.resume"))]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    runs = {}
    for engine, extra in (("ddp", []), ("deepspeed", ["train.deepspeed_config=configs/deepspeed/zero2_fp16.json"])):
        out = tmp_path / engine
        done = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", str(ROOT / "tests" / "fp16_on_cpu.py"),
                               "train", "configs/demo.yaml", *common, f"data.path={images}", "data.batch_size=2",
                               "train.precision=fp16", "train.log_every=1", "dino.head_bn=false",
                               f"train.engine={engine}", *extra, f"train.output_dir={out}"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[engine] = [r for r in rows if "loss" in r], load_checkpoint(out / "last.pt")
    (ddp, a), (ds, b) = runs["ddp"], runs["deepspeed"]
    assert [r["step"] for r in ddp] == [r["step"] for r in ds] == list(range(12))
    taken = [math.isfinite(r["grad_norm"]) for r in ddp]
    assert taken == [math.isfinite(r["grad_norm"]) for r in ds], "an overflow in one engine only"
    assert any(taken) and not all(taken), taken
    first = taken.index(True)
    for r, q in zip(ddp, ds):
        rel = 1e-6 if r["step"] <= first else 1e-3
        assert q["loss"] == pytest.approx(r["loss"], rel=rel), r["step"]
        if math.isfinite(r["grad_norm"]):
            assert q["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-4 if r["step"] == first else 1e-3), r["step"]
    assert b["deepspeed"]["loss_scale"]["scale"] == a["scaler"]["scale"] < 2.0**16
    peak_lr = 0.1 * 4 / 256  # optim.lr x global batch / 256
    for key in ("student", "teacher"):
        for name, x in a[key].items():
            y = b[key][name]
            if name.endswith("attn.qkv.bias"):
                d = x.numel() // 3
                assert (x[d:2 * d] - y[d:2 * d]).abs().max() <= 2e-3, f"{key}.{name} (key part)"
                x, y = torch.cat((x[:d], x[2 * d:])), torch.cat((y[:d], y[2 * d:]))
            torch.testing.assert_close(y, x, rtol=0, atol=peak_lr / 2, msg=f"{key}.{name}")
    torch.testing.assert_close(b["center"]["center"], a["center"]["center"], rtol=0, atol=1e-4)


# -- on CUDA (GPU-marked: they skip without one) -----------------------------------------------------------------


def resume_state(trainer) -> dict[str, torch.Tensor]:
    """What a resume restores: student, teacher, center, and ZeRO's fp32 partitions with their AdamW moments."""
    state = {**snapshot(trainer), "center": trainer.method.center.center.clone()}
    optimizer = trainer.backend.optimizer  # DeepSpeed's ZeRO optimizer around torch AdamW
    for i, part in enumerate(optimizer.single_partition_of_fp32_groups):
        state[f"fp32.{i}"] = part.detach().clone()
        for name, value in optimizer.optimizer.state.get(part, {}).items():
            state[f"adam.{i}.{name}"] = torch.as_tensor(value).clone()
    return state


def _zero_resume_worker(_index: int, root: str, device: str) -> None:
    """Every ZeRO stage x precision in one fresh process: DeepSpeed keeps its process groups in module globals, so
    the group of one it runs on (nccl on CUDA) is opened once here and never mixed with the CPU tests' (gloo)."""
    import fastdino.engine.trainer as trainer_module

    trainer_module.resolve_precision = lambda precision, dev: precision  # fp16 on the CPU (a dry run of this test)
    images = image_folder(Path(root) / "images", 9)
    for stage in (1, 2):
        for precision in ("bf16", "fp16"):
            case = f"ZeRO-{stage} {precision}"
            name = f"zero{stage}" + ("_fp16" if precision == "fp16" else "")
            out = Path(root) / name
            config = TINY + [f"data.path={images}", f"train.output_dir={out}", "train.engine=deepspeed",
                             "train.resume=auto", f"train.device={device}", f"train.precision={precision}",
                             f"train.deepspeed_config=configs/deepspeed/{name}.json"]
            first = Trainer(load_config(None, config + ["train.max_steps=2"]))
            assert first.fit().steps_done == 2, case
            assert torch.distributed.get_backend() == ("nccl" if device == "cuda" else "gloo"), case
            assert {p.dtype for p in first.method.student_module().parameters()} == {torch.float32}, case
            saved = resume_state(first)

            second = Trainer(load_config(None, config + ["train.max_steps=4"]))
            assert second.step == 2, case
            restored = resume_state(second)
            assert restored.keys() == saved.keys(), case
            for key, value in saved.items():
                assert torch.equal(restored[key], value), f"{case}: {key}"
            if precision == "fp16":
                assert second.backend.scaler.state_dict() == first.backend.scaler.state_dict(), case
            result = second.fit()
            assert result.steps_done == 4 and math.isfinite(result.last_loss), case
            ckpt = load_checkpoint(out / "last.pt")
            assert ckpt["step"] == 4 and ckpt["deepspeed"]["stage"] == stage, case


@pytest.mark.gpu
def test_cuda_zero1_zero2_bf16_fp16_resume_restores_every_state(tmp_path):
    """ZeRO-1 and ZeRO-2, bf16 and fp16, on CUDA (NCCL: the center and clipping all-reduces, ZeRO's reductions), in a
    spawned process: 2 iterations, then a resume that restores every state bitwise (the fp16 loss scale too), then
    2 more across the end of the last-layer freeze; the student's weights stay fp32 for the EMA."""
    torch.multiprocessing.start_processes(_zero_resume_worker, args=(str(tmp_path), "cuda"), nprocs=1,
                                          start_method="spawn")


@pytest.mark.gpu
@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not on PATH")
def test_deepspeed_launcher_on_one_gpu(tmp_path):
    """`deepspeed --num_gpus 1 --module fastdino train ...`, as the README writes it for one node: ZeRO-2, bf16."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    images = image_folder(tmp_path / "images", 9)
    out = tmp_path / "run"
    run = subprocess.run(["deepspeed", "--num_gpus", "1", f"--master_port={port}", "--module", "fastdino", "train",
                          "configs/demo.yaml", *TINY, "train.device=cuda", "train.precision=bf16", "dino.head_bn=false",
                          f"data.path={images}", "train.engine=deepspeed", "train.max_steps=2",
                          "train.deepspeed_config=configs/deepspeed/zero2.json", f"train.output_dir={out}"],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["step"] == 2 and ckpt["world_size"] == 1 and ckpt["deepspeed"]["stage"] == 2
    assert json.loads((out / "summary.json").read_text())["device"] == "cuda:0"
