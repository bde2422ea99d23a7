"""LoRA tags through the app (issue 12): `<lora:NAME:w>` in a tab's prompt resolves in the models folder's LoRA
listing, changes the image, and the infotext carries `Lora hashes`; a name that is not listed is one line."""
from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
from PIL import Image
from torch import nn

import app
from sd.pipeline import ModelCache, load_model
from sd.pnginfo import parse_parameters, to_settings

from .test_app import SD1
from .test_lora import _lora_for


def test_lora_tag_in_the_app(tiny_files, tmp_path):
    models = tmp_path / "models"
    (models / "loras").mkdir(parents=True)
    shutil.copyfile(tiny_files("sd1"), models / "sd1.safetensors")
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
