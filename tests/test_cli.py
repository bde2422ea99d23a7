"""`python -m sd inspect` and `python -m sd generate` on tiny checkpoints of each layout, as .safetensors and .ckpt."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .tiny import reference_shapes

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"sd1": "sd1", "sd2_768_v": "sd2", "sdxl_base": "sdxl-base", "sdxl_refiner": "sdxl-refiner"}


def run_sd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sd", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_inspect_and_generate(tiny_files, tmp_path: Path, name: str, suffix: str) -> None:
    path = tiny_files(name, suffix)
    r = run_sd("inspect", str(path))
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["family"] == LAYOUTS[name]
    assert rep["prediction"] in ("eps", "v") and rep["prediction_decided_by"]
    # every tensor of the file is accounted for; the tiny file has the released key set exactly
    assert rep["tensors"]["total"] == len(reference_shapes(name))
    assert rep["tensors"]["loaded"] + rep["tensors"]["ignored"] + rep["tensors"]["unsupported"] == rep["tensors"]["total"]
    assert rep["parameters"]["unet"] > 0 and rep["parameters"]["vae"] > 0
    out = tmp_path / "img.png"
    r = run_sd("generate", "--checkpoint", str(path), "--prompt", "a red circle", "--width", "64", "--height", "48",
               "--steps", "3", "--cfg", "5", "--seed", "3", "--out", str(out), "--batch-size", "2",
               "--prediction", "eps")
    assert r.returncode == 0, r.stderr
    imgs = json.loads(r.stdout.strip().splitlines()[-1])["images"]
    assert len(imgs) == 2
    a = np.asarray(Image.open(imgs[0]))
    assert a.shape == (48, 64, 3) and a.std() > 0
