"""A real browser (Debian's chromium, driven by playwright) on the app: SDXL tab, prompt, crop slider, Generate;
the Inpaint tab: an image uploaded into the editor, a mask painted on it with the mouse, paste back, Generate;
the SD3 / 3.5 tab: shift and size set, Generate, the infotext and the facts (which text encoders were used).

The screenshot is kept under test-artifacts/ (gitignored). Timeouts are generous: the tiny SDXL checkpoint
runs on a shared 2-core CPU.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

import app
from sd.pipeline import ModelCache

from .serving import serving
from .tiny_sd3 import write_tiny_sd3, write_tiny_spiece

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def url(tiny_files, tmp_path_factory):
    models = tmp_path_factory.mktemp("browser-models")
    os.symlink(tiny_files("sdxl_base"), models / "sdxl.safetensors")
    os.symlink(tiny_files("sd1_inpaint"), models / "sd1-inpaint.safetensors")
    write_tiny_sd3("sd3_medium", models / "sd3m.safetensors")
    write_tiny_spiece(models / "spiece.model")
    outputs = tmp_path_factory.mktemp("browser-outputs")
    demo = app.build_app(models, device="cpu", dtype="float32", cache=ModelCache(), outputs_dir=outputs)
    yield from serve(demo, outputs)



def serve(demo, outputs):
    """Launch a built app on a free local port for a browser test; yields its URL and closes it after."""
    with serving(demo, outputs) as url:
        yield url

@contextmanager
def browser_page(url: str, height: int):
    """A headless chromium page on the app, loaded; closed afterwards."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian chromium is needed (apt-get install chromium)"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": height})
            page.set_default_timeout(120_000)
            page.goto(url, wait_until="domcontentloaded", timeout=120_000)
            yield page
        finally:
            browser.close()


def generate(page, tab: str):
    """Click the tab's Generate, wait for a finished run (a one-image status) and a loaded first gallery image;
    returns that image's locator and the infotext."""
    from playwright.sync_api import expect

    page.locator(f"#{tab}-generate").click()
    status = page.locator(f"#{tab}-status")
    expect(status).to_contain_text(re.compile("done|error"), timeout=600_000)
    assert status.inner_text().startswith("done: 1 image(s), 2 steps"), status.inner_text()
    img = page.locator(f"#{tab}-gallery img").first
    expect(img).to_be_visible()
    page.wait_for_function(
        f"() => {{ const i = document.querySelector('#{tab}-gallery img'); return i && i.complete "
        "&& i.naturalWidth > 0; }", timeout=120_000)
    return img, page.locator(f"#{tab}-infotext textarea").input_value()


