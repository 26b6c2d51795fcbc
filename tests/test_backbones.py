"""Backbones other than fastdino's ViT (issue 22): torchvision ResNets and timm models through
models/backbones.build_backbone, their config refusals, BatchNorm (the teacher's own statistics, the CPU fallback of
SyncBatchNorm), SGD and LARS as the official code, FLOPs, and a timm model that trains and resumes bitwise; the
feature width of timm models with a conv head after pooling, and crop sizes a backbone cannot take refused at
start-up in one line."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.distributed as dist
import torchvision
from interop_cases import checkpoint
from test_official_convnet_step import official_lars_step
from torch import nn

from fastdino.cli import main
from fastdino.config import ConfigError, load_config
from fastdino.data.demo import make_demo_dataset
from fastdino.engine.checkpoint import load_checkpoint
from fastdino.engine.distributed import DistInfo, sync_batchnorm
from fastdino.engine.ema import TeacherEMA
from fastdino.engine.optim import LARS, make_optimizer, step_skipping_nonfinite
from fastdino.engine.trainer import train
from fastdino.models.backbones import build_backbone, check_crop_sizes, feature_dim, has_batchnorms
from fastdino.models.flops import backbone_forward_flops, counted_forward_flops

timm = pytest.importorskip("timm")  # the `timm` extra (in `dev`)

SMALL_TIMM = "timm/test_resnet"  # timm's 0.4M-parameter test ResNet: BatchNorm, 96 features


def test_torchvision_resnet_is_the_official_backbone():
    """fc replaced by an identity: pooled 512 features, torchvision's keys without fc.*, loads strictly into
    torchvision's resnet18() with fc = Identity() and gives the same features."""
    model, dim = build_backbone("resnet18")
    assert dim == 512 == feature_dim(model)
    reference = torchvision.models.resnet18()
    reference.fc = nn.Identity()
    assert set(model.state_dict()) == set(reference.state_dict())
    assert not any(k.startswith("fc.") for k in model.state_dict())
    reference.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    model.eval(), reference.eval()
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    assert model(x).shape == (2, 512)
    assert has_batchnorms(model)


def test_timm_and_vit_backbones_give_pooled_features():
    model, dim = build_backbone(SMALL_TIMM)
    assert dim == timm.create_model("test_resnet", num_classes=0).num_features == feature_dim(model)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, dim)
    vit, dim = build_backbone("vit_tiny", depth=1, img_size=32, patch_size=16)
    assert dim == 192 and vit(torch.randn(2, 3, 32, 32)).shape == (2, 192) and not has_batchnorms(vit)
    with pytest.raises(TypeError, match="ViT settings"):
        build_backbone("resnet18", patch_size=8)


@pytest.mark.parametrize("name,wider", [
    ("mobilenetv3_small_050", True), ("mobilenetv4_conv_small", True), ("lcnet_050", True), ("ghostnet_100", True),
    ("convnext_atto", False), ("regnetx_002", False),
])
def test_timm_feature_width_is_what_the_model_returns(name, wider):
    """num_classes=0 returns timm's pre-logits features: for MobileNetV3/V4, GhostNet and LCNet a conv head after
    pooling makes them wider than num_features (the head was sized from num_features: a shape error on step 1)."""
    model, dim = build_backbone(f"timm/{name}")
    assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, dim) and feature_dim(model) == dim
    assert (dim != model.num_features) == wider


def test_a_timm_model_with_a_conv_head_trains_probes_and_exports(demo_root, tmp_path, capsys):
    """The trial's blocker: timm/mobilenetv3_small_050 (1024 features, 288 channels) takes a training step; its
    checkpoint's linear probe reads 1024 features, and timm loads its export with the teacher's features (config.json's
    num_features: timm's 288, as timm writes it)."""
    run = TIMM_RUN + [f"data.path={demo_root}", "model.arch=timm/mobilenetv3_small_050", "train.max_steps=1",
                      f"train.output_dir={tmp_path}"]
    result = train(load_config(None, run))
    assert result.steps_done == 1 and torch.isfinite(torch.tensor(result.last_loss))
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["student"]["head.mlp.0.weight"].shape[1] == 1024
    data = ["--train", str(demo_root / "train"), "--val", str(demo_root / "val"), "--num-workers", "0",
            "--device", "cpu"]
    assert main(["linear", "--checkpoint", str(tmp_path / "last.pt"), *data, "--epochs", "1"]) == 0
    assert "pooled features (1024 wide)" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "last.pt"), "--format", "timm", "--out", str(tmp_path / "timm")]) == 0
    model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    ours, _ = build_backbone("timm/mobilenetv3_small_050")
    ours.load_state_dict({k.removeprefix("backbone."): v for k, v in ckpt["teacher"].items()
                          if k.startswith("backbone.")})
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ours.eval()(x), atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "timm" / "config.json").read_text())["num_features"] == model.num_features == 288


