"""LoRA tags through the app and the CLI (issue 12): `<lora:NAME:w>` in a tab's prompt resolves in the models folder's
LoRA listing, changes the image, and the infotext carries `Lora hashes`; a name that is not listed is one line. The
tabs' VAE dropdown and the CLI's `--loras-dir` / `--vae FILE|Automatic|None`."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from PIL import Image
from torch import nn

import app
from sd.pipeline import ModelCache, load_model
from sd.pnginfo import parse_parameters, to_settings

from .test_app import SD1
from .test_cli import run_sd
from .test_lora import _lora_for


def test_lora_tag_in_the_app(tiny_files, tmp_path):
    models = tmp_path / "models"
    (models / "loras").mkdir(parents=True)
    os.link(tiny_files("sd1"), models / "sd1.safetensors")
    model = load_model(models / "sd1.safetensors")
    names = {n for n, m in model.parts.unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    _lora_for(model, models / "loras" / "styleA.safetensors", 10, names)
    demo = app.build_app(models, device="cpu", cache=ModelCache(), outputs_dir=tmp_path / "out")
    ctx = demo.sd_context

    def run(prompt):
        out = app.run_request(ctx, "sd1", dict(SD1, checkpoint="sd1.safetensors", prompt=prompt), threading.Event(),
                              lambda *a: None)
        return out, np.asarray(Image.open(out.gallery[0][0])).astype(int)

    plain, a = run("a red circle")
    tagged, b = run("a red circle <lora:styleA:0.9>")
    assert np.abs(a - b).mean() > 1                      # the LoRA changed the image
    s = to_settings(parse_parameters(tagged.infotext))
    assert s["prompt"] == "a red circle <lora:styleA:0.9>" and "styleA" in s["lora_hashes"]
    assert "Lora hashes" not in plain.infotext
    with pytest.raises(Exception, match="(?i)no such lora"):
        run("a red circle <lora:../../etc/passwd:1>")


def test_lora_and_vae_flags_on_the_cli(tiny_files, tmp_path, capsys):
    ckpt = tmp_path / "sd1.safetensors"
    os.link(tiny_files("sd1"), ckpt)
    model = load_model(ckpt)
    names = {n for n, m in model.parts.unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    (tmp_path / "loras").mkdir()
    _lora_for(model, tmp_path / "loras" / "styleA.safetensors", 10, names)
    common = ["generate", "--checkpoint", str(ckpt), "--width", "64", "--height", "64", "--steps", "2"]

    def image(name, *extra):
        r = run_sd(capsys, *common, "--out", str(tmp_path / name), *extra)
        assert r.returncode == 0, r.stderr
        return np.asarray(Image.open(tmp_path / name)).astype(int)

    plain = image("plain.png", "--prompt", "a cat")
    tagged = image("tagged.png", "--prompt", "a cat <lora:styleA:1>", "--loras-dir", str(tmp_path / "loras"))
    auto = image("auto.png", "--prompt", "a cat", "--vae", "Automatic")   # no NAME.vae.* beside: its own VAE
    assert np.abs(plain - tagged).mean() > 1 and np.array_equal(plain, auto)
    r = run_sd(capsys, *common, "--prompt", "a cat", "--vae", str(tmp_path / "missing.safetensors"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--vae" in r.stderr and "no such file" in r.stderr


def test_vae_choice_in_the_app(tiny_files, tmp_path):
    """The tab's VAE dropdown: Automatic and None are the checkpoint's own; a file from the models folder's VAE
    folder decodes instead (other pixels, `VAE` in the infotext); a name outside that listing is one line."""
    from safetensors.torch import load_file, save_file

    models = tmp_path / "models"
    (models / "VAE").mkdir(parents=True)
    os.link(tiny_files("sd1"), models / "sd1.safetensors")
    vae = {k[len("first_stage_model."):]: v for k, v in load_file(str(models / "sd1.safetensors")).items()
           if k.startswith("first_stage_model.")}
    vae["decoder.conv_out.bias"] = vae["decoder.conv_out.bias"] + 0.3          # a different decoder
    save_file({k: v.contiguous() for k, v in vae.items()}, str(models / "VAE" / "other.safetensors"))
    demo = app.build_app(models, device="cpu", cache=ModelCache(), outputs_dir=tmp_path / "out")
    ctx = demo.sd_context
    assert "other.safetensors" in " ".join(app.vae_choices(ctx.index.root))

    def run(vae):
        out = app.run_request(ctx, "sd1", dict(SD1, checkpoint="sd1.safetensors", vae=vae), threading.Event(),
                              lambda *a: None)
        return out, np.asarray(Image.open(out.gallery[0][0])).astype(int)

    (_, auto), (_, own) = run("Automatic"), run("None")
    name = next(c for c in app.vae_choices(ctx.index.root) if "other" in c)
    other, img = run(name)
    assert np.array_equal(auto, own) and np.abs(img - own).mean() > 5
    assert "VAE: other" in other.infotext
    with pytest.raises(Exception, match="(?i)no such vae"):
        run("../sd1.safetensors")
