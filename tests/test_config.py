"""Config: YAML + overrides, type checks, refusal of unknown keys and bad values with the key named."""

import pytest

from fastdino.config import Config, ConfigError, config_from_dict, config_to_dict, load_config


def test_defaults_follow_the_spec():
    cfg = Config()
    assert (cfg.dino.out_dim, cfg.dino.student_temp, cfg.dino.center_momentum) == (65536, 0.1, 0.9)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.weight_decay_end, cfg.optim.clip_grad) == (
        0.0005, 0.04, 0.4, 3.0)
    assert cfg.dino.momentum_teacher == 0.996 and cfg.model.drop_path_rate == 0.1


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  arch: vit_tiny\ndata:\n  batch_size: 8\n")
    cfg = load_config(path, ["data.batch_size=16", "optim.lr=1e-3", "data.local_crops_scale=[0.1, 0.3]"])
    assert cfg.model.arch == "vit_tiny" and cfg.data.batch_size == 16
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.data.local_crops_scale == (0.1, 0.3)
    assert config_from_dict(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "override, words",
    [
        ("data.batchsize=3", ["data.batchsize", "data.batch_size"]),
        ("modle.arch=vit_tiny", ["modle.arch", "model.arch"]),
        ("data.batch_size=abc", ["data.batch_size", "int"]),
        ("data.batch_size=0", ["data.batch_size", "> 0"]),
        ("model.arch=vit_huge", ["model.arch", "vit_small"]),
        ("loss.impl=cuda", ["loss.impl"]),
        ("model.compile=fast", ["model.compile", "reduce-overhead"]),
        ("model.compile=off", ["model.compile", "quote the word"]),
        ("model.grad_checkpointing=sometimes", ["model.grad_checkpointing", "bool"]),
        ("train.knn_eval=1", ["train.knn_eval", "bool"]),
        ("data.global_crops_scale=[0.5, 0.2]", ["data.global_crops_scale"]),
        ("data.global_crops_scale=0.5", ["data.global_crops_scale"]),
        ("data.blur_sigma=[2.0, 0.1]", ["data.blur_sigma"]),
        ("data.color_strength=-1", ["data.color_strength"]),
        ("dino.center_momentum=1.5", ["dino.center_momentum"]),
        ("model.img_size=100", ["model.img_size", "model.patch_size"]),
        ("noequals", ["noequals"]),
    ],
)
def test_bad_overrides_are_refused_naming_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for word in words:
        assert word in str(err.value)


def test_bad_yaml_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*optim\.lrr.*optim\.lr"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_shipped_configs_load():
    from fastdino.cli import CONFIG_DIR

    paths = sorted(CONFIG_DIR.glob("*.yaml"))
    assert len(paths) >= 3
    for path in paths:
        load_config(path)


def test_yaml_merge_keys(tmp_path):
    """`<<: *anchor` (valid YAML that yaml.safe_load reads) merges, the section's own keys win; top-level `x-` keys
    hold anchors; a key given twice in one section is still refused."""
    path = tmp_path / "merge.yaml"
    path.write_text("x-small: &small\n  arch: vit_tiny\n  patch_size: 8\nmodel:\n  <<: *small\n  patch_size: 16\n"
                    "optim: &o\n  lr: 0.001\n")
    cfg = load_config(path)
    assert (cfg.model.arch, cfg.model.patch_size, cfg.optim.lr) == ("vit_tiny", 16, 0.001)
    path.write_text("model:\n  <<: {arch: vit_tiny}\n  depth: 2\n  depth: 3\n")
    with pytest.raises(ConfigError, match="appears twice"):
        load_config(path)


def test_a_list_for_a_text_key_says_how_to_write_it():
    with pytest.raises(ConfigError, match=r"train\.stop_signals=\['SIGTERM', 'SIGUSR1'\] has the wrong type: expected "
                                          r"str \(a list given: .*train\.stop_signals=SIGTERM,SIGUSR1\)"):
        load_config(None, ["train.stop_signals=[SIGTERM,SIGUSR1]"])
