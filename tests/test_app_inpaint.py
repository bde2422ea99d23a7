"""The Inpaint tab (issue 9, app side), built from the inpainting families' declared inputs and options, driven
with gradio_client and called directly: image + mask in, A1111's options (mask blur, only masked, masked content,
paste back) applied, infotext fields written and read back by PNG Info, bad masks refused with nothing written.

Tiny sd1_inpaint / sd2_inpaint checkpoints (9-channel UNets in the released layouts, random weights).
"""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from PIL import Image

import app
from sd.pipeline import ModelCache
from sd.pnginfo import parse_parameters, to_settings

from .serving import serving

W = H = 64


def picture() -> Image.Image:
    """A 64x64 RGB test image: a horizontal gradient with a blue square."""
    a = np.zeros((H, W, 3), dtype=np.uint8)
    a[..., 0] = np.linspace(0, 255, W, dtype=np.uint8)[None, :]
    a[..., 1] = 80
    a[20:44, 8:30, 2] = 255
    return Image.fromarray(a)


def square_mask(x1=24, y1=24, x2=40, y2=40, size=(W, H)) -> Image.Image:
    m = np.zeros((size[1], size[0]), dtype=np.uint8)
    m[y1:y2, x1:x2] = 255
    return Image.fromarray(m, "L")


@pytest.fixture(scope="module")
def world(tiny_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("inpaint-app")
    models, outputs = root / "models", root / "outputs"
    models.mkdir()
    os.symlink(tiny_files("sd1_inpaint"), models / "sd1-inpaint.safetensors")
    os.symlink(tiny_files("sd2_inpaint"), models / "sd2-inpaint.safetensors")
    picture().save(root / "image.png")
    square_mask().save(root / "mask.png")
    demo = app.build_app(models, device="cpu", dtype="float32", cache=ModelCache(), outputs_dir=outputs)
    from gradio_client import Client

    with serving(demo, outputs) as url:
        yield dict(root=root, outputs=outputs, demo=demo, client=Client(url, verbose=False))


def run(world, **kw):
    s = dict(checkpoint="sd1-inpaint.safetensors", prompt="a red ball", negative_prompt="", sampler="Euler",
             schedule="Normal", steps=2, cfg=5, seed=7, width=W, height=H, batch_size=1, batch_count=1,
             image=picture(), mask=square_mask(), mask_blur=0, masked_content="original",
             inpaint_area="whole picture", masked_padding=32, paste_back=False)
    s.update(kw)
    return app.run_request(world["demo"].sd_context, "inpaint", s, threading.Event(), lambda *a: None)


def test_inpaint_tab_is_built_from_the_families(world):
    names = app.tab_inputs("inpaint")
    i = names.index("image")    # the family's inputs, in order, after the common ones (app-wide extras follow)
    assert names[i:i + 7] == ("image", "mask", "mask_blur", "masked_content", "inpaint_area", "masked_padding",
                              "paste_back")
    assert names.index("vae") < i
    assert "init_image" not in names and "strength" not in names     # the families take their own image
    assert {f.name for f in app.family_tabs()["inpaint"]} == {"sd1-inpaint", "sd2-inpaint", "sdxl-inpaint"}
    comps = {c.get("props", {}).get("elem_id"): c for c in world["demo"].config["components"]}
    assert comps["inpaint-editor"]["type"] == "imageeditor" and comps["inpaint-mask"]["type"] == "image"


def test_inpaint_endpoint_with_image_and_mask(world):
    from gradio_client import handle_file

    c = world["client"]
    images, _, status, infotext, seed, _ = c.predict(
        checkpoint="sd2-inpaint.safetensors", prompt="a red ball", steps=2, seed=5, width=W, height=H,
        image=handle_file(str(world["root"] / "image.png")), mask=handle_file(str(world["root"] / "mask.png")),
        api_name="/generate_inpaint")
    out = Image.open(images[0]["image"])
    assert out.size == (W, H) and seed == 5 and status.startswith("done: 1 image(s), 2 steps")
    s = to_settings(parse_parameters(infotext))
    assert (s["mask_blur"], s["masked_content"], s["inpaint_area"]) == (4, "original", "whole picture")
    assert s["strength"] == 1.0 and s["model"] == "sd2-inpaint"
    # PNG Info reads it back and sends the options to the Inpaint tab
    text, settings, hint = c.predict(handle_file(images[0]["image"]), api_name="/png_info")
    assert "Inpaint" in hint
    up, _ = app.send_values(world["demo"].sd_context, "inpaint", settings)
    assert up["checkpoint"] == "sd2-inpaint.safetensors" and up["mask_blur"] == 4
    assert up["masked_content"] == "original" and up["inpaint_area"] == "whole picture"


def test_paste_back_keeps_every_pixel_outside_the_mask(world):
    out = np.asarray(Image.open(run(world, paste_back=True).gallery[0][0]).convert("RGB")).astype(int)
    orig = np.asarray(picture()).astype(int)
    m = np.asarray(square_mask()) > 0
    assert np.array_equal(out[~m], orig[~m])                    # outside: the original, exactly
    assert np.abs(out[m] - orig[m]).mean() > 5                 # inside: repainted
    raw = np.asarray(Image.open(run(world).gallery[0][0]).convert("RGB")).astype(int)
    assert np.abs(raw[~m] - orig[~m]).mean() > 5               # without paste back the model's output is kept


def test_only_masked_crops_and_pastes_back(world):
    big = picture().resize((128, 128))
    mask = square_mask(40, 40, 72, 72, size=(128, 128))
    out = run(world, image=big, mask=mask, inpaint_area="only masked", masked_padding=8, width=W, height=H)
    img = np.asarray(Image.open(out.gallery[0][0]).convert("RGB")).astype(int)
    assert img.shape == (128, 128, 3)                          # the full image comes back
    orig = np.asarray(big).astype(int)
    m = np.asarray(mask) > 0
    assert np.array_equal(img[~m], orig[~m]) and np.abs(img[m] - orig[m]).mean() > 5
    assert "only masked: the box (32, 32, 80, 80)" in out.status
    assert "Inpaint area: Only masked" in out.infotext and "Masked area padding: 8" in out.infotext


def test_resized_image_is_said(world):
    out = run(world, image=picture().resize((96, 96)), mask=square_mask(size=(96, 96)))
    assert "the 96x96 image and its mask were resized to 64x64" in out.status


@pytest.mark.parametrize("mask, match", [
    (square_mask(size=(32, 32)), "the mask is 32x32 but the image is 64x64; give a mask of the image's size"),
    (Image.new("L", (W, H), 0), "the mask is all black"),
    ("not-an-image.txt", "is not an image"),
])
def test_bad_masks_are_refused_and_nothing_is_written(world, mask, match):
    if mask == "not-an-image.txt":
        (world["root"] / mask).write_text("hello")
        mask = str(world["root"] / mask)
    before = set(world["outputs"].rglob("*.png"))
    with pytest.raises(ValueError, match=match):
        run(world, mask=mask)
    assert set(world["outputs"].rglob("*.png")) == before


def test_editor_strokes_become_the_mask():
    bg = picture()
    layer = Image.new("RGBA", bg.size, (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (10, 12, 20, 30))
    image, mask = app.editor_to_inputs({"background": bg, "layers": [layer], "composite": bg})
    m = np.asarray(mask)
    assert image.size == (W, H) and mask.mode == "L"
    assert (m[12:30, 10:20] == 255).all() and m.sum() == 255 * 10 * 18
    assert app.editor_to_inputs(None) == (None, None)
