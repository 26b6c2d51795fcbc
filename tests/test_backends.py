"""The backend interface (engine/backends/): the DDP backend's step semantics, which the DeepSpeed one
reproduces, and the DeepSpeed settings filled from our config (no deepspeed import needed)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fastdino.config import ConfigError, load_config
from fastdino.engine.backends import build_backend
from fastdino.engine.backends.base import autocast_for
from fastdino.engine.backends.deepspeed import deepspeed_config, split_groups
from fastdino.engine.distributed import DistInfo
from fastdino.engine.optim import param_groups
from fastdino.methods.base import Method


class Tiny(Method):
    """Two linear layers; `out` is frozen in epoch 0 (as DINO's last layer)."""

    def __init__(self):
        super().__init__()
        self.student = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
        self.teacher = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))

    def frozen_parameters(self, epoch):
        return list(self.student_module()[1].parameters()) if epoch == 0 else []


def test_ddp_backend_step_clips_each_parameter_and_skips_frozen_ones(tmp_path):
    cfg = load_config(None, ["optim.clip_grad=0.5", f"train.output_dir={tmp_path}"])
    backend = build_backend(cfg, DistInfo(), torch.device("cpu"), "fp32")
    method = Tiny()
    backend.wrap(method)
    backend.set_schedules(1e-2, 0.5)
    assert [g["weight_decay"] for g in backend.optimizer.param_groups] == [0.5, 0.0]
    before = {k: v.clone() for k, v in method.student.state_dict().items()}
    x = torch.randn(5, 4, dtype=torch.float64).float()
    loss = (method.student(x) ** 2).sum() * 100
    backend.backward(loss)
    raw = {n: p.grad.double().norm() for n, p in method.student.named_parameters()}
    norm = backend.step(epoch=0, loss_finite=torch.tensor(True))
    assert float(norm) == pytest.approx(float(torch.stack(list(raw.values())).norm()), rel=1e-6)
    for n, p in method.student.named_parameters():
        if n.startswith("1."):  # frozen: no gradient, no update, no Adam state (so no step count either)
            assert p.grad is None and torch.equal(p, before[n]) and p not in backend.optimizer.state
        else:
            assert float(p.grad.double().norm()) == pytest.approx(min(0.5, float(raw[n])), rel=1e-5)
            assert not torch.equal(p, before[n])


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("bad", ["loss", "gradient"])
def test_ddp_backend_skips_a_non_finite_step_whole(tmp_path, fused, bad):
    """A NaN loss (the trainer's device flag) or a NaN gradient with a finite loss: no weight, Adam moment or step
    count changes (fused AdamW: its device-side found_inf; otherwise a host read), and the next good step is the
    step a run without the bad one takes."""
    cfg = load_config(None, [f"optim.fused={str(fused).lower()}", f"train.output_dir={tmp_path}"])
    runs = []
    for poison in (False, True):
        torch.manual_seed(0)
        backend = build_backend(cfg, DistInfo(), torch.device("cpu"), "fp32")
        method = Tiny()
        backend.wrap(method)
        assert backend.optimizer.defaults["fused"] == (True if fused else None)
        backend.set_schedules(1e-2, 0.5)
        x = torch.randn(5, 4)
        if poison:
            backend.backward((method.student(x) ** 2).sum())
            if bad == "gradient":
                next(method.student.parameters()).grad[0, 0] = float("nan")
            before = {k: v.clone() for k, v in method.student.state_dict().items()}
            backend.step(epoch=1, loss_finite=torch.tensor(bad != "loss"))
            assert all(torch.equal(v, before[k]) for k, v in method.student.state_dict().items())
            assert all(float(st["step"]) == 0 for st in backend.optimizer.state.values())
        backend.backward((method.student(x) ** 2).sum())
        backend.step(epoch=1, loss_finite=torch.tensor(True))
        runs.append(method.student.state_dict())
    for name, value in runs[0].items():
        assert torch.equal(runs[1][name], value), name


def test_autocast_only_below_fp32():
    assert not torch.is_autocast_enabled("cpu")
    with autocast_for("bf16", torch.device("cpu")):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    with autocast_for("fp32", torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")


def test_split_groups_keeps_group_settings_and_separates_freezable_parameters():
    net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    groups = split_groups(param_groups(net), {id(p) for p in net[2].parameters()})
    assert [(g["regularized"], g["freezable"], len(g["params"])) for g in groups] == [
        (True, False, 1), (True, True, 1), (False, False, 3), (False, True, 1)]
    assert all(g["weight_decay"] == 0.0 for g in groups if not g["regularized"])


def test_deepspeed_config_filled_from_ours(tmp_path):
    ds = deepspeed_config("configs/deepspeed/zero2.json", batch_size=3, world_size=4, precision="bf16")
    batch = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    assert [ds[k] for k in batch] == [12, 3, 1]
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in ds
    assert ds["gradient_clipping"] == 0.0 and ds["zero_optimization"]["stage"] == 2
    assert "torch_autocast" not in deepspeed_config("configs/deepspeed/zero1.json", 3, 1, "fp32")
    bad = {"stage 0": ({"zero_optimization": {"stage": 0}}, "stage=0"),
           "twice": ({"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}, "bf16 (set by train.precision)"),
           "offload": ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, "offload")}
    for name, (content, words) in bad.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(content))
        with pytest.raises(ConfigError, match="train.deepspeed_config") as info:
            deepspeed_config(str(path), 3, 1, "fp32")
        assert words in str(info.value), name
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(ConfigError, match="not a readable JSON"):
        deepspeed_config(str(tmp_path / "junk.json"), 3, 1, "fp32")
    fp16 = deepspeed_config("configs/deepspeed/zero2_fp16.json", 3, 1, "fp16")  # fp32 weights, our loss scale
    assert fp16["torch_autocast"] == {"enabled": True, "dtype": "float16"} and "fp16" not in fp16
    assert fp16["fastdino_fp16"] == {"init_scale": 2.0**16, "growth_interval": 2000}
    for section, word in (({"loss_scale": 128}, "loss_scale=128"), ({"hysteresis": 2}, "hysteresis")):
        (tmp_path / "fp16.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "fp16": section}))
        with pytest.raises(ConfigError, match="train.deepspeed_config") as info:
            deepspeed_config(str(tmp_path / "fp16.json"), 3, 1, "fp16")
        assert word in str(info.value)
