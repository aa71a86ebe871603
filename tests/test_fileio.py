"""ldmfast.fileio: whole files or none, the umask's permissions, no silent replacement."""
from __future__ import annotations

import os

import pytest
import torch

from ldmfast import checkpoint, configs, fileio
from ldmfast.pipeline import LatentDiffusion


def test_atomic_path_is_all_or_nothing_with_the_umask_mode(tmp_path):
    path = tmp_path / "a.bin"
    old = os.umask(0o027)
    try:
        with fileio.atomic_path(path) as tmp:
            open(tmp, "wb").write(b"one")
        assert path.read_bytes() == b"one" and os.stat(path).st_mode & 0o777 == 0o640
        os.chmod(path, 0o604)  # a replaced file keeps its own mode
        with fileio.atomic_path(path) as tmp:
            open(tmp, "wb").write(b"two")
        assert path.read_bytes() == b"two" and os.stat(path).st_mode & 0o777 == 0o604
    finally:
        os.umask(old)
    with pytest.raises(RuntimeError, match="half"):
        with fileio.atomic_path(path) as tmp:
            open(tmp, "wb").write(b"thr")
            raise RuntimeError("stopped half way")
    assert path.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["a.bin"]  # the temporary file is gone


def test_check_writable_names_the_argument(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(FileExistsError, match=r"^export: .*x\.safetensors.* --force"):
        fileio.check_writable(f, False, arg="export", flag="--force")
    assert fileio.check_writable(f, True) == str(f)
    with pytest.raises(IsADirectoryError, match="path: .* is a folder"):
        fileio.check_writable(tmp_path, True)


def test_save_replaces_a_checkpoint_only_when_told(tmp_path):
    torch.manual_seed(0)
    model = LatentDiffusion.from_components(configs.build("tiny"))
    path = tmp_path / "m.safetensors"
    checkpoint.save(model, path)
    before = path.read_bytes()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        checkpoint.save(model, path)
    assert path.read_bytes() == before
    checkpoint.save(model, path, overwrite=True)
    assert path.read_bytes() != before
    assert os.stat(path).st_mode & 0o777 == fileio.created_mode()  # not mkstemp's 0600


def test_a_file_that_appears_meanwhile_is_kept(tmp_path):
    path = tmp_path / "a.png"
    with pytest.raises(FileExistsError, match="appeared while it was being written"):
        with fileio.atomic_path(path, replace=False) as tmp:
            open(tmp, "wb").write(b"ours")
            path.write_bytes(b"someone else's")  # between the check and the move
    assert path.read_bytes() == b"someone else's" and os.listdir(tmp_path) == ["a.png"]


def test_reading_the_umask_does_not_change_it_for_other_threads(tmp_path):
    # Setting and restoring the umask to read it would give files other threads create
    # meanwhile mode 0666 (seen: 1896 of 5000 here).
    import threading
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            fileio.created_mode()
    old = os.umask(0o022)
    t = threading.Thread(target=spin)
    t.start()
    try:
        for i in range(2000):
            fd = os.open(tmp_path / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o666)
            os.close(fd)
    finally:
        stop.set()
        t.join()
        os.umask(old)
    modes = {os.stat(tmp_path / f"f{i}").st_mode & 0o777 for i in range(2000)}
    assert modes == {0o644}
