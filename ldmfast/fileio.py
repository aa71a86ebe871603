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


def _umask() -> int:
    # Linux reports it; setting and restoring it (the portable way) would briefly give files
    # that other threads create mode 0666.
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)  # the safe side while it is off
    os.umask(mask)
    return mask


def created_mode(directory: bool = False) -> int:
    """The mode ``open()`` (0666) or ``mkdir()`` (0777) would give a new file or folder under the
    process's umask."""
    return (0o777 if directory else 0o666) & ~_umask()


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


def _publish(tmp: str, path: str, replace: bool) -> None:
    if not replace:
        # A hard link fails if path appeared since it was checked; on a filesystem without
        # hard links a last check is as close as it gets.
        try:
            os.link(tmp, path)
        except FileExistsError:
            appeared = True
        except OSError:
            appeared = os.path.lexists(path)
        else:
            os.unlink(tmp)
            return
        if appeared:
            raise FileExistsError(f"{path!r} appeared while it was being written; it was left "
                                  "as it is")
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path, replace: bool = True):
    """Yields a temporary path next to ``path`` to write; on a clean exit it is flushed, given
    ``path``'s mode (or the umask's for a new file) and moved to ``path``; on an error it is
    removed and ``path`` is untouched. ``replace=False``: a file that appeared at ``path`` in the
    meantime is kept (FileExistsError). The folder must exist."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
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
        _publish(tmp, path, replace)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)
