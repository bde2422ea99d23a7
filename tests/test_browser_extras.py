"""A real browser on the SD 1.x tab's A1111 habits (app_extras.py): a click on a LoRA of the extra-networks picker
puts its tag into the prompt, a style is picked, the Hires. fix accordion is switched on, Generate: the image is
twice the form's size and the infotext carries the merged prompt, the LoRA hash and the hires fields.

Reuses tests/test_browser.py's chromium page and generate-and-wait helpers; the screenshot goes to test-artifacts/.
"""
from __future__ import annotations

import os

import pytest
from PIL import Image
from torch import nn

import app
from sd.pipeline import ModelCache, load_model

from .serving import serving
from .test_browser import ARTIFACTS, browser_page, generate, set_number
from .test_lora import _lora_for


@pytest.fixture(scope="module")
def url(tiny_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("browser-extras")
    models = root / "models"
    (models / "loras").mkdir(parents=True)
    os.symlink(tiny_files("sd1"), models / "sd1.safetensors")
    model = load_model(models / "sd1.safetensors")
    names = {n for n, m in model.parts.unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    _lora_for(model, models / "loras" / "styleA.safetensors", 10, names)
    Image.new("RGB", (64, 64), (200, 40, 40)).save(models / "loras" / "styleA.png")
    (root / "styles.csv").write_text('name,prompt,negative_prompt\nneon,"neon {prompt}",dark\n')
    outputs = root / "outputs"
    demo = app.build_app(models, device="cpu", dtype="float32", cache=ModelCache(), outputs_dir=outputs,
                         demo_path=None)
    with serving(demo, outputs) as url:
        yield url


def test_picker_style_and_hires_in_chromium(url):
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    with browser_page(url, 2200) as page:
        page.get_by_role("tab", name="SD 1.x").click()
        prompt = page.locator("#sd1-prompt textarea")
        prompt.fill("a red circle")
        for elem_id, v in (("sd1-width", 64), ("sd1-height", 64), ("sd1-steps", 1)):
            set_number(page, elem_id, v)
        page.locator("#sd1-networks-accordion").get_by_text("Extra networks").first.click()
        page.locator("#sd1-networks .thumbnail-item").first.click()
        expect(prompt).to_have_value("a red circle <lora:styleA:1>")
        page.locator("#sd1-styles input").first.click()
        page.get_by_role("option", name="neon").click()
        page.locator("#sd1-hires-accordion").get_by_text("Hires. fix").first.click()
        page.locator("#sd1-hires input[type=checkbox]").check()
        set_number(page, "sd1-hires-steps", 1)
        img, info = generate(page, "sd1")              # 1 + 1 steps
        assert img.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [128, 128]
        assert info.startswith("neon a red circle <lora:styleA:1>\nNegative prompt: dark\nSteps: 1,"), info
        for field in ("Size: 64x64", "Denoising strength: 0.7", "Hires upscale: 2", "Hires steps: 1",
                      "Hires upscaler: Latent", "Lora hashes"):
            assert field in info, (field, info)
        page.screenshot(path=str(ARTIFACTS / "browser-extras.png"), full_page=True)
    assert (ARTIFACTS / "browser-extras.png").stat().st_size > 10_000
