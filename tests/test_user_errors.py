"""Every user mistake ends in one line naming the key, flag or file, exit code 2, before any work (issue 12, s. 3)."""

import shutil

import pytest
import torch

from fastdino.cli import main
from fastdino.config import ConfigError, load_config, schedule_warnings
from fastdino.data.demo import make_demo_dataset
from fastdino.data.files import DataError, index_image_folder
from fastdino.engine.checkpoint import CheckpointError
from fastdino.engine.trainer import NonFiniteLossError, train
from fastdino.errors import MissingDependencyError, UserError

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


def test_missing_data_path_is_named_by_its_key(tmp_path, capsys):
    out = tmp_path / "run"
    _one_line_refusal(capsys, ["train", "configs/demo.yaml", *TINY, f"data.path={tmp_path / 'imagse'}",
                               f"train.output_dir={out}"], f"data.path {tmp_path / 'imagse'} does not exist")
    assert not out.exists()
    listing = tmp_path / "classes.json"  # a file is read as a shard list: this one is not
    listing.write_text('["cat", "dog"]\n')
    _one_line_refusal(capsys, ["train", "configs/demo.yaml", *TINY, f"data.path={listing}", f"train.output_dir={out}"],
                      f"data.path {listing}:", "is neither a shard list", "'[\"cat\", \"dog\"]'")
    assert not out.exists()


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
    # SiT has no DINO head or teacher temperature: no dino.* warning
    sit = load_config(None, ["train.method=sit", "train.epochs=1", "optim.warmup_epochs=0", "train.max_steps=5"])
    assert not any("dino." in x for x in schedule_warnings(sit, steps_per_epoch=10))


def test_non_finite_loss_in_a_fresh_run_says_no_checkpoint_exists(demo_root, tmp_path, poison_loss):
    poison_loss(0)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="iteration 0 .*no checkpoint was written yet") as info:
        train(load_config(None, TINY + [f"data.path={demo_root}", f"train.output_dir={out}"]))
    assert "intact" not in str(info.value)
    assert not (out / "last.pt").exists()


@pytest.mark.parametrize("extra, words", [
    (["train.output_dir="], ["train.output_dir is empty"]),
    (["train.resume="], ["train.resume is empty"]),
    (["train.seed=-1"], ["train.seed=-1"]),
    (["optim.lr=.nan"], ["optim.lr=nan must be a finite number"]),
    (["data.color_strength=.inf"], ["data.color_strength=inf must be a finite number"]),
])
def test_empty_paths_bad_seeds_and_non_finite_numbers_are_refused(demo_root, tmp_path, capsys, extra, words):
    _one_line_refusal(capsys, ["train", "configs/demo.yaml", *TINY, f"data.path={demo_root}",
                               f"train.output_dir={tmp_path}/r", *extra], *words)
    assert not (tmp_path / "r").exists()


def test_unreadable_config_files_are_one_line(tmp_path, capsys):
    (tmp_path / "garbage.yaml").write_bytes(bytes(range(256)))
    _one_line_refusal(capsys, ["train", str(tmp_path / "garbage.yaml")], "garbage.yaml", "not a text file")
    (tmp_path / "broken.yaml").write_text("model: {arch: vit_tiny\n")
    _one_line_refusal(capsys, ["train", str(tmp_path / "broken.yaml")], "broken.yaml", "not valid YAML", "line")
    _one_line_refusal(capsys, ["train", str(tmp_path)], "is a folder")


