"""Official DINO checkpoints in and out: layouts, round trips, an independent float64 reading of the official
layout, init_from, refusals (pickled objects, wrong flags, other architectures) and the CLI."""

import argparse
import logging

import pytest
import torch
import torch.nn.functional as F

from fastdino.cli import main
from fastdino.config import config_to_dict, load_config
from fastdino.data.demo import make_demo_dataset
from fastdino.engine.checkpoint import CheckpointError, save_checkpoint
from fastdino.engine.trainer import Trainer, train
from fastdino.interop.export import export
from fastdino.interop.official import (
    load_teacher_backbone,
    read_dino_weights,
    to_official,
)
from fastdino.methods import build_method

TINY = [
    "model.arch=vit_tiny", "model.depth=2", "model.patch_size=8", "model.img_size=16", "model.drop_path_rate=0.0",
    "dino.out_dim=32", "dino.hidden_dim=16", "dino.bottleneck_dim=8",
    "data.global_size=16", "data.local_size=8", "data.local_crops_number=2", "data.batch_size=4",
    "data.num_workers=0", "optim.warmup_epochs=1", "train.epochs=2", "train.log_every=1", "train.knn_eval=false",
]
SMALL = ["model.arch=vit_small", "model.depth=2", "model.patch_size=16", "model.img_size=224",
         "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16"]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train_per_class=2, n_val_per_class=1, size=32)


def fastdino_checkpoint(path, overrides):
    """A fastdino checkpoint whose student, teacher, center (and gain, unless fixed) differ from init and each other."""
    cfg = load_config(None, overrides)
    method = build_method(cfg, torch.device("cpu"))
    with torch.no_grad():
        for net in (method.student, method.teacher):
            for name, t in net.state_dict().items():
                fixed_gain = name.endswith("original0") and cfg.dino.norm_last_layer  # stays at 1 in training
                if t.is_floating_point() and not fixed_gain:
                    t.add_(0.05 * torch.randn_like(t))
            for name, t in net.state_dict().items():
                if name.endswith("num_batches_tracked"):
                    t.fill_(7)
    center = {"center": torch.randn(cfg.dino.out_dim)}
    state = {"config": config_to_dict(cfg), "step": 5, "student": method.student.state_dict(),
             "teacher": method.teacher.state_dict(), "center": center}
    save_checkpoint(state, path)
    return state


def official_layout(state, args):
    """What main_dino.py's torch.save writes, restated here from the official code (not from interop.py):
    DDP student keys `module.`, teacher plain (no BN in the head), weight_g / weight_v, dino_loss.center (1, K)."""
    def official(sd, prefix):
        names = {"head.last_layer.parametrizations.weight.original0": "head.last_layer.weight_g",
                 "head.last_layer.parametrizations.weight.original1": "head.last_layer.weight_v"}
        return {prefix + names.get(k, k): v.clone() for k, v in sd.items()}

    return {"student": official(state["student"], "module."), "teacher": official(state["teacher"], ""),
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}, "epoch": 3,
            "args": args, "dino_loss": {"center": state["center"]["center"].reshape(1, -1).clone()},
            "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                            "_growth_tracker": 0}}


