"""Every user mistake ends in one line naming the key, flag or file, exit code 2, before any work (issue 12, s. 3)."""

import pytest
import torch

from fastdino.cli import main
from fastdino.config import ConfigError, load_config, schedule_warnings
from fastdino.data.demo import make_demo_dataset
from fastdino.data.files import DataError
from fastdino.engine.checkpoint import CheckpointError
from fastdino.engine.trainer import NonFiniteLossError, train
from fastdino.errors import MissingDependencyError, UserError
from fastdino.methods.dino import DINO

TINY = [
    "model.arch=vit_tiny", "model.depth=1", "model.patch_size=8", "model.img_size=16", "dino.out_dim=16",
    "dino.hidden_dim=16", "dino.bottleneck_dim=8", "data.global_size=16", "data.local_size=8",
    "data.local_crops_number=1", "data.batch_size=4", "data.num_workers=0", "optim.warmup_epochs=1",
    "train.epochs=2", "train.knn_eval=false", "health.enabled=false",
]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train_per_class=2, n_val_per_class=1, size=16)


def test_every_user_error_type_is_a_user_error():
    for cls in (ConfigError, DataError, CheckpointError, MissingDependencyError):
        assert issubclass(cls, UserError)


def _one_line_refusal(capsys, argv, *words):
    """Run the CLI; it must exit 2 with exactly one stderr line holding every word and no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    return err


@pytest.mark.parametrize("extra, words", [
    (["data.batch_size=64"], ["data.batch_size=64", "12 images", "fewer than one global batch"]),
    (["data.local_size=12"], ["data.local_size=12", "model.patch_size=8", "use 16"]),
    (["dino.out_dim=1"], ["dino.out_dim=1", "trivially 0"]),
    (["dino.warmup_teacher_temp_epochs=3"], ["dino.warmup_teacher_temp_epochs=3", "train.epochs=2"]),
    (["optim.warmup_epochs=5"], ["optim.warmup_epochs=5", "train.epochs=2"]),
    (["optim.lr=fast"], ["command line: optim.lr='fast'", "float"]),
    (["optim.lr=[1"], ["command line", "optim.lr=[1", "not valid YAML"]),
])
def test_cli_refuses_bad_settings_in_one_line_before_work(demo_root, tmp_path, capsys, extra, words):
    out = tmp_path / "run"
    _one_line_refusal(capsys, ["train", "configs/demo.yaml", *TINY, f"data.path={demo_root}",
                               f"train.output_dir={out}", *extra], *words)
    assert not out.exists()  # nothing was written


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("setting", ["train.precision=fp16", "train.device=cuda"])
def test_gpu_only_settings_are_refused_on_a_cpu_machine(demo_root, tmp_path, capsys, setting):
    key = setting.split("=")[0]
    _one_line_refusal(capsys, ["train", "configs/demo.yaml", *TINY, f"data.path={demo_root}",
                               f"train.output_dir={tmp_path}/r", setting], key, "CUDA")


def test_unset_data_path_and_unwritable_output_dir_are_refused(demo_root, tmp_path, capsys):
    _one_line_refusal(capsys, ["train", "configs/vit_small16.yaml"], "data.path is not set")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    _one_line_refusal(capsys, ["train", "configs/demo.yaml", *TINY, f"data.path={demo_root}",
                               f"train.output_dir={blocker}/run"], "train.output_dir", "not writable")


def test_a_bad_value_is_attributed_to_where_it_was_given(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("optim:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=rf"^{yaml_file}: optim.lr=-1.0 must be > 0"):
        load_config(yaml_file)
    with pytest.raises(ConfigError, match=r"^command line: optim.min_lr=-1.0 must be >= 0"):
        load_config(yaml_file, ["optim.lr=0.1", "optim.min_lr=-1"])
    assert load_config(yaml_file, ["optim.lr=0.1"]).optim.lr == 0.1  # the command line fixes the file
    # a check across keys is the command line's when it set one of them
    yaml_file.write_text("dino:\n  warmup_teacher_temp_epochs: 30\n")
    with pytest.raises(ConfigError, match=r"^command line: dino.warmup_teacher_temp_epochs=30 .*train.epochs=10"):
        load_config(yaml_file, ["train.epochs=10"])
    yaml_file.write_text("dino:\n  warmup_teacher_temp_epochs: 30\ntrain:\n  epochs: 10\n")
    with pytest.raises(ConfigError, match=rf"^{yaml_file}: dino.warmup_teacher_temp_epochs=30"):
        load_config(yaml_file, ["optim.lr=0.1"])


def test_cli_flags_are_checked_like_config_keys(tmp_path, capsys):
    _one_line_refusal(capsys, ["knn", "--checkpoint", "x.pt", "--train", str(tmp_path), "--val", str(tmp_path),
                               "--k", "0"], "--k", "'0' is not a positive integer")
    _one_line_refusal(capsys, ["knn", "--checkpoint", "x.pt", "--train", str(tmp_path), "--val", "/nowhere"],
                      "--val", "/nowhere is not a folder")
    _one_line_refusal(capsys, ["knn", "--checkpoint", "x.pt", "--train", str(tmp_path), "--val", str(tmp_path),
                               "--temperature", "-1"], "--temperature")
    _one_line_refusal(capsys, ["knn", "--checkpoint", "x.pt"], "required")
    _one_line_refusal(capsys, ["trian"], "invalid choice")
    _one_line_refusal(capsys, ["knn", "--checkpoint", str(tmp_path / "x.pt"), "--train", str(tmp_path),
                               "--val", str(tmp_path)], "x.pt does not exist")


def test_schedule_warnings_name_the_keys():
    cfg = load_config(None, ["train.epochs=10", "optim.warmup_epochs=10", "dino.freeze_last_layer_epochs=10",
                             "dino.warmup_teacher_temp_epochs=5", "train.max_steps=30"])
    lines = schedule_warnings(cfg, steps_per_epoch=10)
    assert any("optim.warmup_epochs = train.epochs = 10" in x for x in lines)
    assert any("dino.freeze_last_layer_epochs=10" in x for x in lines)
    assert any("train.max_steps=30" in x and "dino.warmup_teacher_temp_epochs" in x for x in lines)
    assert schedule_warnings(load_config(None, ["train.epochs=100"]), steps_per_epoch=10) == []


def test_non_finite_loss_in_a_fresh_run_says_no_checkpoint_exists(demo_root, tmp_path, monkeypatch):
    original = DINO.forward

    def poisoned(self, views, epoch):
        loss, stats = original(self, views, epoch)
        return loss * float("nan"), stats

    monkeypatch.setattr(DINO, "forward", poisoned)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="iteration 0 .*no checkpoint was written yet") as info:
        train(load_config(None, TINY + [f"data.path={demo_root}", f"train.output_dir={out}"]))
    assert "intact" not in str(info.value)
    assert not (out / "last.pt").exists()
