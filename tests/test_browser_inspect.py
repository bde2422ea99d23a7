"""The Inspect views in a real browser (chromium through playwright) and through gradio_client, on a tiny SD 1.x
checkpoint: Generate with "Inspect this run" on, the formula and the frames appear, moving the step slider changes
the shown frame (its pixels), the card names the checkpoint's family; screenshot in test-artifacts/browser-inspect.png.
The API: /generate_sd1 with inspect=True, then /trajectory_sd1 gives one image per step per strip and the sigmas;
/card gives the card; a run without inspect is pixel-identical to one with it.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

import app
from sd.pipeline import ModelCache

from .test_browser import ARTIFACTS, serve, _fetch_image, browser_page, set_number

STEPS = 3


@pytest.fixture(scope="module")
def url(tiny_files, tmp_path_factory):
    models = tmp_path_factory.mktemp("inspect-models")
    os.symlink(tiny_files("sd1"), models / "sd1.safetensors")
    outputs = tmp_path_factory.mktemp("inspect-outputs")
    demo = app.build_app(models, device="cpu", dtype="float32", cache=ModelCache(), outputs_dir=outputs,
                         demo_path=None)
    yield from serve(demo, outputs)


def test_inspect_view_in_chromium(url):
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    with browser_page(url, 2400) as page:
        page.get_by_role("tab", name="SD 1.x").click()
        page.locator("#sd1-card-box").get_by_text("Checkpoint card").click()
        expect(page.locator("#sd1-card")).to_contain_text("How it was recognised")
        page.locator("#sd1-prompt textarea").fill("a red circle on the left")
        for elem_id, v in (("sd1-width", 64), ("sd1-height", 64), ("sd1-steps", STEPS)):
            set_number(page, elem_id, v)
        page.locator("#sd1-inspect-box").get_by_text("Inspect: trajectory and schedules").click()
        page.locator("#sd1-inspect input[type=checkbox]").check()
        page.locator("#sd1-generate").click()
        expect(page.locator("#sd1-status")).to_contain_text("done", timeout=600_000)
        expect(page.locator("#sd1-inspect-formula")).to_contain_text("x0 = x - sigma eps", timeout=120_000)
        frame = page.locator("#sd1-inspect-x0 img")
        expect(frame).to_be_visible()
        first_src, first = frame.get_attribute("src"), _fetch_image(page, frame)
        set_number(page, "sd1-inspect-step", STEPS - 1)
        page.wait_for_function(
            "s => { const i = document.querySelector('#sd1-inspect-x0 img'); return i && i.src !== s && i.complete "
            "&& i.naturalWidth > 0; }", arg=first_src, timeout=120_000)
        last = _fetch_image(page, frame)
        assert first.shape == last.shape and np.abs(first - last).max() > 10   # another step, other pixels
        expect(page.locator("#sd1-inspect-strip-x0 img")).to_have_count(STEPS)
        page.screenshot(path=str(ARTIFACTS / "browser-inspect.png"), full_page=True)
    assert (ARTIFACTS / "browser-inspect.png").stat().st_size > 10_000


def test_trajectory_and_card_through_the_api(url):
    from gradio_client import Client

    client = Client(url, verbose=False)
    req = dict(checkpoint="sd1.safetensors", prompt="a blue square", steps=STEPS, width=64, height=64, seed=11,
               sampler="Euler", schedule="Karras", cfg=5)
    on = client.predict(**req, inspect=True, api_name="/generate_sd1")
    off = client.predict(**req, api_name="/generate_sd1")
    pixels = [np.asarray(Image.open(r[0][0]["image"])) for r in (on, off)]
    assert np.array_equal(*pixels)                          # recording changes nothing
    *strips, summary = client.predict(api_name="/trajectory_sd1")
    assert [len(s) for s in strips] == [STEPS] * 3
    assert Image.open(strips[1][0]["image"]).size == (8, 8)   # the 8x8 latent's cheap preview
    assert summary["prediction"] == "eps" and len(summary["steps"]) == STEPS
    assert summary["steps"][-1]["sigma_next"] == 0.0
    card = client.predict("sd1.safetensors", api_name="/card")
    assert card.startswith("### SD 1.x: `sd1.safetensors`") and "`crossattn` (1, 77, 64)" in card
