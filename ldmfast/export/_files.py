"""Atomic writing of export outputs: a directory of graphs, or one engine file.

An export directory is built under a temporary name next to its destination (same filesystem,
so the final step is a rename) and only then moved into place; a failure at any point removes
the temporary directory, so a reader never sees a half-written ``unet.onnx`` or a graph whose
external-data file is missing.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from pathlib import Path

MANIFEST = "manifest.json"

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two directories in one step with Linux renameat2(RENAME_EXCHANGE); False where the
    call is unavailable (other OS, old libc, a filesystem without it)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def check_destination(out_dir: Path, overwrite: bool) -> None:
    """Refuses (before any work) an existing non-empty destination unless ``overwrite`` and it
    is an earlier export (it has our manifest): a user's unrelated folder is never replaced."""
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if not overwrite:
        raise FileExistsError(f"{out_dir} already exists and is not empty; pass overwrite=True "
                              "(--overwrite) to replace an earlier export, or choose another "
                              "directory")
    if not (out_dir / MANIFEST).is_file():
        raise FileExistsError(f"{out_dir} is not an ldmfast export (no {MANIFEST}); refusing to "
                              "replace it even with overwrite")


def staging_dir(out_dir: Path) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))


def commit_dir(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Moves a finished staging directory to ``out_dir``.

    Absent or empty destination: one rename. Replacing an earlier export: an atomic exchange
    where the kernel has renameat2, else rename-aside then rename-in (readers may see the path
    missing for that instant, never a mixed or partial export). The old export is then deleted.
    """
    fsync_tree(tmp)
    check_destination(out_dir, overwrite)
    if not out_dir.exists() or not any(out_dir.iterdir()):
        os.replace(tmp, out_dir)  # replaces an empty directory atomically on POSIX
    elif _exchange(tmp, out_dir):
        shutil.rmtree(tmp)  # tmp now holds the previous export
    else:
        aside = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rmdir(aside)
        os.rename(out_dir, aside)
        os.rename(tmp, out_dir)
        shutil.rmtree(aside)
    _fsync_dir(out_dir.parent)


def write_file_atomic(path: Path, data, overwrite: bool) -> None:
    """Writes bytes (or a buffer such as TensorRT's IHostMemory) to ``path`` via a temporary
    file in the same directory, fsync and rename."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to "
                              "replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
