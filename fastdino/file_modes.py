"""A file fastdino publishes through a temporary name: the mode a plain open() / mkdir gives, and fsync.

Writing to a temporary name and renaming it into place (a crash leaves the old file or the new one) keeps the
temporary's mode: tempfile.mkstemp makes files 0600, tempfile.mkdtemp folders 0700, and safetensors' save_file
(0.8 on: it writes through a temporary file of its own, safetensors issue #782) 0600. A checkpoint or export
left so is readable by its owner only, unlike every other file of the run. `plain_mode` gives such a path what
a new file (0666) or folder (0777) gets under the process's umask, as torch.save(path) or open() would.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


def umask() -> int:
    """The process's umask (e.g. 0o022), read from /proc/self/status where Linux shows it; elsewhere set and put
    back at once (os.umask is the only other way to read it, and another thread creating a file meanwhile
    would get mode 0666)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def plain_mode(path: str | Path) -> None:
    """chmod `path` to 0o666 & ~umask (a file) or 0o777 & ~umask (a folder, and everything below it the same
    way). Symbolic links are left alone (their mode is their target's). Raises OSError as os.chmod does."""
    mask = umask()
    path = Path(path)
    if path.is_symlink():
        return
    if not path.is_dir():
        os.chmod(path, 0o666 & ~mask)
        return
    os.chmod(path, 0o777 & ~mask)
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            child = os.path.join(folder, name)
            if not os.path.islink(child):
                os.chmod(child, (0o777 if name in dirs else 0o666) & ~mask)


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to disk: before a rename publishes it (the file holds its bytes)
    and after (its folder holds the new name)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some network and FUSE file systems cannot fsync a folder: its entries are theirs to keep
        if not (os.path.isdir(path) and exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)
