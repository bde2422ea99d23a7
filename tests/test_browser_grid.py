"""A real browser on the Grid tab: prompt, steps and the two axes typed in, Generate grid, the labelled grid shown;
then the SD 1.x tab's cross-attention accordion: run it, pick a word, the heat map changes. Screenshots go to
test-artifacts/ (gitignored). The app serves the built-in demo model only (an empty models folder)."""
from __future__ import annotations


import numpy as np
import pytest

import app
from sd.pipeline import ModelCache

from .test_browser import ARTIFACTS, serve, _fetch_image, browser_page, set_number


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    outputs = tmp_path_factory.mktemp("browser-grid-outputs")
    demo = app.build_app(tmp_path_factory.mktemp("browser-grid-models"), device="cpu", dtype="float32",
                         cache=ModelCache(), outputs_dir=outputs)
    yield from serve(demo, outputs)


def test_grid_tab_and_attention_maps_in_chromium(url):
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    with browser_page(url, 1400) as page:
        page.get_by_role("tab", name="Grid").click()
        page.locator("#grid-prompt textarea").fill("a red circle in the top left corner on a blue background")
        set_number(page, "grid-steps", 3)
        page.locator("#grid-x-values textarea").fill("Euler, Heun")
        page.locator("#grid-y-type input").fill("cfg")
        page.locator("#grid-y-type input").press("Enter")
        page.locator("#grid-y-values textarea").fill("3, 7")
        page.locator("#grid-run").click()
        expect(page.locator("#grid-status")).to_contain_text("done: 4 cells", timeout=600_000)
        grid = _fetch_image(page, page.locator("#grid-image img"))
        assert grid.shape[0] > 128 and grid.shape[1] > 128
        page.screenshot(path=str(ARTIFACTS / "browser-grid.png"), full_page=True)

        page.get_by_role("tab", name="SD 1.x").click()
        page.locator("#sd1-prompt textarea").fill("a red circle in the top left corner on a blue background")
        set_number(page, "sd1-steps", 3)
        page.locator("#sd1-attn").get_by_text("Cross-attention maps").click()
        page.locator("#sd1-attn-run").click()
        expect(page.locator("#sd1-attn-status")).to_contain_text("sum to 56", timeout=600_000)
        first = _fetch_image(page, page.locator("#sd1-attn-overlay img"))
        page.locator("#sd1-attn-token input").click()
        page.get_by_role("option", name="word 2: circle (weight 1.00)").click()
        page.wait_for_function("() => true")
        page.wait_for_timeout(1500)
        second = _fetch_image(page, page.locator("#sd1-attn-overlay img"))
        assert first.shape == second.shape and np.abs(first.astype(int) - second.astype(int)).max() > 0
        page.screenshot(path=str(ARTIFACTS / "browser-attention.png"), full_page=True)