@pytest.mark.parametrize("arch,sizes,line", [
    ("timm/convnext_atto", ["data.local_size=24"],
     "data.local_size=24: timm/convnext_atto cannot take 24 px crops (Calculated padded input size"),
    ("timm/vit_tiny_patch16_224", ["data.global_size=32", "data.local_crops_number=0"],
     "data.global_size=32: timm/vit_tiny_patch16_224 cannot take 32 px crops (Input height (32) doesn't match "
     "model (224).); it takes only 224 px images"),
])
def test_a_crop_the_backbone_cannot_take_is_one_line_exit_2(demo_root, tmp_path, capsys, arch, sizes, line):
    """The trial's tracebacks on step 1 (a convnet shrinking a 24 px crop below a kernel, a timm ViT built for
    224 px) are refused at start-up: one line naming the key, nothing written."""
    run = TIMM_RUN + [f"data.path={demo_root}", f"model.arch={arch}", *sizes, f"train.output_dir={tmp_path}/r"]
    assert main(["train", "configs/demo_convnet.yaml", *run]) == 2
    err = capsys.readouterr().err
    assert line in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", ["knn", "linear", "finetune"])
def test_an_evaluation_size_the_backbone_cannot_take_is_one_line_exit_2(demo_root, tmp_path, capsys, command):
    """knn, linear and finetune run the backbone once at --image-size before reading any image."""
    checkpoint(tmp_path / "last.pt", ["model.arch=timm/convnext_atto", "data.global_size=32"])
    data = ["--train", str(demo_root / "train"), "--val", str(demo_root / "val"), "--num-workers", "0",
            "--device", "cpu", "--image-size", "24"]
    src = [str(tmp_path / "last.pt")] if command == "finetune" else ["--checkpoint", str(tmp_path / "last.pt")]
    assert main([command, *src, *data]) == 2
    err = capsys.readouterr().err
    assert "--image-size=24: timm/convnext_atto cannot take 24 px crops (Calculated padded" in err, err
    assert err.endswith("use a larger --image-size\n") and err.count("\n") == 1, err


def test_the_crop_check_changes_nothing():
    """check_crop_sizes on a model with BatchNorm and dropout in train mode, passing and failing: parameters,
    running statistics, train/eval flags and the RNG (what a bitwise resume compares) are as before."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model[2].eval()  # a mixed state is restored as it was
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    check_crop_sizes(model, "timm/tiny", {"data.global_size": 8, "data.local_size": 3})
    refused = r"^data.local_size=2: timm/tiny cannot take 2 px crops \(.*Kernel size.*\); use a larger data.local_size$"
    with pytest.raises(ConfigError, match=refused):
        check_crop_sizes(model, "timm/tiny", {"data.global_size": 8, "data.local_size": 2})
    assert torch.equal(torch.get_rng_state(), rng) and [m.training for m in model.modules()] == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


class _EvalCache(nn.Module):
    """As timm's LeViT / TinyViT attention: an eval forward caches a tensor that only its own train() drops."""

    def __init__(self, failure: str = ""):
        super().__init__()
        self.conv, self.cache, self.failure = nn.Conv2d(3, 2, 1), {}, failure

    def train(self, mode: bool = True):
        self.cache.clear()
        return super().train(mode)

    def forward(self, x):
        if self.failure:
            raise RuntimeError(self.failure)
        if not self.training:
            self.cache["bias"] = self.conv.weight.clone()
        return self.conv(x).mean((2, 3))


def test_the_crop_check_leaves_no_eval_cache_and_lets_device_failures_through():
    """An eval-time cache filled by the check would outlive the weights a resume or init_from loads next; a CUDA or
    allocator error is the device's, never "cannot take N px crops"."""
    model = _EvalCache()
    check_crop_sizes(model, "timm/cached", {"data.global_size": 8})
    assert model.cache == {} and model.training
    for failure in ("CUDA error: no kernel image is available for execution on the device",
                    "cuDNN error: CUDNN_STATUS_NOT_INITIALIZED", "DefaultCPUAllocator: can't allocate memory"):
        with pytest.raises(RuntimeError, match=failure.split(":")[0]) as raised:
            check_crop_sizes(_EvalCache(failure), "timm/cached", {"data.global_size": 8})
        assert not isinstance(raised.value, ConfigError)


