"""The first-stage view (app_first_stage.py, issue 11) driven through gradio_client: a tiny VQ file, a tiny KL file
and the VAE of a tiny SD 1.x checkpoint round-trip one image side by side through `/reconstruct`; the numbers equal
the engine's `round_trip`, codebook usage equals the distinct indices of the code map, names resolve only through
the models-folder listing, and a first stage that cannot take the image reports one line in its row."""
from __future__ import annotations

from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

import app
from app_first_stage import build_first_stage_view, first_stage_entries
from sd.first_stage import load_first_stage, round_trip
from sd.models_dir import ModelIndex
from sd.pipeline import ModelCache

from .serving import serving
from .tiny import write_tiny
from .tiny_first_stage import sample_image, write_tiny_first_stage

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def view(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    write_tiny_first_stage("ldm_vq_f8", models / "vq-f8.safetensors")
    write_tiny_first_stage("ldm_kl_f32", models / "kl-f32.safetensors")
    write_tiny("sd1", models / "sd1.safetensors")
    (models / "notes.safetensors").write_bytes(b"not a checkpoint")
    ctx = app.AppContext(index=ModelIndex(models), cache=ModelCache(), device="cpu", dtype="float32",
                         outputs_dir=tmp_path_factory.mktemp("out"), demo_path=None)
    with gr.Blocks() as demo:
        build_first_stage_view(ctx)
    demo.queue()
    from gradio_client import Client

    with serving(demo) as url:
        yield Client(url, verbose=False), ctx, models


def test_listing_has_the_first_stages_only(view) -> None:
    _, ctx, _ = view
    assert [v for _, v in first_stage_entries(ctx)] == ["kl-f32.safetensors", "sd1.safetensors", "vq-f8.safetensors"]


def test_round_trip_side_by_side_through_the_api(view, tmp_path: Path) -> None:
    from gradio_client import handle_file

    client, _, models = view
    img = sample_image((72, 24))
    img.save(tmp_path / "in.png")
    gallery, table, maps, numbers = client.predict(handle_file(str(tmp_path / "in.png")),
                                                   ["vq-f8.safetensors", "sd1.safetensors", "kl-f32.safetensors",
                                                    "../outside.safetensors"], api_name="/reconstruct")
    assert len(gallery) == 3 and [g["caption"].split(":")[0] for g in gallery[1:]] == ["vq-f8.safetensors",
                                                                                       "sd1.safetensors"]
    want_vq = round_trip(load_first_stage(models / "vq-f8.safetensors"), img)
    want_kl = round_trip(load_first_stage(models / "sd1.safetensors"), img)
    got_vq = np.asarray(Image.open(gallery[1]["image"]).convert("RGB"))
    assert np.array_equal(got_vq, np.asarray(want_vq["reconstruction"]))
    vq, kl = numbers["vq-f8.safetensors"], numbers["sd1.safetensors"]
    assert (vq["kind"], vq["grid"], vq["codebook_size"]) == ("vqgan-f8-64", [3, 9], 64)
    assert vq["codes_used"] == want_vq["codes_used"] == len(np.unique(want_vq["codes"]))
    assert vq["psnr"] == pytest.approx(want_vq["psnr"], abs=1e-3) and kl["psnr"] == pytest.approx(want_kl["psnr"], abs=1e-3)
    assert kl["kind"] == "ldm-kl-f8" and kl["ssim"] == pytest.approx(want_kl["ssim"], abs=1e-5)
    # the code map (one colour per code cell) has as many distinct colours as codes used; 4 latent channels
    code_map = np.asarray(Image.open(maps[0]["image"]).convert("RGB"))
    assert code_map.shape == (24, 72, 3)
    assert len(np.unique(code_map.reshape(-1, 3), axis=0)) == vq["codes_used"]
    assert [m["caption"] for m in maps[1:]] == [f"sd1.safetensors: latent channel {i}" for i in range(4)]
    # the f32 first stage cannot take a 24-pixel-high image; a name outside the listing gets the one answer
    assert "at least 32x32" in numbers["kl-f32.safetensors"]["error"]
    assert numbers["../outside.safetensors"]["error"].startswith("no such checkpoint in the models folder")
    assert "| `vq-f8.safetensors` | vqgan-f8-64 | 3x9 (f8) |" in table
    assert all("\n" not in n.get("error", "") for n in numbers.values())
