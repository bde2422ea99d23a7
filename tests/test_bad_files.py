"""Bad input gives a one-line error naming the problem, never a traceback, and never runs code from a pickle."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sd.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def run_inspect(capsys, path: Path) -> tuple[int, str]:
    code = main(["inspect", str(path)])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line(code: int, err: str, *words: str) -> None:
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


def test_truncated_safetensors(tiny_files, tmp_path, capsys) -> None:
    data = tiny_files("sd1").read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    assert_one_line(*run_inspect(capsys, bad), "truncated", "cut.safetensors")


def test_text_file_renamed(tmp_path, capsys) -> None:
    bad = tmp_path / "notes.safetensors"
    bad.write_text("<html>404 not found</html>\n" * 20)
    assert_one_line(*run_inspect(capsys, bad), "not a safetensors file")
    bad2 = tmp_path / "notes.ckpt"
    bad2.write_text("hello")
    assert_one_line(*run_inspect(capsys, bad2), "not a PyTorch checkpoint")
    bad3 = tmp_path / "model.onnx"
    bad3.write_bytes(b"\0" * 64)
    assert_one_line(*run_inspect(capsys, bad3), "unsupported file type .onnx")


class _Payload:
    """Unpickling this would create a marker file (it calls Path.touch through __reduce__)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_pickle_is_refused_without_running(tmp_path, capsys) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": _Payload(marker)}, bad)
    code, err = run_inspect(capsys, bad)
    assert not marker.exists(), "the pickle payload ran"
    assert_one_line(code, err, "refused", "evil.ckpt")
    # control: the same payload does run under an unrestricted load, so the test can fail
    torch.load(bad, weights_only=False)
    assert marker.exists()


def test_unet_block_removed(tiny_files, tmp_path, capsys) -> None:
    sd = load_file(tiny_files("sd1"))
    cut = {k: v for k, v in sd.items() if not k.startswith("model.diffusion_model.input_blocks.4.")}
    bad = tmp_path / "noblock.safetensors"
    save_file(cut, bad)
    assert_one_line(*run_inspect(capsys, bad), "input_blocks.4")
    one = {k: v for k, v in sd.items() if k != "model.diffusion_model.output_blocks.3.1.proj_out.weight"}
    bad2 = tmp_path / "onekey.safetensors"
    save_file(one, bad2)
    assert_one_line(*run_inspect(capsys, bad2), "missing 1 tensors", "output_blocks.3.1.proj_out.weight")


def test_non_sd_model(tmp_path, capsys) -> None:
    bert = {f"bert.encoder.layer.{i}.attention.self.query.weight": torch.zeros(8, 8) for i in range(3)}
    bad = tmp_path / "bert.safetensors"
    save_file(bert, bad)
    assert_one_line(*run_inspect(capsys, bad), "no Stable Diffusion UNet", "bert.encoder")
    vae = {"encoder.down.0.block.0.conv1.weight": torch.zeros(4, 3, 3, 3), "decoder.up.0.block.0.conv1.weight": torch.zeros(4, 4, 3, 3)}
    bad2 = tmp_path / "vae.safetensors"
    save_file(vae, bad2)
    assert_one_line(*run_inspect(capsys, bad2), "standalone VAE")


def test_missing_file_and_bad_size_via_subprocess(tiny_files, tmp_path) -> None:
    r = subprocess.run([sys.executable, "-m", "sd", "inspect", str(tmp_path / "nope.safetensors")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "sd", "generate", "--checkpoint", str(tiny_files("sd1")), "--prompt", "x",
                        "--width", "65", "--height", "64", "--steps", "2", "--out", str(tmp_path / "o.png")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "multiples of 8" in r.stderr and "Traceback" not in r.stderr