@pytest.mark.parametrize("overrides,key", [
    (["model.arch=timm/no_such_model"], "model.arch='timm/no_such_model': timm has no model"),
    (["model.arch=resnet17"], "model.arch='resnet17' is not one of"),
    (["model.arch=resnet18", "model.patch_size=8"], "model.patch_size=8 applies to ViTs only"),
    (["model.arch=resnet18", "model.attention=math"], "model.attention='math' applies to ViTs only"),
    (["model.arch=resnet18", "model.pos_embed_interp=exact"], "model.pos_embed_interp='exact' applies to ViTs"),
    (["model.arch=resnet18", "model.grad_checkpointing=true"], "model.grad_checkpointing=True applies to ViTs"),
    (["model.arch=resnet18", "train.method=sit"], "train.method='sit' reads the ViT's patch tokens"),
    (["optim.name=lars", "train.engine=deepspeed"], "optim.name=lars needs each parameter whole"),
    (["optim.name=adam"], "optim.name='adam' is not one of"),
])
def test_refusals_are_one_line_exit_2(tmp_path, capsys, overrides, key):
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  epochs: 1\n")
    assert main(["train", str(config), *overrides, f"train.output_dir={tmp_path}/r"]) == 2
    err = capsys.readouterr().err
    assert key in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_timm_not_installed_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    assert main(["train", "configs/resnet50.yaml", f"model.arch={SMALL_TIMM}", f"train.output_dir={tmp_path}/r"]) == 2
    err = capsys.readouterr().err
    assert "model.arch='timm/test_resnet': needs the timm package" in err and "fastdino[timm]" in err
    assert err.count("\n") == 1


def test_convnet_takes_crop_sizes_of_any_multiple():
    """The crop sizes need not be multiples of a patch for a convnet (they must for a ViT)."""
    cfg = load_config(None, ["model.arch=resnet18", "data.global_size=36", "data.local_size=20"])
    assert cfg.data.global_size == 36
    with pytest.raises(ConfigError, match="not a multiple of model.patch_size"):
        load_config(None, ["data.global_size=36"])


def test_lars_matches_the_official_lars_in_float64():
    """Steps of LARS over two parameter groups (regularised matrices, unregularised 1-D parameters; a zero matrix
    takes the trust ratio 1; a parameter without gradient is skipped) against utils.LARS restated per parameter."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (5, 2, 3, 3), (6,), (3, 2)]
    params = [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
    params[3].data.zero_()
    groups = [{"params": [params[0], params[1], params[3]]}, {"params": [params[2]], "weight_decay": 0.0}]
    opt = LARS(groups)
    ref = {i: (p.detach().clone(), None) for i, p in enumerate(params)}
    for step, (lr, wd) in enumerate([(0.5, 0.1), (2.0, 0.3), (1.0, 0.0)]):
        opt.param_groups[0].update(lr=lr, weight_decay=wd)
        opt.param_groups[1].update(lr=lr)
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if (step == 1 and i == 1) else g.clone()
        opt.step()
        for i, g in enumerate(grads):
            if step == 1 and i == 1:
                continue
            p0, mu = ref[i]
            ref[i] = official_lars_step(p0, g, mu, lr, wd if i != 2 else 0.0)
        for i, p in enumerate(params):
            torch.testing.assert_close(p.detach(), ref[i][0], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", ["sgd", "lars"])
def test_skipped_first_step_changes_nothing_then_steps_as_if_first(name):
    """A non-finite first step is skipped on the device (no host read): parameters unchanged, and the next step
    equals a first step of the same optimizer (fused SGD's own first step would leave uninitialised buffers)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    twin = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    twin.load_state_dict(net.state_dict())
    groups = [{"params": list(net.parameters()), "regularized": True}]
    opt = make_optimizer(name, groups, fused=True)
    twin_opt = make_optimizer(name, [{"params": list(twin.parameters()), "regularized": True}], fused=False)
    for o in (opt, twin_opt):
        o.param_groups[0].update(lr=0.1, weight_decay=0.01)
    before = [p.detach().clone() for p in net.parameters()]
    for p in net.parameters():
        p.grad = torch.full_like(p, float("nan"))
    step_skipping_nonfinite(opt, torch.tensor(False))
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))
    grads = [torch.randn_like(p) for p in net.parameters()]
    for p, q, g in zip(net.parameters(), twin.parameters(), grads):
        p.grad, q.grad = g.clone(), g.clone()
    step_skipping_nonfinite(opt, torch.tensor(True))
    twin_opt.step()
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert not any(torch.equal(a, p) for a, p in zip(before, net.parameters()))


