"""A real browser (chromium via playwright, the helpers of tests/test_browser.py) on the Depth to image tab: upload an
init image, leave the depth map empty, Generate; the gallery shows the result and, after it, the depth map the run
used (MiDaS's estimate from the tiny sd2-depth file): an image of the output's size with many grey levels.
The screenshot goes to test-artifacts/browser-depth.png.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

import app
from sd.pipeline import ModelCache

from .test_browser import ARTIFACTS, serve, _fetch_image, browser_page, generate, set_number


@pytest.fixture(scope="module")
def url(tiny_files, tmp_path_factory):
    models = tmp_path_factory.mktemp("browser-depth-models")
    os.symlink(tiny_files("sd2_depth"), models / "depth.safetensors")
    outputs = tmp_path_factory.mktemp("browser-depth-outputs")
    demo = app.build_app(models, device="cpu", dtype="float32", cache=ModelCache(), outputs_dir=outputs)
    yield from serve(demo, outputs)


def test_depth_tab_shows_the_estimated_depth_map(url, tmp_path):
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    rng = np.random.default_rng(3)
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(small).resize((96, 64), Image.BICUBIC).save(tmp_path / "photo.png")
    with browser_page(url, 1800) as page:
        page.get_by_role("tab", name="Depth to image").click()
        expect(page.locator("#depth-facts")).to_contain_text("sd2-depth")
        page.locator("#depth-image input[type=file]").first.set_input_files(str(tmp_path / "photo.png"))
        expect(page.locator("#depth-width input[type=number]")).to_have_value("96")   # the size follows the image
        expect(page.locator("#depth-height input[type=number]")).to_have_value("64")
        page.locator("#depth-prompt textarea").fill("a house by a lake")
        set_number(page, "depth-steps", 3)          # strength 0.9: int(0.9 * 3) = 2 steps run
        img, info = generate(page, "depth")
        assert img.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [96, 64]
        assert "Denoising strength: 0.9" in info
        thumbs = page.locator("#depth-gallery img")
        expect(thumbs).to_have_count(2)
        expect(page.locator("#depth-gallery")).to_contain_text("depth map used (MiDaS estimate)")
        page.wait_for_function(
            "() => { const i = document.querySelectorAll('#depth-gallery img')[1]; return i && i.complete "
            "&& i.naturalWidth > 0; }", timeout=120_000)
        depth = _fetch_image(page, thumbs.nth(1))                      # (H, W, 3) int
        page.screenshot(path=str(ARTIFACTS / "browser-depth.png"), full_page=True)
    assert depth.shape == (64, 96, 3)
    assert (depth[..., 0] == depth[..., 1]).all() and (depth[..., 1] == depth[..., 2]).all()   # grey
    assert len(np.unique(depth[..., 0])) > 16 and (depth.min(), depth.max()) == (0, 255)
    assert (ARTIFACTS / "browser-depth.png").stat().st_size > 10_000