def set_number(page, elem_id: str, value: int) -> None:
    """Type a value into the number box of a gradio slider and commit it."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    box.blur()


def test_sdxl_tab_in_chromium(url):
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    with browser_page(url, 1600) as page:
        page.get_by_role("tab", name="SDXL").click()
        expect(page.locator("#sdxl-facts")).to_contain_text("sdxl-base")
        page.locator("#sdxl-prompt textarea").fill("a yellow star on a black background")
        for elem_id, v in (("sdxl-width", 64), ("sdxl-height", 64), ("sdxl-steps", 2)):
            set_number(page, elem_id, v)
        crop = page.locator("#sdxl-crop-top input[type=range]")
        crop.focus()
        for _ in range(4):               # move the crop slider with the keyboard: 4 x 8 px
            crop.press("ArrowRight")
        expect(page.locator("#sdxl-crop-top input[type=number]")).to_have_value("32")
        img, info = generate(page, "sdxl")
        assert img.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [64, 64]
        assert info.startswith("a yellow star on a black background\nSteps: 2,")
        assert "SDXL crop top: 32" in info and "Size: 64x64" in info
        page.screenshot(path=str(ARTIFACTS / "browser-sdxl.png"), full_page=True)
    assert (ARTIFACTS / "browser-sdxl.png").stat().st_size > 10_000


def _fetch_image(page, locator) -> "np.ndarray":
    import io

    import numpy as np
    from PIL import Image

    src = locator.get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB")).astype(int)


def test_inpaint_tab_paints_a_mask_in_chromium(url, tmp_path):
    """Upload a 64x64 image into the editor, paint a stroke across its middle, keep the original outside the mask
    (paste back, blur 0), generate: pixels outside the painted mask are the original's, inside they changed."""
    import numpy as np
    from PIL import Image
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    a = np.zeros((64, 64, 3), dtype=np.uint8)
    a[..., 0] = np.linspace(0, 255, 64, dtype=np.uint8)[None, :]
    a[..., 1] = 80
    Image.fromarray(a).save(tmp_path / "image.png")
    with browser_page(url, 1800) as page:
        page.get_by_role("tab", name="Inpaint").click()
        expect(page.locator("#inpaint-facts")).to_contain_text("sd1-inpaint")
        editor = page.locator("#inpaint-editor")
        editor.locator("input[type=file]").first.set_input_files(str(tmp_path / "image.png"))
        expect(editor.locator("canvas").first).to_be_visible()
        editor.locator("button[aria-label='Brush']").first.click()
        box = editor.locator("canvas").first.bounding_box()
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(cx - 40, cy)
        page.mouse.down()
        for k in range(21):
            page.mouse.move(cx - 40 + 4 * k, cy)
        page.mouse.up()
        expect(page.locator("#inpaint-mask img")).to_be_visible()
        # the upload alone already sent an all-black mask: wait for the one with the stroke (the editor's change
        # event after the stroke reaches the server a moment later)
        deadline = time.time() + 120
        while (_fetch_image(page, page.locator("#inpaint-mask img").first)[..., 0] > 127).sum() == 0:
            assert time.time() < deadline, "the painted stroke never reached the mask input"
            page.wait_for_timeout(250)
        expect(page.locator("#inpaint-width input[type=number]")).to_have_value("64")
        page.locator("#inpaint-prompt textarea").fill("a red ball")
        set_number(page, "inpaint-steps", 2)
        set_number(page, "inpaint-mask-blur", 0)
        page.locator("#inpaint-paste-back input[type=checkbox]").check()
        out, info = generate(page, "inpaint")
        result = _fetch_image(page, out)
        mask = _fetch_image(page, page.locator("#inpaint-mask img").first)[..., 0] > 127
        used = _fetch_image(page, page.locator("#inpaint-image img").first)  # the editor's background
        page.screenshot(path=str(ARTIFACTS / "browser-inpaint.png"), full_page=True)
    assert result.shape == (64, 64, 3) and 200 < mask.sum() < 64 * 64 - 200  # a stroke, not everything
    assert "Mask blur: 0" in info and "Denoising strength: 1" in info
    assert np.abs(used - a).mean() < 2      # the browser's canvas round trip moves colours by a level at most
    outside, inside = np.abs(result - used)[~mask].mean(), np.abs(result - used)[mask].mean()
    assert outside == 0 and inside > 5, (outside, inside)


def test_sd3_tab_in_chromium(url):
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    with browser_page(url, 1600) as page:
        page.get_by_role("tab", name="SD3 / 3.5").click()
        expect(page.locator("#sd3-facts")).to_contain_text("MMDiT")
        page.locator("#sd3-prompt textarea").fill("a red circle")
        for elem_id, v in (("sd3-width", 64), ("sd3-height", 64), ("sd3-steps", 2)):
            set_number(page, elem_id, v)
        box = page.locator("#sd3-shift input[type=number]")
        box.fill("2")
        box.press("Enter")
        img, info = generate(page, "sd3")
        size = img.evaluate("i => [i.naturalWidth, i.naturalHeight]")
        page.screenshot(path=str(ARTIFACTS / "browser-sd3.png"), full_page=True)
    assert size == [64, 64]
    assert info.startswith("a red circle\nSteps: 2,") and "Shift: 2" in info and "Size: 64x64" in info
