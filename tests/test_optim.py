"""Parameter groups, per-parameter clipping as the official code, frozen last layer."""

import torch

from fastdino.config import load_config
from fastdino.engine.optim import build_optimizer, clip_gradients_per_param, param_groups, set_schedules
from fastdino.methods.dino import DINO


def small_method(**over):
    overrides = ["model.arch=vit_tiny", "model.depth=1", "model.img_size=32", "model.patch_size=8",
                 "dino.out_dim=16", "dino.hidden_dim=8", "dino.bottleneck_dim=4"]
    overrides += [f"{k}={v}" for k, v in over.items()]
    return DINO(load_config(None, overrides), torch.device("cpu"))


def test_param_group_split_follows_official_rule():
    student = small_method().student
    decay, no_decay = param_groups(student)
    named = dict(student.named_parameters())
    name_of = {id(p): n for n, p in named.items()}
    decay_names = {name_of[id(p)] for p in decay["params"]}
    no_decay_names = {name_of[id(p)] for p in no_decay["params"]}
    expected_no_decay = {n for n, p in named.items() if p.requires_grad and (n.endswith(".bias") or p.ndim == 1)}
    assert no_decay_names == expected_no_decay
    assert "backbone.cls_token" in decay_names and "backbone.blocks.0.attn.qkv.weight" in decay_names
    assert "backbone.norm.weight" in no_decay_names and "head.mlp.0.bias" in no_decay_names
    # the fixed weight-norm gain is not trained at all
    assert "head.last_layer.parametrizations.weight.original0" not in decay_names | no_decay_names
    assert no_decay["weight_decay"] == 0.0


def test_schedules_reach_the_right_groups():
    opt = build_optimizer(small_method().student, "adamw", fused=True)
    set_schedules(opt, lr=0.1, weight_decay=0.3)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]


def test_per_parameter_clipping_matches_official_loop():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (3, 50, 7)]
    for p, scale in zip(params, (0.1, 10.0, 2.9)):
        p.grad = torch.randn_like(p) * scale
    expected = []
    for p in params:  # the official utils.clip_gradients
        g = p.grad.clone()
        coef = 3.0 / (g.norm(2) + 1e-6)
        expected.append(g * coef if coef < 1 else g)
    total_before = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    total = clip_gradients_per_param(params, 3.0)
    torch.testing.assert_close(total, total_before)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e)
    assert all(p.grad.norm() <= 3.0 + 1e-5 for p in params)


def test_last_layer_gradients_cancelled_during_first_epoch_only():
    method = small_method(**{"dino.freeze_last_layer_epochs": 1})
    for p in method.student.parameters():
        p.grad = torch.ones_like(p) if p.requires_grad else None
    method.before_optimizer_step(epoch=0)
    grads = {n: p.grad for n, p in method.student.named_parameters()}
    assert grads["head.last_layer.parametrizations.weight.original1"] is None
    assert grads["head.mlp.0.weight"] is not None
    for p in method.student.parameters():
        p.grad = torch.ones_like(p) if p.requires_grad else None
    method.before_optimizer_step(epoch=1)
    assert method.student.head.last_layer.parametrizations.weight.original1.grad is not None
