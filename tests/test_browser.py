"""A real browser (Debian's chromium, driven by playwright) on the app: SDXL tab, prompt, crop slider, Generate.

The screenshot is kept under test-artifacts/ (gitignored). Timeouts are generous: the tiny SDXL checkpoint
runs on a shared 2-core CPU.
"""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

import app
from sd.pipeline import ModelCache

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def url(tiny_files, tmp_path_factory):
    models = tmp_path_factory.mktemp("browser-models")
    os.symlink(tiny_files("sdxl_base"), models / "sdxl.safetensors")
    outputs = tmp_path_factory.mktemp("browser-outputs")
    demo = app.build_app(models, device="cpu", dtype="float32", cache=ModelCache(), outputs_dir=outputs)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=[str(outputs)])
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def set_number(page, elem_id: str, value: int) -> None:
    """Type a value into the number box of a gradio slider and commit it."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    box.blur()


def test_sdxl_tab_in_chromium(url):
    from playwright.sync_api import expect, sync_playwright

    assert Path(CHROMIUM).exists(), "Debian chromium is needed (apt-get install chromium)"
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1600})
            page.set_default_timeout(120_000)
            page.goto(url, wait_until="domcontentloaded", timeout=120_000)
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
            page.locator("#sdxl-generate").click()
            img = page.locator("#sdxl-gallery img").first
            expect(img).to_be_visible(timeout=600_000)
            page.wait_for_function(
                "() => { const i = document.querySelector('#sdxl-gallery img'); return i && i.complete "
                "&& i.naturalWidth > 0; }", timeout=120_000)
            size = img.evaluate("i => [i.naturalWidth, i.naturalHeight]")
            assert size == [64, 64]
            info = page.locator("#sdxl-infotext textarea").input_value()
            assert info.startswith("a yellow star on a black background\nSteps: 2,")
            assert "SDXL crop top: 32" in info and "Size: 64x64" in info
            page.screenshot(path=str(ARTIFACTS / "browser-sdxl.png"), full_page=True)
        finally:
            browser.close()
    assert (ARTIFACTS / "browser-sdxl.png").stat().st_size > 10_000
