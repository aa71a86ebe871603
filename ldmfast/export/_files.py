"""Atomic writing of export outputs: a directory of graphs, or one engine file.

An export directory is built under a temporary name next to its destination (same filesystem,
so the final step is a rename) and only then moved into place; a failure at any point removes
the temporary directory, so a reader never sees a half-written ``unet.onnx`` or a graph whose
external-data file is missing.

Replacing an earlier export replaces only what the new export writes (its graphs and the
manifest): every other file of the old directory (engines, notes, the graphs of components not
exported again) is hard-linked (copied where the filesystem has no hard links) into the new
directory before the swap, so it survives it, and the swap itself stays one atomic step.
"""
from __future__ import annotations

import ctypes
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .. import fileio

log = logging.getLogger("ldmfast")

MANIFEST = "manifest.json"

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            if not os.path.islink(full):
                with open(full, "rb") as f:
                    os.fsync(f.fileno())
        fileio.fsync_dir(root)


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
    if out_dir.is_symlink():  # the swap would replace the link and empty its target through it
        raise FileExistsError(f"{out_dir} is a symbolic link; give the folder it points to "
                              f"({out_dir.resolve()}) to replace that export")


def staging_dir(out_dir: Path) -> Path:
    """A new empty directory next to ``out_dir`` with the mode ``out_dir`` will have: that of
    the directory it replaces, else the umask's (mkdtemp's own 0700 would make every export
    private)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    mode = (out_dir.stat().st_mode & 0o7777 if out_dir.is_dir()
            else fileio.created_mode(directory=True))
    os.chmod(tmp, mode)
    return tmp


def _signature(st):
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _carry_over(old: Path, new: Path, owned, rel: str = "", carried=None) -> dict:
    """Links into ``new`` every entry of ``old`` whose top-level name is not in ``owned``;
    returns {relative path: signature of the old file} for ``_remove_old``."""
    carried = {} if carried is None else carried
    for entry in os.scandir(old):
        r = os.path.join(rel, entry.name)
        if not rel and entry.name in owned:
            continue
        dst = os.path.join(new, entry.name)
        st = entry.stat(follow_symlinks=False)
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), dst)
        elif entry.is_dir(follow_symlinks=False):
            os.mkdir(dst)
            os.chmod(dst, st.st_mode & 0o7777)
            _carry_over(Path(entry.path), Path(dst), owned, r, carried)
            continue
        else:
            try:
                os.link(entry.path, dst)
            except OSError:  # no hard links here (FAT, some network filesystems): copy
                shutil.copy2(entry.path, dst)
        carried[r] = _signature(st)
    return carried


def _remove_old(old: Path, owned, carried: dict) -> None:
    """Deletes the swapped-out export: the files the new export replaced and those carried over
    unchanged. Anything else (written there while the new export was being committed) is kept,
    with the directory, and reported: it is nobody's to delete."""
    kept = []
    for root, dirs, files in os.walk(old, topdown=False):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, old)
            if rel in owned or carried.get(rel) == _signature(os.lstat(path)):
                os.unlink(path)
            else:
                kept.append(rel)
        for d in dirs:
            path = os.path.join(root, d)  # a link to a folder may be gone already (above)
            if os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path):
                os.rmdir(path)
    if kept:
        log.warning("kept %s: it holds %s, changed while the export was replaced", old, kept)
    else:
        os.rmdir(old)


def _swap(tmp: Path, out_dir: Path) -> Path:
    """Puts ``tmp`` at ``out_dir``; returns where the previous ``out_dir`` now is."""
    if _exchange(tmp, out_dir):
        return tmp
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rmdir(old)
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    return old


def commit_dir(tmp: Path, out_dir: Path, overwrite: bool, owned=()) -> None:
    """Moves a finished staging directory to ``out_dir`` (``tmp`` is removed if that fails).

    Absent or empty destination: one rename. Replacing an earlier export: the old entries not
    in ``owned`` (the top-level names the new export writes) are linked into ``tmp`` first; then
    an atomic exchange where the kernel has renameat2, else rename-aside then rename-in (readers
    may see the path missing for that instant, never a mixed or partial export). The old export
    is then deleted, except what changed meanwhile (see ``_remove_old``).
    """
    try:
        check_destination(out_dir, overwrite)
        if not out_dir.exists() or not any(out_dir.iterdir()):
            fsync_tree(tmp)
            os.replace(tmp, out_dir)  # replaces an empty directory atomically on POSIX
            fileio.fsync_dir(out_dir.parent)
            return
        owned = set(owned) | {MANIFEST}
        carried = _carry_over(out_dir, tmp, owned)
        fsync_tree(tmp)
        old = _swap(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fileio.fsync_dir(out_dir.parent)
    _remove_old(old, owned, carried)


def write_file_atomic(path: Path, data, overwrite: bool, arg: str = "path",
                      flag: str = "overwrite=True (--overwrite)") -> None:
    """Writes bytes (or a buffer such as TensorRT's IHostMemory) to ``path`` atomically
    (``fileio.atomic_path``: a replaced file keeps its mode, a new one gets the umask's)."""
    fileio.check_writable(path, overwrite, arg, flag)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with fileio.atomic_path(path, replace=overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(memoryview(data))