def test_resume_from_a_foreign_file_or_a_folder_is_one_line(demo_root, tmp_path, capsys):
    torch.save({"net": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pth")  # a pickled module: never loaded
    base = ["train", "configs/demo.yaml", *TINY, f"data.path={demo_root}", f"train.output_dir={tmp_path}/r"]
    _one_line_refusal(capsys, [*base, f"train.resume={tmp_path / 'pickled.pth'}"], "pickled.pth", "never loads")
    (tmp_path / "garbage.pt").write_bytes(b"\x00" * 64)
    _one_line_refusal(capsys, [*base, f"train.resume={tmp_path / 'garbage.pt'}"], "garbage.pt", "unreadable")
    _one_line_refusal(capsys, [*base, f"train.resume={tmp_path}"], "is a folder")


def test_triton_kernels_on_the_cpu_are_refused_outside_the_interpreter(demo_root, tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without a GPU")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for key in ("loss.impl", "ema.impl"):
        cfg = load_config(None, TINY + [f"data.path={demo_root}", f"train.output_dir={tmp_path}/r", f"{key}=triton"])
        with pytest.raises(ConfigError, match=rf"{key}=triton needs a CUDA device"):
            train(cfg)
    assert not (tmp_path / "r").exists()


def test_validation_classes_are_checked_before_training(tmp_path, capsys):
    root = make_demo_dataset(tmp_path / "d", n_train_per_class=2, n_val_per_class=1, size=16)
    (root / "val" / "elephants").mkdir()
    shutil.copy(next((root / "val").glob("*/*.jpg")), root / "val" / "elephants" / "0.jpg")
    _one_line_refusal(capsys, ["train", "configs/demo.yaml", *TINY, f"data.path={root}", "train.knn_eval=true",
                               f"train.output_dir={tmp_path}/r"], "elephants", "train.knn_eval=false")
    assert not (tmp_path / "r").exists()


def test_a_folder_of_only_unreadable_images_is_one_line_with_workers(tmp_path, capsys):
    for i in range(8):
        (tmp_path / "bad" / f"{i}.jpg").parent.mkdir(exist_ok=True)
        (tmp_path / "bad" / f"{i}.jpg").write_bytes(b"")
    # found only by decoding (after the progress bar started): the error is still one line, not the worker's
    # re-raised traceback
    assert main(["train", "configs/demo.yaml", *TINY, f"data.path={tmp_path / 'bad'}", "data.num_workers=1",
                 f"train.output_dir={tmp_path}/r"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastdino: error: no readable image among 8 files"), err
    assert not any("Traceback" in line or "DataLoader worker" in line for line in err)


def test_the_demo_never_overwrites_a_users_folder(tmp_path, capsys):
    mine = tmp_path / "mine" / "train" / "cats" / "mycat.jpg"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"my photo")
    with pytest.raises(DataError, match="not the demo data set"):
        make_demo_dataset(tmp_path / "mine", n_train_per_class=1, n_val_per_class=1, size=16)
    assert mine.read_bytes() == b"my photo"
    _one_line_refusal(capsys, ["demo", f"data.path={tmp_path / 'mine'}", f"train.output_dir={tmp_path}/r"],
                      "not the demo data set")
    assert mine.read_bytes() == b"my photo" and not (tmp_path / "r").exists()
    if not torch.cuda.is_available():  # a bad setting is refused before the demo writes its data
        _one_line_refusal(capsys, ["demo", f"data.path={tmp_path / 'new'}", "train.device=cuda"], "train.device")
        assert not (tmp_path / "new").exists()


def test_a_symlink_loop_in_the_data_folder_is_skipped(demo_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_root / "train", data)
    (data / "l1").symlink_to(data / "l2")
    (data / "l2").symlink_to(data / "l1")
    assert len(index_image_folder(data).paths) == 12


def test_init_from_is_refused_for_a_method_it_cannot_start():
    with pytest.raises(ConfigError, match="train.init_from reads DINO checkpoints"):
        load_config(None, ["train.method=sit", "train.init_from=x.pth"])


def test_a_section_given_twice_in_a_yaml_file_is_refused(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("model:\n  arch: vit_tiny\ntrain:\n  epochs: 3\nmodel:\n  depth: 2\n")
    with pytest.raises(ConfigError, match=r"twice.yaml is not valid YAML \(line 5, column 1\): the key 'model' "
                                          r"appears twice"):
        load_config(twice)
