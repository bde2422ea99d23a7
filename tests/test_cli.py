"""`python -m sd inspect` and `python -m sd generate` on tiny checkpoints of each layout, as .safetensors and .ckpt.

The commands run in-process through `sd.__main__.main` (the same code `python -m sd` runs); one real subprocess
call per command checks the module entry point itself.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd.__main__ import main

from .tiny import reference_shapes, write_tiny

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"sd1": "sd1", "sd2_768_v": "sd2", "sdxl_base": "sdxl-base", "sdxl_refiner": "sdxl-refiner"}


def run_sd(capsys, *args: str) -> subprocess.CompletedProcess:
    """Run `python -m sd ARGS` in-process; returns (returncode, stdout, stderr) like a finished subprocess."""
    code = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_inspect_and_generate(tiny_files, tmp_path: Path, capsys, name: str, suffix: str) -> None:
    # the .ckpt is written into this test's folder (removed when it passes), not the session's cache: 1 GB less disk
    path = tiny_files(name) if suffix == ".safetensors" else write_tiny(name, tmp_path / f"{name}{suffix}")
    r = run_sd(capsys, "inspect", str(path))
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["family"] == LAYOUTS[name]
    assert rep["prediction"] in ("eps", "v") and rep["prediction_decided_by"]
    # every tensor of the file is accounted for; the tiny file has the released key set exactly
    assert rep["tensors"]["total"] == len(reference_shapes(name))
    assert rep["tensors"]["loaded"] + rep["tensors"]["ignored"] + rep["tensors"]["unsupported"] == rep["tensors"]["total"]
    assert rep["parameters"]["unet"] > 0 and rep["parameters"]["vae"] > 0
    out = tmp_path / "img.png"
    r = run_sd(capsys, "generate", "--checkpoint", str(path), "--prompt", "a red circle", "--width", "64", "--height", "48",
               "--steps", "3", "--cfg", "5", "--seed", "3", "--out", str(out), "--batch-size", "2",
               "--prediction", "eps")
    assert r.returncode == 0, r.stderr
    imgs = json.loads(r.stdout.strip().splitlines()[-1])["images"]
    assert len(imgs) == 2
    a = np.asarray(Image.open(imgs[0]))
    assert a.shape == (48, 64, 3) and a.std() > 0


def test_module_entry_point(tiny_files, tmp_path: Path) -> None:
    """`python -m sd` itself, as a user runs it."""
    path = tiny_files("sd1")
    r = subprocess.run([sys.executable, "-m", "sd", "inspect", str(path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["family"] == "sd1"
    out = tmp_path / "one.png"
    r = subprocess.run([sys.executable, "-m", "sd", "generate", "--checkpoint", str(path), "--prompt", "a cat",
                        "--width", "32", "--height", "32", "--steps", "2", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (32, 32)
