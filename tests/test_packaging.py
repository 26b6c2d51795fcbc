"""The repository's kernels/ folder is never a top-level package `kernels` (issue 23, DESIGN.md floor 0).

Hugging Face's `kernels` (a transformers 5.x dependency) owns that name: with it installed, transformers' ViT
imports from the repository root and from elsewhere, fastdino's kernels import as `fastdino.kernels`, and neither
a wheel built from the repository nor an editable install (setuptools' finder) maps a top-level `kernels`.
"""

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _hf_kernels_installed() -> bool:
    spec = importlib.util.find_spec("kernels")  # cwd (the repository root) is on sys.path: this is the real lookup
    return spec is not None and spec.origin is not None and ROOT not in Path(spec.origin).resolve().parents


needs_hf = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or not _hf_kernels_installed(),
    reason="needs transformers and Hugging Face's kernels package (the dev extra)")

PROBE = """
import kernels, fastdino.kernels.dino_loss, fastdino.kernels.ema
from transformers import ViTModel
print(kernels.__file__)
print(fastdino.kernels.ema.__file__)
"""


def _probe(cwd: Path, pythonpath: Path | None) -> tuple[Path, Path]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    hf, ours = out.stdout.split()[-2:]
    return Path(hf).resolve(), Path(ours).resolve()


@needs_hf
@pytest.mark.parametrize("where", ["repository root", "elsewhere"])
def test_transformers_and_fastdino_kernels_import_side_by_side_without_an_install(where, tmp_path):
    """PYTHONPATH = the repository root, no install (perf/gpu_suite.py, the tests' subprocesses); `python -c` from
    the root puts the root first on sys.path, where the old kernels/__init__.py shadowed Hugging Face's."""
    hf, ours = _probe(ROOT if where == "repository root" else tmp_path, ROOT)
    assert ROOT not in hf.parents, hf
    assert ours == ROOT / "kernels" / "ema.py"


@needs_hf
def test_installed_fastdino_imports_beside_transformers_from_elsewhere(tmp_path):
    """The install CI makes (`pip install -e .`), from a folder that is not the repository."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([sys.executable, "-c", "import fastdino; print(fastdino.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
    if where.returncode or Path(where.stdout.strip()).resolve() != ROOT / "fastdino" / "__init__.py":
        pytest.skip(f"the installed fastdino is not this checkout's ({where.stdout.strip() or 'none'})")
    hf, ours = _probe(tmp_path, None)
    assert ROOT not in hf.parents, hf
    assert ours == ROOT / "kernels" / "ema.py"


@pytest.fixture
def source_copy(tmp_path) -> Path:
    """What a build reads (setup.py, README, fastdino/, kernels/), copied so no build output lands in the checkout."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("fastdino", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    return src


def test_wheel_installs_the_kernels_under_fastdino_only(source_copy, tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(source_copy)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel, = (tmp_path / "dist").glob("fastdino-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"fastdino", wheel.name.split("-py")[0] + ".dist-info"}
    assert {"fastdino/kernels/dino_loss.py", "fastdino/kernels/ema.py"} <= set(names)
    # The wheel's files on PYTHONPATH, as an install lays them out: the kernels import from fastdino, and a
    # top-level `kernels` (if any is found) is not fastdino's.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = ("import importlib.util, fastdino.kernels.ema as e; s = importlib.util.find_spec('kernels'); "
             "print(e.__file__); print(s.origin if s else None)")
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    ours, top = run.stdout.split()[-2:]
    assert Path(ours).resolve() == (site / "fastdino" / "kernels" / "ema.py").resolve()
    assert site.resolve() not in Path(top).resolve().parents


def test_editable_install_maps_no_top_level_kernels(source_copy, tmp_path):
    """setuptools' editable wheel (PEP 660, what `pip install -e .` installs): its finder maps `fastdino` and
    `fastdino.kernels`, never `kernels`."""
    build = ("import sys; from setuptools import build_meta; "
             "print(build_meta.build_editable(sys.argv[1]))")
    out = subprocess.run([sys.executable, "-c", build, str(tmp_path / "dist")], cwd=source_copy, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    with zipfile.ZipFile(tmp_path / "dist" / out.stdout.split()[-1]) as wheel:
        finder, = (n for n in wheel.namelist() if n.endswith("_finder.py"))
        text = wheel.read(finder).decode()
    mapping = ast.literal_eval(re.search(r"^MAPPING\b[^=]*=\s*(\{.*\})\s*$", text, re.M).group(1))
    assert "kernels" not in mapping
    assert Path(mapping["fastdino"]) == source_copy / "fastdino"
    assert Path(mapping["fastdino.kernels"]) == source_copy / "kernels"


def test_setup_lists_each_requirement_once_and_says_what_each_extra_enables():
    """setup.py: no requirement twice in install_requires or in one extra; every extra has a comment on its line."""
    source = (ROOT / "setup.py").read_text()
    call = next(node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
                and getattr(node.func, "id", "") == "setup")
    keywords = {k.arg: k.value for k in call.keywords}
    name = lambda requirement: re.split(r"[<>=!~\[; ]", requirement.value, maxsplit=1)[0].lower()  # noqa: E731
    lists = {"install_requires": keywords["install_requires"].elts}
    extras = keywords["extras_require"]
    lists.update({key.value: value.elts for key, value in zip(extras.keys, extras.values)})
    for where, requirements in lists.items():
        names = [name(r) for r in requirements]
        assert len(names) == len(set(names)), (where, names)
    lines = source.splitlines()
    for key in extras.keys:
        assert "#" in lines[key.lineno - 1] or lines[key.lineno - 2].strip().startswith("#"), key.value
