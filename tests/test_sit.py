"""SiT on the engine (methods/sit.py, models/decoder.py): config refusals, decoder and rotation against
independent references, overfitting, bitwise exact resume (masks included), snapshots and k-NN."""

import json

import pytest
import torch
from torch import nn

from fastdino.cli import main
from fastdino.config import ConfigError, load_config
from fastdino.data.demo import make_demo_dataset
from fastdino.data.files import ImageFileDataset, index_image_folder
from fastdino.data.multicrop import eval_transform
from fastdino.engine.checkpoint import CheckpointError, load_checkpoint
from fastdino.engine.trainer import Trainer, train
from fastdino.methods import build_method
from fastdino.methods.sit import SiT, SiTNetwork, rotate_quarter_turns
from fastdino.models.decoder import DECODER_KINDS, ReconstructionDecoder
from fastdino.models.vit import build_backbone

SIT = [
    "train.method=sit", "model.arch=vit_tiny", "model.depth=2", "model.patch_size=8", "model.img_size=32",
    "model.drop_path_rate=0.1", "sit.decoder_hidden_dim=32", "sit.proj_hidden_dim=32", "sit.proj_dim=16",
    "data.global_size=32", "data.batch_size=4", "data.num_workers=0", "optim.warmup_epochs=1", "train.epochs=2",
    "train.log_every=1", "train.knn_eval=false",
]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train_per_class=2, n_val_per_class=1, size=32)


def sit_cfg(demo_root, out, *extra):
    return load_config(None, SIT + [f"data.path={demo_root}", f"train.output_dir={out}", *extra])


@pytest.mark.parametrize("override, words", [
    ("sit.mask_ratio=0", ["sit.mask_ratio", "(0, 1)"]),
    ("sit.mask_ratio=1.0", ["sit.mask_ratio"]),
    ("sit.mask_ratio=1.5", ["sit.mask_ratio"]),
    ("sit.corruption=noise,paint", ["sit.corruption", "'paint'", "replace"]),
    ("sit.alpha=-1", ["sit.alpha", ">= 0"]),
    ("sit.keep_prob=2", ["sit.keep_prob"]),
    ("sit.decoder=unet", ["sit.decoder", "transformer"]),
    ("sit.contrastive_target=teacher", ["sit.contrastive_target", "momentum"]),
    ("sit.recons_pixels=some", ["sit.recons_pixels"]),
    ("sit.mask_ration=0.5", ["sit.mask_ration", "sit.mask_ratio"]),
    ("train.method=mae", ["train.method", "sit"]),
])
def test_bad_sit_config_is_refused_naming_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for word in words:
        assert word in str(err.value)


def test_cli_refuses_a_bad_sit_config_before_any_work(tmp_path, capsys):
    assert main(["train", "configs/sit_demo.yaml", "sit.mask_ratio=1.2", f"train.output_dir={tmp_path}/r"]) == 2
    err = capsys.readouterr().err
    assert "sit.mask_ratio" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_linear_decoder_is_a_transposed_convolution_and_every_kind_folds_to_the_image():
    dec = ReconstructionDecoder(12, 4, "linear")
    tokens = torch.randn(2, 3 * 5, 12)
    conv = nn.ConvTranspose2d(12, 3, kernel_size=4, stride=4)  # the reference code's decoder
    with torch.no_grad():
        conv.weight.copy_(dec.head.weight.T.reshape(12, 3, 4, 4))
        conv.bias.copy_(dec.head.bias.view(3, 16)[:, 0])
        dec.head.bias.copy_(conv.bias.repeat_interleave(16))
    ref = conv(tokens.transpose(1, 2).reshape(2, 12, 3, 5))  # (2, 3, 12, 20)
    torch.testing.assert_close(dec(tokens, 3, 5), ref, rtol=1e-5, atol=1e-6)
    for kind in DECODER_KINDS:
        out = ReconstructionDecoder(12, 4, kind, hidden_dim=8, depth=1)(tokens, 3, 5)
        assert out.shape == (2, 3, 12, 20)
    with pytest.raises(ValueError, match="decoder kind"):
        ReconstructionDecoder(12, 4, "unet")


def test_backbone_tokens_start_with_the_class_token_forward_returns():
    vit = build_backbone("vit_tiny", depth=1, patch_size=8, img_size=32)
    x = torch.randn(2, 3, 32, 32)
    tokens = vit.forward_tokens(x)
    assert tokens.shape == (2, 1 + 16, 192)
    assert torch.equal(tokens[:, 0], vit(x))


def test_quarter_turns_per_image_match_rot90():
    x = torch.randn(6, 3, 8, 8)
    turns = torch.tensor([0, 1, 2, 3, 1, 2])
    want = torch.stack([torch.rot90(x[i], int(turns[i]), dims=(1, 2)) for i in range(6)])
    assert torch.equal(rotate_quarter_turns(x, turns), want)


def fixed_images(demo_root, n=4):
    dataset = ImageFileDataset(index_image_folder(demo_root / "train"), eval_transform(32))
    return torch.stack([dataset[i][0][0] for i in range(0, 3 * n, 3)])  # (n, 3, 32, 32), several classes


def test_overfitting_a_handful_of_images_lowers_the_reconstruction_loss(demo_root):
    """4 images under one fixed corruption (the global seed reset before each step), 40 AdamW steps: the L1
    over the corrupted pixels falls by at least 2x (0.82 -> 0.29 when written). Every part gets gradients."""
    cfg = load_config(None, SIT + ["model.drop_path_rate=0.0", "sit.decoder_hidden_dim=128", "sit.proj_hidden_dim=64",
                                   "sit.proj_dim=32", "sit.alpha=5"])
    method = build_method(cfg, torch.device("cpu"))
    images = fixed_images(demo_root)
    optimizer = torch.optim.AdamW(method.student.parameters(), lr=3e-3, weight_decay=0.0)
    curve = []
    for step in range(40):
        torch.manual_seed(123)
        loss, stats = method([images, images], epoch=0)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.student.parameters())
            assert all(not p.requires_grad for p in method.teacher.parameters())
        optimizer.step()
        curve.append(stats["loss_recons"].item())
    assert curve[-1] < curve[0] / 2, curve


