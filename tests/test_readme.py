"""Every command README.md (and docs/) shows runs as written: each `fastdino ...` line of a fenced shell block parses
with the CLI's own parser and its config overrides validate through the config loader; the cheap ones run; every
docs/ link and picture README names exists; README's test command is the one CI runs.

Commands that need a GPU or the user's data are parsed, not run: their folders (/data/imagenet, /my/images) are
taken as given, since `_images` only checks that a folder exists.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from fastdino import cli
from fastdino.config import load_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def shell_commands(path: Path) -> list[str]:
    """The commands of the file's ```bash blocks: continuation lines joined, comments and `#SBATCH` lines dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def fastdino_argv(command: str) -> list[str] | None:
    """The arguments after `fastdino` (`fastdino`, `python -m fastdino`, torchrun's `-m fastdino`, the DeepSpeed
    launcher's `--module fastdino`, srun's `fastdino`), or None for a command that does not run fastdino."""
    words = []
    for word in shlex.split(command):
        if word in ("&", "&&", "||", "|"):
            break
        words.append(word.removesuffix(";"))
        if word.endswith(";"):
            break
    if words[:1] == ["srun"]:
        words = words[1:]
    if words[:1] == ["fastdino"]:
        return words[1:]
    for i, word in enumerate(words[:-1]):  # python -m, torchrun -m, deepspeed --module
        if word in ("-m", "--module") and words[i + 1] == "fastdino":
            return words[i + 2 :]
    return None


def _commands(paths) -> list[tuple[str, list[str]]]:
    found = []
    for path in paths:
        for command in shell_commands(path):
            argv = fastdino_argv(command)
            if argv is not None:
                found.append((f"{path.name}: {command}", argv))
    return found


README_COMMANDS = _commands([README])
DOC_COMMANDS = _commands(DOCS)


@pytest.fixture
def lenient_folders(monkeypatch):
    """Image-folder flags accept the examples' folders (/data/imagenet/train) that do not exist here."""
    monkeypatch.setattr(cli, "_images", Path)


def check_parses(argv: list[str]) -> None:
    args = cli.build_parser().parse_args(argv)  # a refused flag raises SystemExit
    config = getattr(args, "config", None)
    if args.command == "demo":
        config = ROOT / "configs" / cli._demo_config(args)  # the demo's own choice (a convnet's config for resnet18)
    if config is not None:
        path = ROOT / config
        load_config(path if path.is_file() else None, args.overrides)  # placeholders (cfg.yaml): the defaults


def test_readme_has_the_commands():
    """The extraction finds what README must show (a test that cannot fail is a bug)."""
    names = {argv[0] for _, argv in README_COMMANDS}
    assert {"demo", "train", "knn", "linear", "attention", "export"} <= names
    assert any(argv[:1] == ["train"] and "train.engine=deepspeed" in argv for _, argv in README_COMMANDS)
    assert ["demo", "model.arch=resnet18"] in [argv for _, argv in README_COMMANDS]
    assert fastdino_argv("torchrun --nproc_per_node=8 -m fastdino train c.yaml") == ["train", "c.yaml"]
    assert fastdino_argv("pip install -e .") is None
    assert fastdino_argv("python -m perf.bench_step --providers fastdino") is None


@pytest.mark.parametrize("where, argv", README_COMMANDS + DOC_COMMANDS, ids=lambda v: v if isinstance(v, str) else "")
def test_command_parses(where, argv, lenient_folders):
    check_parses(argv)


def test_a_refused_command_is_caught(lenient_folders):
    with pytest.raises(SystemExit):
        check_parses(["train"])  # no config
    with pytest.raises(Exception, match="optim.lrr"):
        check_parses(["train", "configs/vit_small16.yaml", "optim.lrr=0.1"])


def test_cheap_commands_run(capsys, tmp_path):
    """`fastdino --help` and each README subcommand's --help exit 0; README's train command, as written, refuses
    the missing /my/images in one line (exit 2) before any work."""
    precision = torch.get_float32_matmul_precision()
    try:
        assert cli.main(["--help"]) == 0
        for name in sorted({argv[0] for _, argv in README_COMMANDS}):
            assert cli.main([name, "--help"]) == 0, name
        train = next(argv for _, argv in README_COMMANDS if argv[:2] == ["train", "configs/vit_small16.yaml"])
        capsys.readouterr()
        assert cli.main(train + [f"train.output_dir={tmp_path / 'run'}"]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("fastdino: error:") and "/my/images" in error and "\n" not in error
        assert not (tmp_path / "run").exists()
    finally:
        torch.set_float32_matmul_precision(precision)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_resolve():
    text = README.read_text()
    links = re.findall(r"\]\(((?:docs|perf)/[^)#\s]+)(?:#([^)\s]+))?\)", text)
    assert len(links) >= 10
    for target, anchor in links:
        path = ROOT / target
        assert path.is_file(), target
        if anchor:
            headings = {_slug(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), re.M)}
            assert anchor in headings, f"{target}#{anchor}"
    for doc in DOCS:
        for target in re.findall(r"\]\(([\w./-]+\.(?:md|png))\)", doc.read_text()):
            assert (doc.parent / target).is_file(), f"{doc.name}: {target}"


def test_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "python -m pytest -q" in ci
    assert "python -m pytest -q" in shell_commands(README)
