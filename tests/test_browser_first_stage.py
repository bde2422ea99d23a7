"""The first-stage view (app_first_stage.py, issue 11) in a real browser (chromium via playwright, as
tests/test_browser.py): an image uploaded on the VQ-GAN / LDM tab round-trips through a tiny taming VQGAN (f16) and a
tiny LDM KL-f8 picked in the dropdown; the PSNR / SSIM / codes shown equal `python -m sd reconstruct`'s JSON for the
same files, and the codebook usage shown equals the number of distinct cells of the code map shown (one colour per
code index). Screenshot: test-artifacts/browser-first-stage.png."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app
from sd.pipeline import ModelCache

from .serving import serving
from .test_browser import ARTIFACTS, browser_page
from .tiny_first_stage import sample_image, write_tiny_first_stage

FILES = {"vq-f16.safetensors": "vqgan_imagenet_f16_1024", "kl-f8.safetensors": "ldm_kl_f8"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    models = tmp_path_factory.mktemp("fs-models")
    for name, layout in FILES.items():
        write_tiny_first_stage(layout, models / name)
    demo = app.build_app(models, device="cpu", dtype="float32", cache=ModelCache(), demo_path=None,
                         outputs_dir=tmp_path_factory.mktemp("fs-out"))
    with serving(demo) as url:
        yield url, models


def _cli(models: Path, name: str, image: Path, out: Path, capsys) -> dict:
    from sd.__main__ import main

    capsys.readouterr()
    assert main(["reconstruct", "--checkpoint", str(models / name), "--image", str(image), "--out", str(out)]) == 0
    return json.loads(capsys.readouterr().out)


def test_first_stage_view_round_trips_in_chromium(served, tmp_path: Path, capsys) -> None:
    from playwright.sync_api import expect

    url, models = served
    image = tmp_path / "in.png"
    sample_image((128, 96), seed=2).save(image)
    ARTIFACTS.mkdir(exist_ok=True)
    with browser_page(url, 1800) as page:
        page.get_by_role("tab", name="VQ-GAN / LDM").click()
        page.locator("#fs-image input[type=file]").set_input_files(str(image))
        expect(page.locator("#fs-image img")).to_be_visible()
        box = page.locator("#fs-stages input")
        for name in FILES:
            box.click()
            box.fill(name.split(".")[0])
            page.get_by_role("option", name=name, exact=False).first.click()
        page.keyboard.press("Escape")
        page.locator("#fs-run").click()
        table = page.locator("#fs-table table")
        expect(table).to_contain_text("kl-f8.safetensors", timeout=300_000)
        expect(table).to_contain_text("vq-f16.safetensors")
        rows = {}
        for tr in table.locator("tbody tr").all():
            cells = [c.inner_text().strip() for c in tr.locator("td").all()]
            rows[cells[0]] = cells
        maps = page.locator("#fs-maps img")
        expect(maps.first).to_be_visible()
        page.wait_for_function("() => [...document.querySelectorAll('#fs-maps img')].every(i => i.complete "
                               "&& i.naturalWidth > 0)", timeout=120_000)
        srcs = [m.get_attribute("src") for m in maps.all()]
        code_map = np.asarray(Image.open(io.BytesIO(page.request.get(srcs[0]).body())).convert("RGB"))
        page.screenshot(path=str(ARTIFACTS / "browser-first-stage.png"), full_page=True)
    assert (ARTIFACTS / "browser-first-stage.png").stat().st_size > 10_000
    assert sorted(rows) == sorted(FILES)
    for name in FILES:
        cli = _cli(models, name, image, tmp_path / f"{name}.png", capsys)
        cells = rows[name]   # first stage | kind | grid (factor) | PSNR dB | SSIM | codes used / codebook
        assert cells[1] == cli["kind"] and cells[2] == f"{cli['grid'][0]}x{cli['grid'][1]} (f{cli['factor']})"
        assert cells[3] == f"{cli['psnr']:.2f}" and cells[4] == f"{cli['ssim']:.4f}"
        if cli["vq"]:
            assert cells[5] == f"{cli['codes_used']} / {cli['codebook_size']}"
            # the code map shown: one cell per code (f16: 8 x 6 cells of 16 px), one colour per code index
            assert code_map.shape[:2] == (96, 128)
            cells_rgb = code_map[::16, ::16].reshape(-1, 3)
            assert len({tuple(c) for c in cells_rgb}) == cli["codes_used"] > 1
        else:
            assert cells[5] == "KL (no codebook)"
    assert len(srcs) == 1 + 4   # the VQ code map, then the KL model's 4 latent channels