def _states(path):
    ckpt = load_checkpoint(path)
    return ckpt["student"], ckpt["teacher"], ckpt["optimizer"]


@pytest.mark.parametrize("extra", [
    [],  # the paper's recipe: momentum targets, noise / replace / unchanged blocks
    ["sit.contrastive_target=online", "sit.rotation=true", "sit.uncertainty_weights=true", "sit.grey_prob=0.5",
     "sit.blur_prob=0.5", "sit.recons_pixels=all", "sit.decoder=transformer", "sit.decoder_depth=1"],
], ids=["paper", "reference_code"])
def test_exact_resume_of_a_sit_run_is_bitwise(demo_root, tmp_path, monkeypatch, extra):
    """6 steps in one go == 4 steps, stop, resume, 2 steps: weights, optimizer and the masks drawn."""
    masks = {}
    original = SiT.corrupt

    def recording(self, clean, group_size=None, generator=None, rows=None):
        c = original(self, clean, group_size, generator, rows)
        if generator is None:  # training steps only, not the snapshots
            masks.setdefault(self._run, []).append(c.mask.clone())
        return c

    monkeypatch.setattr(SiT, "corrupt", recording)
    for run, steps in (("once", []), ("twice", ["train.max_steps=4"]), ("twice", [])):
        monkeypatch.setattr(SiT, "_run", run, raising=False)
        result = train(sit_cfg(demo_root, tmp_path / run, *extra, *steps))
    assert result.steps_done == 6
    once, twice = _states(tmp_path / "once" / "last.pt"), _states(tmp_path / "twice" / "last.pt")
    for a, b in zip(once[:2], twice[:2]):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    for sa, sb in zip(once[2]["state"].values(), twice[2]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert len(masks["once"]) == len(masks["twice"]) == 6
    assert all(torch.equal(a, b) for a, b in zip(masks["once"], masks["twice"]))  # masks exact on resume
    assert not torch.equal(masks["once"][0], masks["once"][1])


def test_sit_run_logs_its_losses_draws_snapshots_and_evaluates_by_knn(demo_root, tmp_path):
    out = tmp_path / "run"
    result = train(sit_cfg(demo_root, out, "train.knn_eval=true", "train.epochs=1"))
    assert result.steps_done == 3 and result.knn_init is not None and result.knn_trained is not None
    assert result.health["status"] == "healthy"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    lines = [x for x in lines if "loss" in x]  # training records (k-NN passes have their own lines)
    assert {"loss", "loss_recons", "loss_contrastive", "feature_std_ratio", "momentum"} <= set(lines[-1])
    for tag in ("start", "end"):
        png = (out / f"sit_reconstructions_{tag}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert load_checkpoint(out / "last.pt")["config"]["train"]["method"] == "sit"
    # the k-NN command reads a SiT checkpoint like a DINO one
    assert main(["knn", "--checkpoint", str(out / "last.pt"), "--train", str(demo_root / "train"),
                 "--val", str(demo_root / "val"), "--num-workers", "0"]) == 0


def test_a_checkpoint_of_one_method_is_refused_by_the_other(demo_root, tmp_path):
    train(sit_cfg(demo_root, tmp_path / "run", "train.max_steps=1"))
    with pytest.raises(CheckpointError, match=r"another architecture.*train.method: checkpoint 'sit' vs config 'dino'"):
        Trainer(sit_cfg(demo_root, tmp_path / "run", "train.method=dino"))
    with pytest.raises(CheckpointError, match=r"sit.proj_dim: checkpoint 16 vs config 8"):
        Trainer(sit_cfg(demo_root, tmp_path / "run", "sit.proj_dim=8"))
    assert Trainer(sit_cfg(demo_root, tmp_path / "run")).step == 1


def test_momentum_targets_come_from_the_teacher_on_clean_views(monkeypatch):
    """The paper's mode: the EMA encoder embeds the clean views (not the corrupted ones), without gradient;
    the reference code's online mode never runs it."""
    seen = []
    original = SiTNetwork.embed

    def spy(self, images):
        seen.append((self, images.clone(), torch.is_grad_enabled()))
        return original(self, images)

    monkeypatch.setattr(SiTNetwork, "embed", spy)
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    method = build_method(load_config(None, SIT), torch.device("cpu"))
    method(views, epoch=0)
    assert len(seen) == 1
    network, images, grad = seen[0]
    assert network is method.teacher and torch.equal(images, torch.cat(views)) and not grad
    online = build_method(load_config(None, SIT + ["sit.contrastive_target=online"]), torch.device("cpu"))
    online(views, epoch=0)
    assert len(seen) == 1


def test_demo_command_selects_the_sit_recipe():
    from fastdino.cli import CONFIG_DIR, DEMO_CONFIGS, build_parser

    args = build_parser().parse_args(["demo", "--method", "sit", "train.epochs=1"])
    assert args.method == "sit" and args.overrides == ["train.epochs=1"]
    cfg = load_config(CONFIG_DIR / DEMO_CONFIGS["sit"])
    assert cfg.train.method == "sit" and cfg.data.path == load_config(CONFIG_DIR / DEMO_CONFIGS["dino"]).data.path
