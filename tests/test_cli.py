"""``python -m ldmfast``: the command table, generate end to end, and error reporting."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from ldmfast import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("LDMFAST_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "ldmfast", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from ldmfast import checkpoint, configs
    from ldmfast.pipeline import LatentDiffusion
    torch.manual_seed(0)
    model = LatentDiffusion.from_components(configs.build("tiny"))
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")
    checkpoint.save(model, path)
    return path, model


def test_help_lists_every_command():
    r = run_cli("--help")
    assert r.returncode == 0, r.stderr
    for name in cli.COMMANDS:
        assert name in r.stdout
    r = run_cli("generate", "--help")
    assert r.returncode == 0
    for opt in ("--checkpoint", "--steps", "--guidance", "--seed", "--out", "--sampler",
                "--height", "--width", "--batch", "--negative", "--device", "--dtype",
                "--no-progress"):
        assert opt in r.stdout


def test_missing_checkpoint_is_one_line_and_exit_2(tmp_path):
    r = run_cli("generate", "a cat", "--checkpoint", str(tmp_path / "nope.ckpt"), "--steps", "2")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.ckpt" in lines[0] and "does not exist" in lines[0]
    assert "Traceback" not in r.stderr


def test_generate_writes_the_png_of_txt2img(tiny_checkpoint, tmp_path):
    path, model = tiny_checkpoint
    out = tmp_path / "out.png"
    r = run_cli("generate", "a red cat", "--checkpoint", path, "--steps", "2", "--seed", "0",
                "--height", "16", "--width", "16", "--out", str(out), "--no-progress",
                "--device", "cpu", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["out.png"]
    img = Image.open(out)
    assert img.size == (16, 16) and img.format == "PNG"
    ref = model.txt2img("a red cat", steps=2, guidance_scale=7.5, seed=0, height=16, width=16,
                        progress=False)[0]
    diff = (torch.tensor(list(img.convert("RGB").getdata()))
            - torch.tensor(list(ref.getdata()))).abs()
    assert diff.max() <= 1  # same seed, same model: the same image up to rounding


def test_usage_errors_exit_2_in_process(tiny_checkpoint, tmp_path, capsys):
    path, _ = tiny_checkpoint
    base = ["generate", "a cat", "--checkpoint", path, "--out", str(tmp_path / "x.png"),
            "--no-progress", "--device", "cpu"]
    assert cli.main(base + ["--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert cli.main(base + ["--sampler", "heun"]) == 2
    assert "unknown sampler" in capsys.readouterr().err
    assert cli.main(base + ["--steps", "1", "--height", "15", "--width", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # f = 4 and one U-Net downsampling: the latent must halve evenly
    assert len(err) == 1 and "height must be a positive multiple of 8" in err[0]
    assert cli.main(base + ["--steps", "1", "--cuda-graph"]) == 2  # base has --device cpu
    err = capsys.readouterr().err
    assert "--cuda-graph needs a CUDA GPU" in err
    # checked before the checkpoint is read: a missing one does not come first
    missing = [a if a != path else str(tmp_path / "none.ckpt") for a in base]
    assert cli.main(missing + ["--steps", "1", "--cuda-graph"]) == 2
    assert "--cuda-graph needs a CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse's own usage errors are also status 2
        cli.main(["generate", "--steps", "2"])
    assert e.value.code == 2
    assert not os.path.exists(tmp_path / "x.png")


def test_generate_never_replaces_a_file_it_was_not_told_to(tiny_checkpoint, tmp_path, capsys):
    path, _ = tiny_checkpoint
    base = ["generate", "a cat", "--checkpoint", path, "--steps", "1", "--height", "16",
            "--width", "16", "--no-progress", "--device", "cpu"]
    model_bytes = open(path, "rb").read()
    # the model itself, even with --overwrite: refused before anything is loaded or sampled
    for extra in ([], ["--overwrite"]):
        assert cli.main(base + ["--out", path] + extra) == 2
        assert "--out" in capsys.readouterr().err
    other = tmp_path / "notes.png"  # named .png but not a PNG image
    other.write_text("my notes")
    assert cli.main(base + ["--out", str(other), "--overwrite"]) == 2
    assert "is not a PNG image" in capsys.readouterr().err
    assert open(path, "rb").read() == model_bytes and other.read_text() == "my notes"
    # an earlier image: kept unless --overwrite, and then replaced keeping its permissions
    out = tmp_path / "cat.png"
    assert cli.main(base + ["--out", str(out)]) == 0
    first = out.read_bytes()
    os.chmod(out, 0o640)
    assert cli.main(base + ["--out", str(out), "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--overwrite" in err[0]
    assert out.read_bytes() == first
    assert cli.main(base + ["--out", str(out), "--seed", "1", "--overwrite"]) == 0
    assert out.read_bytes() != first and os.stat(out).st_mode & 0o777 == 0o640
    # a batch: every name checked before the first is written
    (tmp_path / "b-001.png").write_bytes(first)
    assert cli.main(base + ["--out", str(tmp_path / "b.png"), "--batch", "2"]) == 2
    assert "b-001.png" in capsys.readouterr().err
    assert not (tmp_path / "b-000.png").exists() and not (tmp_path / "b.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == \
        ["b-001.png", "cat.png", "notes.png"]  # and no temporary files left
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_without_checkpoint_a_missing_builtin_model_is_a_usage_error(tmp_path, monkeypatch,
                                                                    capsys):
    import ldmfast
    # an install without the shipped weights: the package's folder seen from elsewhere
    monkeypatch.setattr(ldmfast, "__file__", str(tmp_path / "__init__.py"))
    out = tmp_path / "x.png"
    assert cli.main(["generate", "a red circle", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no --checkpoint" in err[0]
    assert "python -m ldmfast train --recipe shapes" in err[0]
    assert not out.exists()
    with pytest.raises(ValueError, match="unknown built-in model 'sd15'"):
        ldmfast.builtin_path("sd15")


BUILTIN = os.path.join(ROOT, "ldmfast", "weights", "shapes.safetensors")


@pytest.mark.skipif(not os.path.exists(BUILTIN), reason="the built-in model is not shipped")
def test_generate_without_checkpoint_uses_the_builtin_model(tmp_path):
    import ldmfast
    out = tmp_path / "x.png"
    r = run_cli("generate", "a green triangle", "--steps", "5", "--seed", "3", "--out", str(out),
                "--no-progress", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    model = ldmfast.load()
    assert model.guidance_scale == model.config["sampling"]["guidance_scale"] != 7.5  # the recipe's
    ref = model.txt2img("a green triangle", steps=5, guidance_scale=model.guidance_scale, seed=3,
                        progress=False)[0]
    img = Image.open(out).convert("RGB")
    assert img.size == ref.size == (64, 64)
    diff = (torch.tensor(list(img.getdata())) - torch.tensor(list(ref.getdata()))).abs()
    assert diff.max() <= 1


def test_commands_plug_in_through_the_table(capsys):
    class Echo:
        HELP = "repeat a word"

        @staticmethod
        def add_arguments(p):
            p.add_argument("word")

        @staticmethod
        def run(args):
            print(args.word * 2)
            return 3

    parser = cli.build_parser({"echo": Echo, "generate": cli.COMMANDS["generate"]})
    args = parser.parse_args(["echo", "ab"])
    assert args._command.run(args) == 3 and capsys.readouterr().out.strip() == "abab"
    assert "repeat a word" in parser.format_help()
