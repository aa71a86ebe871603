"""Writing files so that nothing is lost: every file appears whole or not at all (written to a
temporary name in the destination's folder, flushed to disk, then renamed over it), with the
permissions a plain ``open(path, "w")`` would give it (the temporary files Python creates are
private, 0600), and an existing file is replaced only when the caller says so.
"""
from __future__ import annotations

import contextlib
import os
import tempfile

__all__ = ["atomic_path", "check_writable", "created_mode", "fsync_dir"]


def created_mode(directory: bool = False) -> int:
    """The mode ``open()`` (0666) or ``mkdir()`` (0777) would give a new file or folder under the
    process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def fsync_dir(path) -> None:
    """Makes a rename in ``path`` durable (where the platform allows a folder to be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable(path, overwrite: bool, arg: str = "path", flag: str = "overwrite=True") -> str:
    """Refuses ``path`` when it names a folder, or an existing file and ``overwrite`` is false;
    returns it as a string. ``arg`` names the argument in the message, ``flag`` how to allow the
    replacement (``--overwrite`` on the command line)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{arg}: {path!r} is a folder; give a file name")
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{arg}: {path!r} already exists; pass {flag} to replace it, or "
                              "choose another name")
    return path


@contextlib.contextmanager
def atomic_path(path, suffix: str = ""):
    """Yields a temporary path next to ``path`` to write; on a clean exit it is flushed, given
    ``path``'s mode (or the umask's for a new file) and renamed over ``path``; on an error it is
    removed and ``path`` is untouched. The folder must exist."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix + ".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        try:
            mode = os.stat(path).st_mode & 0o7777  # replacing a file keeps its permissions
        except FileNotFoundError:
            mode = created_mode()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)