def test_teacher_batchnorm_statistics_are_its_own():
    """The EMA moves parameters only (official): the teacher's BN running statistics come from its own forward
    and an update leaves them as they are."""
    student, _ = build_backbone(SMALL_TIMM)
    teacher, _ = build_backbone(SMALL_TIMM)
    teacher.load_state_dict(student.state_dict())
    ema = TeacherEMA(student, teacher, impl="foreach")
    student(torch.randn(4, 3, 32, 32))  # the student's statistics move
    with torch.no_grad():
        teacher(torch.randn(4, 3, 32, 32) + 1.0)  # the teacher's, by other images
    buffers = {k: v.clone() for k, v in teacher.named_buffers()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema.update(0.5)
    assert all(torch.equal(buffers[k], v) for k, v in teacher.named_buffers())
    s_bufs = dict(student.named_buffers())
    assert any(not torch.equal(s_bufs[k], v) for k, v in buffers.items() if k.endswith("running_mean"))
    p_s, p_t = next(student.parameters()), next(teacher.parameters())
    assert not torch.equal(p_s, p_t)


def test_syncbatchnorm_conversion_and_its_cpu_fallback():
    """Several CUDA processes: BatchNorm -> SyncBatchNorm (official has_batchnorms); a network without BN is left
    alone. CPU processes keep plain BatchNorm, because torch's SyncBatchNorm refuses CPU tensors (this test fails
    when torch starts to allow them: then use it on the CPU too)."""
    model, _ = build_backbone("resnet18")
    two = DistInfo(rank=0, world_size=2, local_rank=0)
    converted = sync_batchnorm(model, two, torch.device("cuda"))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    assert sync_batchnorm(model, two, torch.device("cpu")) is model
    vit, _ = build_backbone("vit_tiny", depth=1, img_size=32, patch_size=16)
    assert sync_batchnorm(vit, two, torch.device("cuda")) is vit
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
            nn.SyncBatchNorm(3).train()(torch.randn(2, 3, 4, 4))
    finally:
        dist.destroy_process_group()


def test_flops_of_a_convnet_are_counted():
    vit, _ = build_backbone("vit_small")
    assert counted_forward_flops(vit, 224) == pytest.approx(backbone_forward_flops(vit, 224), rel=1e-9)
    resnet50, _ = build_backbone("resnet50")
    assert backbone_forward_flops(resnet50, 224) == pytest.approx(2 * 4.09e9, rel=0.01)  # 4.09 GMAC (torchvision)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train_per_class=2, n_val_per_class=1, size=32)


TIMM_RUN = [f"model.arch={SMALL_TIMM}", "optim.name=sgd", "optim.lr=0.3", "dino.out_dim=32", "dino.hidden_dim=16",
            "dino.bottleneck_dim=8", "data.global_size=32", "data.local_size=16", "data.local_crops_number=2",
            "data.batch_size=4", "data.num_workers=0", "optim.warmup_epochs=1", "train.epochs=2",
            "train.log_every=1", "train.knn_eval=false", "train.device=cpu"]


def test_timm_backbone_trains_and_resumes_bitwise(demo_root, tmp_path):
    """A timm convnet through the same path: N steps in one go == k steps, stop, resume: student, teacher (their BN
    running statistics included), center and SGD momentum buffers equal bitwise."""
    run = TIMM_RUN + [f"data.path={demo_root}"]
    train(load_config(None, run + [f"train.output_dir={tmp_path / 'once'}"]))
    train(load_config(None, run + [f"train.output_dir={tmp_path / 'twice'}", "train.max_steps=4"]))
    train(load_config(None, run + [f"train.output_dir={tmp_path / 'twice'}"]))
    once, twice = load_checkpoint(tmp_path / "once" / "last.pt"), load_checkpoint(tmp_path / "twice" / "last.pt")
    assert once["step"] == twice["step"] == 6
    assert any(k.endswith("running_var") for k in once["teacher"])
    for part in ("student", "teacher"):
        assert once[part].keys() == twice[part].keys()
        for k in once[part]:
            assert torch.equal(once[part][k], twice[part][k]), (part, k)
    weights = [k for k, v in once["student"].items() if v.dim() == 4]
    assert not torch.equal(once["student"][weights[0]], once["teacher"][weights[0]])  # trained; the teacher lags
    assert torch.equal(once["center"]["center"], twice["center"]["center"])
    for sa, sb in zip(once["optimizer"]["state"].values(), twice["optimizer"]["state"].values()):
        assert sa.keys() == {"momentum_buffer"} and torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
