"""fastdino/file_modes.py: what tempfile's 0600 / 0700 become, under set umasks (checkpoints and exports use it:
tests/test_resume_changes.py and tests/test_interop_export.py check those files)."""

import os
import tempfile

import pytest

from fastdino.file_modes import plain_mode, umask


@pytest.fixture(params=[0o022, 0o027, 0o002])
def mask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_umask_is_read_without_changing_it(mask):
    assert umask() == mask
    assert os.umask(mask) == mask  # still set


def test_temporaries_get_what_open_and_mkdir_give(tmp_path, mask):
    with open(tmp_path / "plain", "w"):
        pass
    (tmp_path / "plain_dir").mkdir()
    fd, file = tempfile.mkstemp(dir=tmp_path)
    os.close(fd)
    folder = tempfile.mkdtemp(dir=tmp_path)
    inner = tempfile.mkdtemp(dir=folder)
    fd, nested = tempfile.mkstemp(dir=inner)
    os.close(fd)
    os.symlink(file, os.path.join(folder, "link"))
    assert os.stat(file).st_mode & 0o777 == 0o600 and os.stat(folder).st_mode & 0o777 == 0o700
    plain_mode(file)
    plain_mode(folder)
    for path, like in [(file, "plain"), (nested, "plain"), (folder, "plain_dir"), (inner, "plain_dir")]:
        assert os.stat(path).st_mode & 0o777 == (tmp_path / like).stat().st_mode & 0o777, path
    assert os.stat(tmp_path / "plain").st_mode & 0o777 == 0o666 & ~mask
