"""Linear probe: separable features are learned, the ViT-S / ViT-B feature rules against hooks on the
model, top-1/top-5 against a loop, the cached sweep equals the image path, unreadable images, the CLI."""

import pytest
import torch

from fastdino.cli import main
from fastdino.config import config_to_dict, load_config
from fastdino.data.demo import make_demo_dataset
from fastdino.data.files import index_image_folder
from fastdino.data.multicrop import eval_transform
from fastdino.engine.checkpoint import save_checkpoint
from fastdino.eval.linear import (
    LinearProbes,
    ProbeImages,
    cached_batches,
    evaluate_probes,
    extract_features,
    feature_dim,
    image_batches,
    linear_probe,
    probe_features,
    resolve_feature_mode,
    train_linear_probes,
)
from fastdino.methods import build_method
from fastdino.models.vit import build_backbone


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train_per_class=3, n_val_per_class=2, size=32)
    (root / "train" / "dots" / "0000_bad.jpg").write_bytes(b"\xff\xd8 truncated")
    (root / "val" / "grid" / "0000_bad.jpg").write_bytes(b"junk")
    return root


def test_separable_features_reach_high_accuracy():
    centres = 4 * torch.nn.functional.normalize(torch.randn(10, 32), dim=1)
    labels = torch.randint(0, 10, (1200,))
    x = centres[labels] + 0.7 * torch.randn(1200, 32)  # a linear rule (nearest centre) is ~100% right
    f_train, l_train, f_test, l_test = x[:1000], labels[:1000], x[1000:], labels[1000:]
    oracle = ((f_test[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
    assert (oracle == l_test).float().mean() > 0.98
    for epochs, lo, hi in ((0, 0.0, 40.0), (10, 95.0, 100.0)):
        batches = cached_batches(f_train, l_train, torch.ones(1000, dtype=torch.bool), 64, seed=0)
        probes = train_linear_probes(batches, 32, 10, [0.01, 0.1], epochs=epochs, batch_size=64, seed=7)
        top1, top5 = evaluate_probes(probes, f_test, l_test)
        assert all(lo <= t <= hi for t in top1), (epochs, top1)
    assert top5 == [100.0, 100.0]


def test_top1_top5_match_a_loop():
    probes = LinearProbes(8, 7, 2)
    with torch.no_grad():
        probes.layers[1].weight.normal_()
    f, labels = torch.randn(50, 8), torch.randint(0, 7, (50,))
    top1, top5 = evaluate_probes(probes, f, labels)
    for i, layer in enumerate(probes.layers):
        logits = (f.double() @ layer.weight.double().T + layer.bias.double()).tolist()
        ranks = [sorted(range(7), key=lambda c, row=row: -row[c]) for row in logits]
        assert top1[i] == pytest.approx(100 * sum(r[0] == y for r, y in zip(ranks, labels.tolist())) / 50)
        assert top5[i] == pytest.approx(100 * sum(y in r[:5] for r, y in zip(ranks, labels.tolist())) / 50)
    assert evaluate_probes(LinearProbes(8, 3, 1), f, labels % 3)[1] == [None]  # no top-5 below 5 classes


def _hooked(backbone, x):
    """The blocks' outputs and the final norm's output, caught by forward hooks on a plain forward."""
    seen = {"blocks": []}
    hooks = [b.register_forward_hook(lambda m, i, o: seen["blocks"].append(o)) for b in backbone.blocks]
    hooks.append(backbone.norm.register_forward_hook(lambda m, i, o: seen.__setitem__("norm", o)))
    cls = backbone(x)
    for h in hooks:
        h.remove()
    return cls, seen


def test_feature_rules_vit_small_cls4_and_vit_base_cls_avgpool():
    assert [resolve_feature_mode("auto", d) for d in (192, 384, 768)] == ["cls4", "cls4", "cls_avgpool"]
    x = torch.randn(2, 3, 16, 16)
    small = build_backbone("vit_small", depth=5, patch_size=8, img_size=16).eval()
    feats = probe_features(small, x, "auto")
    assert feats.shape == (2, 4 * 384) == (2, feature_dim(small, "auto"))
    cls, seen = _hooked(small, x)
    ref = torch.cat([small.norm(out)[:, 0] for out in seen["blocks"][-4:]], dim=1)
    torch.testing.assert_close(feats, ref)
    torch.testing.assert_close(feats[:, -384:], cls)

    base = build_backbone("vit_base", depth=1, patch_size=8, img_size=16).eval()
    feats = probe_features(base, x, "auto")
    assert feats.shape == (2, 2 * 768) == (2, feature_dim(base, "auto"))
    cls, seen = _hooked(base, x)
    torch.testing.assert_close(feats[:, 0::2], cls)  # interleaved per channel, as the official code orders them
    torch.testing.assert_close(feats[:, 1::2], seen["norm"][:, 1:].mean(1))
    shallow = build_backbone("vit_tiny", depth=2, patch_size=8, img_size=16)
    assert probe_features(shallow, x, "cls4").shape == (2, 2 * 192) == (2, feature_dim(shallow, "cls4"))


def test_cached_sweep_equals_image_path_on_one_lr(demo_root):
    backbone = build_backbone("vit_tiny", depth=2, patch_size=8, img_size=32).eval()
    index = index_image_folder(demo_root / "train")
    bad = index.paths.index(str(demo_root / "train" / "dots" / "0000_bad.jpg"))
    view = eval_transform(32)
    dim, n_cls = feature_dim(backbone, "cls4"), len(index.classes)
    f, labels, readable = extract_features(backbone, ProbeImages(index, view), "cls4", 4, torch.device("cpu"))
    assert readable.tolist() == [i != bad for i in range(len(index))]
    sweep = train_linear_probes(cached_batches(f, labels, readable, 5, seed=3), dim, n_cls, [0.01, 0.5, 5.0],
                                epochs=3, batch_size=5, seed=3)
    unreadable = set()
    single = train_linear_probes(
        image_batches(backbone, ProbeImages(index, view), "cls4", 5, 3, torch.device("cpu"), unreadable=unreadable),
        dim, n_cls, [0.5], epochs=3, batch_size=5, seed=3)
    assert unreadable == {bad}
    torch.testing.assert_close(sweep.layers[1].weight, single.layers[0].weight, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sweep.layers[1].bias, single.layers[0].bias, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(sweep.layers[0].weight, sweep.layers[1].weight)  # the rates do differ
    assert not torch.allclose(single.layers[0].weight, LinearProbes(dim, n_cls, 1, seed=3).layers[0].weight)


def _checkpoint(path):
    cfg = load_config(None, ["model.arch=vit_tiny", "model.depth=2", "model.patch_size=8", "model.img_size=32",
                             "dino.out_dim=32", "dino.hidden_dim=16", "dino.bottleneck_dim=8"])
    save_checkpoint({"config": config_to_dict(cfg), "teacher": build_method(cfg, torch.device("cpu")).teacher
                     .state_dict()}, path)


def test_linear_probe_both_modes_count_unreadable(demo_root, caplog):
    """...and warn about each unreadable file once, not once per epoch (augment mode reads the images each epoch)."""
    backbone = build_backbone("vit_tiny", depth=2, patch_size=8, img_size=32)
    bad = [demo_root / "train" / "dots" / "0000_bad.jpg", demo_root / "val" / "grid" / "0000_bad.jpg"]
    for mode, workers in (("cached", 0), ("augment", 0), ("augment", 1)):  # warned by the main process
        caplog.clear()
        r = linear_probe(backbone, demo_root / "train", demo_root / "val", image_size=32, mode=mode,
                         lrs=[0.1, 1.0], epochs=2, batch_size=8, num_workers=workers)
        assert (r.n_train, r.n_val, r.skipped_train, r.skipped_val) == (19, 13, 1, 1)
        assert [sum(str(path) in rec.getMessage() for rec in caplog.records) for path in bad] == [1, 1]
        assert len(r.top1) == 2 and all(0 <= t <= 100 for t in r.top1 + r.top5)
        assert (r.feature_mode, r.feature_dim) == ("cls4", 2 * 192)


def test_cli_linear(demo_root, tmp_path, capsys):
    _checkpoint(tmp_path / "last.pt")
    args = ["linear", "--checkpoint", str(tmp_path / "last.pt"), "--train", str(demo_root / "train"),
            "--val", str(demo_root / "val"), "--num-workers", "0", "--epochs", "2"]
    assert main(args + ["--lr", "0.1,1"]) == 0
    out = capsys.readouterr().out
    assert "best lr" in out and "18 train / 12 val" in out and "skipped 1 train and 1 val" in out

    def one_line_error(argv, *words):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and all(w in err for w in words), err

    one_line_error(args + ["--lr", "0.1,x"], "--lr")
    one_line_error(args + ["--epochs", "0"], "--epochs")
    one_line_error(["linear", "--checkpoint", str(tmp_path / "none.pt"), "--train", ".", "--val", "."], "none.pt")
    one_line_error(args[:4] + [str(tmp_path / "nodir"), *args[5:]], "nodir")