def assert_equal_dicts(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("head_bn", [False, True])
def test_round_trip_fastdino_official_fastdino(tmp_path, head_bn):
    src = fastdino_checkpoint(tmp_path / "last.pt", TINY + [f"dino.head_bn={str(head_bn).lower()}",
                                                         "dino.norm_last_layer=false"])
    out = export(tmp_path / "last.pt")
    assert out == tmp_path / "last_official.pth"
    raw = torch.load(out, map_location="cpu", weights_only=True)  # plain tensors: the default torch.load reads it
    assert set(raw) == {"student", "teacher", "dino_loss"}
    assert all(k.startswith("module.") for k in raw["student"])  # the official student is behind DDP
    assert all(k.startswith("module.") == head_bn for k in raw["teacher"])  # the teacher only with BN
    teacher_prefix = "module." if head_bn else ""
    assert raw["teacher"][teacher_prefix + "head.last_layer.weight_g"].shape == (32, 1)
    assert raw["teacher"][teacher_prefix + "head.last_layer.weight_v"].shape == (32, 8)
    assert raw["dino_loss"]["center"].shape == (1, 32)
    back = read_dino_weights(out)
    assert back.kind == "official"
    assert_equal_dicts(back.student, src["student"])
    assert_equal_dicts(back.teacher, src["teacher"])
    assert torch.equal(back.center, src["center"]["center"])
    spec = back.spec
    assert (spec.arch, spec.patch_size, spec.img_size, spec.depth) == ("vit_tiny", 8, 16, 2)
    assert (spec.out_dim, spec.hidden_dim, spec.bottleneck_dim, spec.head_bn) == (32, 16, 8, head_bn)
    assert spec.norm_last_layer is False  # read from the trained gain

    bb = export(tmp_path / "last.pt", tmp_path / "bb.pth", "official-backbone")
    raw_bb = torch.load(bb, map_location="cpu", weights_only=True)
    assert "cls_token" in raw_bb and not any(k.startswith(("backbone.", "head.", "module.")) for k in raw_bb)
    loaded = load_teacher_backbone(bb)
    assert loaded.kind == "official-backbone" and loaded.image_size == 16
    teacher_bb = {k.removeprefix("backbone."): v for k, v in src["teacher"].items() if k.startswith("backbone.")}
    assert_equal_dicts(loaded.model.state_dict(), teacher_bb)


def official_vit_f64(sd, x, num_heads):
    """The official vision_transformer.py forward at the stored size, in float64, reading official key names."""
    sd = {k: v.double() for k, v in sd.items()}
    w = sd["patch_embed.proj.weight"]
    dim, patch = w.shape[0], w.shape[-1]
    t = F.conv2d(x.double(), w, sd["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), t], dim=1) + sd["pos_embed"]
    b, n, _ = t.shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(t, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, n, 3, num_heads, dim // num_heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (dim // num_heads) ** -0.5).softmax(-1)
        t = t + F.linear((attn @ v).transpose(1, 2).reshape(b, n, dim), sd[p + "attn.proj.weight"],
                         sd[p + "attn.proj.bias"])
        h = F.layer_norm(t, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        h = F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        t = t + F.linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return F.layer_norm(t, (dim,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)[:, 0]


def official_head_f64(sd, features):
    """The official DINOHead (no BN): 3-layer GELU MLP, L2 norm, weight-normed last layer w = g v / ||v||."""
    sd = {k: v.double() for k, v in sd.items()}
    h = F.gelu(F.linear(features.double(), sd["mlp.0.weight"], sd["mlp.0.bias"]))
    h = F.gelu(F.linear(h, sd["mlp.2.weight"], sd["mlp.2.bias"]))
    h = F.normalize(F.linear(h, sd["mlp.4.weight"], sd["mlp.4.bias"]), dim=-1)
    g, v = sd["last_layer.weight_g"], sd["last_layer.weight_v"]
    return h @ (g * v / v.norm(dim=1, keepdim=True)).T


def test_official_layout_gives_the_source_class_tokens_and_head_outputs(tmp_path):
    src = fastdino_checkpoint(tmp_path / "last.pt", SMALL + ["dino.norm_last_layer=false"])
    official = export(tmp_path / "last.pt")
    loaded = load_teacher_backbone(official, arch="vit_small", patch_size=16)
    assert loaded.image_size == 224 and loaded.spec.depth == 2
    method = build_method(load_config(None, SMALL), torch.device("cpu")).eval()
    method.teacher.load_state_dict(src["teacher"])
    source = method.teacher.backbone
    for size in (224, 96):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            assert torch.equal(loaded.model(x), source(x)), size
    # the official layout read with the official semantics (float64, written from the official code) gives the
    # source model's class tokens and head outputs: the key mapping, qkv layout and weight norm are the official ones
    raw = torch.load(official, map_location="cpu", weights_only=True)["teacher"]
    backbone = {k.removeprefix("backbone."): v for k, v in raw.items() if k.startswith("backbone.")}
    head = {k.removeprefix("head."): v for k, v in raw.items() if k.startswith("head.")}
    x = torch.randn(2, 3, 224, 224)
    ref_tokens = official_vit_f64(backbone, x, num_heads=6)
    with torch.no_grad():
        tokens = source(x)
        logits = method.teacher([x])
    torch.testing.assert_close(tokens.double(), ref_tokens, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits.double(), official_head_f64(head, ref_tokens), rtol=1e-4, atol=1e-5)


def test_reads_the_official_save_dict_with_args(tmp_path):
    src = fastdino_checkpoint(tmp_path / "last.pt", TINY)
    args = argparse.Namespace(arch="vit_tiny", patch_size=8, out_dim=32, norm_last_layer=False, use_bn_in_head=False,
                              global_crops_scale=(0.4, 1.0), output_dir=".", lr=0.0005)
    torch.save(official_layout(src, args), tmp_path / "checkpoint.pth")
    weights = read_dino_weights(tmp_path / "checkpoint.pth")
    assert weights.kind == "official" and weights.spec.norm_last_layer is False  # from args: the gain cannot say
    assert_equal_dicts(weights.student, src["student"])
    assert_equal_dicts(weights.teacher, src["teacher"])
    assert torch.equal(weights.center, src["center"]["center"])
    # the same file without args and with the gain fixed at 1: norm_last_layer is unknown, not guessed
    layout = official_layout(src, args)
    del layout["args"]
    layout["teacher"]["head.last_layer.weight_g"].fill_(1.0)
    torch.save(layout, tmp_path / "no_args.pth")
    assert read_dino_weights(tmp_path / "no_args.pth").spec.norm_last_layer is None
    # a backbone-only release file under `teacher`, with the prefixes load_pretrained_weights strips
    bb = {"module.backbone." + k.removeprefix("backbone."): v for k, v in src["teacher"].items()
          if k.startswith("backbone.")}
    torch.save({"teacher": bb}, tmp_path / "release.pth")
    loaded = load_teacher_backbone(tmp_path / "release.pth")
    assert loaded.kind == "official-backbone" and loaded.spec.out_dim is None
    assert torch.equal(loaded.model.pos_embed, src["teacher"]["backbone.pos_embed"])


class Payload:
    """Unpickling this would create a file: the refusal must come before any of it runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_objects_are_refused_without_running(tmp_path):
    src = fastdino_checkpoint(tmp_path / "last.pt", TINY)
    marker = tmp_path / "ran"
    layout = official_layout(src, argparse.Namespace(arch="vit_tiny"))
    layout["args"] = Payload(marker)
    torch.save(layout, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"evil.pth holds a pickled Python object \((io|builtins).open\)"):
        read_dino_weights(tmp_path / "evil.pth")
    assert not marker.exists()
    (tmp_path / "junk.pth").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="junk.pth is not a file torch can read: neither a torch.save archive"):
        read_dino_weights(tmp_path / "junk.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pth is not a file torch can read: it is empty"):
        read_dino_weights(tmp_path / "empty.pth")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="resnet.pth holds neither a ViT backbone .* nor a torchvision ResNet's .*"
                                              "fastdino reads ViT-T/S/B and ResNet-18..152 files"):
        load_teacher_backbone(tmp_path / "resnet.pth")


def test_init_from_starts_at_step_0_with_the_files_weights_and_center(demo_root, tmp_path, caplog):
    src = fastdino_checkpoint(tmp_path / "last.pt", TINY)
    official = export(tmp_path / "last.pt")
    out = tmp_path / "run"
    cfg = load_config(None, TINY + [f"data.path={demo_root}", f"train.output_dir={out}", f"train.init_from={official}"])
    trainer = Trainer(cfg)
    assert trainer.step == 0 and not trainer.optimizer.state
    assert_equal_dicts(trainer.method.teacher.state_dict(), src["teacher"])
    assert_equal_dicts(trainer.method.student_module().state_dict(), src["student"])
    assert torch.equal(trainer.method.center.center, src["center"]["center"])
    # one step later the checkpoint is at iteration 1 and the teacher moved from the file's teacher by EMA
    cfg.train.max_steps = 1
    assert Trainer(cfg).fit().steps_done == 1
    ckpt = torch.load(out / "last.pt", weights_only=True)
    w = "backbone.blocks.0.mlp.fc1.weight"
    assert ckpt["step"] == 1 and 0 < (ckpt["teacher"][w] - src["teacher"][w]).abs().max() < 0.05
    # a resumed run ignores init_from and says so
    with caplog.at_level(logging.INFO, logger="fastdino"):
        assert Trainer(cfg).step == 1
    assert "train.init_from" in caplog.text and "ignored" in caplog.text


def test_init_from_refuses_another_architecture_naming_the_keys(demo_root, tmp_path):
    fastdino_checkpoint(tmp_path / "last.pt", TINY)
    official = export(tmp_path / "last.pt")
    base = TINY + [f"data.path={demo_root}", f"train.output_dir={tmp_path / 'run'}", f"train.init_from={official}"]
    with pytest.raises(CheckpointError, match=r"model.depth: file 2 vs config 3; dino.out_dim: file 32 vs config 64"):
        Trainer(load_config(None, base + ["dino.out_dim=64", "model.depth=3"]))
    with pytest.raises(CheckpointError, match=r"model.patch_size: file 8 vs config 4"):
        Trainer(load_config(None, base + ["model.patch_size=4"]))
    with pytest.raises(CheckpointError, match="nope.pth does not exist"):
        Trainer(load_config(None, base + [f"train.init_from={tmp_path / 'nope.pth'}"]))
    assert not (tmp_path / "run").exists()


def test_init_from_a_backbone_alone_sets_both_backbones(demo_root, tmp_path):
    src = fastdino_checkpoint(tmp_path / "last.pt", TINY)
    bb = export(tmp_path / "last.pt", fmt="official-backbone")
    cfg = load_config(None, TINY + [f"data.path={demo_root}", f"train.output_dir={tmp_path / 'run'}",
                                    f"train.init_from={bb}"])
    trainer = Trainer(cfg)
    for net in (trainer.method.teacher, trainer.method.student_module()):
        state = net.state_dict()
        assert torch.equal(state["backbone.pos_embed"], src["teacher"]["backbone.pos_embed"])
        assert not torch.equal(state["head.mlp.0.weight"], src["teacher"]["head.mlp.0.weight"])
    assert trainer.method.center.center.abs().sum() == 0


def test_cli_knn_on_an_official_file_and_refusals(demo_root, tmp_path, capsys):
    train(load_config(None, TINY + [f"data.path={demo_root}", f"train.output_dir={tmp_path / 'run'}",
                                    "train.max_steps=1"]))
    ckpt = tmp_path / "run" / "last.pt"
    assert main(["export", str(ckpt), "--out", str(tmp_path / "official.pth")]) == 0
    assert "official.pth" in capsys.readouterr().out
    data = ["--train", str(demo_root / "train"), "--val", str(demo_root / "val"), "--num-workers", "0"]
    assert main(["knn", "--checkpoint", str(tmp_path / "official.pth"), "--arch", "vit_tiny", "--patch-size", "8",
                 *data]) == 0
    official_out = capsys.readouterr().out
    assert "k-NN top-1 (k=20, T=0.07)" in official_out
    assert main(["knn", "--checkpoint", str(ckpt), *data]) == 0  # fastdino checkpoints need no flags
    assert capsys.readouterr().out == official_out  # the same teacher, the same figure
    for flags, named in ((["--arch", "vit_small"], "--arch vit_small"), (["--patch-size", "16"], "--patch-size 16"),
                         (["--arch", "vit_huge"], "--arch vit_huge")):
        assert main(["knn", "--checkpoint", str(tmp_path / "official.pth"), *flags, *data]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and named in err, err
    assert main(["export", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.pt does not exist" in err
    assert main(["export", str(ckpt), "--out", str(ckpt)]) == 2
    assert "overwrite" in capsys.readouterr().err


def test_to_official_refuses_a_backbone_alone(tmp_path):
    fastdino_checkpoint(tmp_path / "last.pt", TINY)
    bb = export(tmp_path / "last.pt", fmt="official-backbone")
    with pytest.raises(CheckpointError, match="no DINO head.*official-backbone"):
        to_official(read_dino_weights(bb))
