"""The SD3 / 3.5 tab's Preset dropdown in a real browser (chromium via playwright, tests/test_browser.py's page):
a models folder whose first SD3 checkpoint is `sd3.5_large_turbo.safetensors` (tiny sd35_large layout; CLIP-L/G in
text_encoders/) opens with the turbo preset preselected (4 steps, CFG 1, said in the facts); picking "SD3.5 medium"
in the dropdown sets 50 steps and CFG 5; the size sliders step by 16."""
from __future__ import annotations


import pytest
from safetensors.torch import save_file

import app
from sd.pipeline import ModelCache
from sd.sd3_text import CLIP_G_PREFIX, CLIP_L_PREFIX

from .serving import serving
from .test_browser import browser_page
from .tiny_sd3 import tiny_mmdit_tensors, tiny_text_tensors, tiny_vae_tensors


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    models = tmp_path_factory.mktemp("browser-sd3")
    save_file({k: v.contiguous() for k, v in {**tiny_mmdit_tensors("sd35_large"), **tiny_vae_tensors()}.items()},
              str(models / "sd3.5_large_turbo.safetensors"))
    text = tiny_text_tensors()
    (models / "text_encoders").mkdir()
    for name, prefix in (("clip_l", CLIP_L_PREFIX), ("clip_g", CLIP_G_PREFIX)):
        save_file({k[len(prefix):]: v.contiguous() for k, v in text.items() if k.startswith(prefix)},
                  str(models / "text_encoders" / f"{name}.safetensors"))
    demo = app.build_app(models, device="cpu", dtype="float32", cache=ModelCache(), demo_path=None,
                         outputs_dir=tmp_path_factory.mktemp("browser-sd3-out"))
    with serving(demo) as url:
        yield url


def test_preset_dropdown_in_chromium(url):
    from playwright.sync_api import expect

    with browser_page(url, 1600) as page:
        page.get_by_role("tab", name="SD3 / 3.5").click()
        expect(page.locator("#sd3-facts")).to_contain_text("Preset: SD3.5 large turbo")
        expect(page.locator("#sd3-preset input")).to_have_value("SD3.5 large turbo")
        expect(page.locator("#sd3-steps input[type=number]")).to_have_value("4")
        expect(page.locator("#sd3-cfg input[type=number]")).to_have_value("1")
        assert page.locator("#sd3-width input[type=range]").get_attribute("step") == "16"
        page.locator("#sd3-preset input").click()
        page.get_by_role("option", name="SD3.5 medium").click()
        expect(page.locator("#sd3-steps input[type=number]")).to_have_value("50")
        expect(page.locator("#sd3-cfg input[type=number]")).to_have_value("5")
