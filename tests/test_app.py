"""The playground app driven through its API with gradio_client, plus the pieces it is built from.

A module-scoped server runs `app.build_app` in this process on a free port with tiny SD1 and SDXL checkpoints in a
models folder (random weights: noise-like but deterministic images). Checked: images of the requested size come
back; their PNG `parameters` text parses back to the request; the same seed gives the same pixels; two concurrent
requests for different checkpoints equal their single-request results; Stop ends a run within one step and the
next run works; the app serves its page quickly with an empty models folder; the SDXL refiner hand-off.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import app
from sd.pipeline import GenerateParams, ModelCache, generate, load_model
from sd.pnginfo import parse_parameters, to_settings
from sd.refiner import generate_with_refiner, switch_index

from .serving import free_port, serving

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tiny_files, tmp_path_factory):
    """(url, outputs folder, demo Blocks) of an app with sd1.safetensors and Stable-diffusion/sdxl.safetensors."""
    models = tmp_path_factory.mktemp("models")
    (models / "Stable-diffusion").mkdir()
    os.symlink(tiny_files("sd1"), models / "sd1.safetensors")
    os.symlink(tiny_files("sdxl_base"), models / "Stable-diffusion" / "sdxl.safetensors")
    outputs = tmp_path_factory.mktemp("outputs")
    demo = app.build_app(models, device="cpu", dtype="float32", cache=ModelCache(), outputs_dir=outputs,
                         concurrency=2)
    with serving(demo, outputs) as url:
        yield url, outputs, demo


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server[0], verbose=False)


SD1 = dict(checkpoint="sd1.safetensors", prompt="a red circle", negative_prompt="blurry", sampler="Euler a",
           schedule="Karras", steps=2, cfg=6.5, seed=1234, width=64, height=72, batch_size=1, batch_count=1,
           init_image=None, strength=0.75)
SDXL = dict(SD1, checkpoint="Stable-diffusion/sdxl.safetensors", prompt="a blue square", negative_prompt="",
            sampler="DPM++ 2M", schedule="Normal", cfg=5, seed=77, width=64, height=64, original_width=128,
            original_height=96, crop_top=8, crop_left=16, target_width=64, target_height=64, refiner="None",
            switch_at=0.8, aesthetic_score=6, negative_aesthetic_score=2.5)


def pixels(result) -> list[np.ndarray]:
    return [np.asarray(Image.open(item["image"])) for item in result[0]]


@pytest.fixture(scope="module")
def singles(client):
    """Single-request results (run once) for the sd1 and sdxl settings above."""
    return {"sd1": client.predict(**SD1, api_name="/generate_sd1"),
            "sdxl": client.predict(**SDXL, api_name="/generate_sdxl")}


def test_named_endpoints(client):
    names = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    assert {"/generate_sd1", "/generate_sd2", "/generate_sdxl", "/stop_sd1", "/stop_sdxl", "/png_info"} <= names


def test_sd1_size_parameters_and_seed(client, singles, server):
    first = singles["sd1"]
    img = Image.open(first[0][0]["image"])
    assert img.size == (64, 72)
    s = to_settings(parse_parameters(img.info["parameters"]))
    assert (s["prompt"], s["negative_prompt"], s["steps"], s["sampler"], s["schedule"], s["cfg"], s["seed"],
            s["width"], s["height"], s["model"]) == ("a red circle", "blurry", 2, "euler_ancestral", "karras", 6.5,
                                                     1234, 64, 72, "sd1")
    assert len(s["model_hash"]) == 10 and first[4] == 1234      # used seed output
    again = client.predict(**SD1, api_name="/generate_sd1")
    assert np.array_equal(pixels(first)[0], pixels(again)[0])
    assert pixels(first)[0].std() > 0                            # not a blank image
    other = client.predict(**dict(SD1, seed=1235), api_name="/generate_sd1")
    assert not np.array_equal(pixels(first)[0], pixels(other)[0])
    saved = sorted(server[1].rglob("*.png"))
    assert len(saved) >= 3 and len({p.name for p in saved}) == len(saved)   # nothing overwritten


def test_sdxl_parameters(singles):
    img = Image.open(singles["sdxl"][0][0]["image"])
    assert img.size == (64, 64)
    s = to_settings(parse_parameters(img.info["parameters"]))
    assert s["sdxl_original_size"] == (96, 128) and s["sdxl_crop"] == (8, 16) and s["sdxl_target_size"] == (64, 64)
    assert (s["sampler"], s["schedule"], s["cfg"], s["seed"], s["model"]) == ("dpmpp_2m", "normal", 5.0, 77, "sdxl")


def test_concurrent_requests_equal_single_results(client, singles):
    jobs = [client.submit(**SD1, api_name="/generate_sd1"), client.submit(**SDXL, api_name="/generate_sdxl")]
    results = [j.result(timeout=900) for j in jobs]
    assert np.array_equal(pixels(results[0])[0], pixels(singles["sd1"])[0])
    assert np.array_equal(pixels(results[1])[0], pixels(singles["sdxl"])[0])


def test_wrong_tab_is_refused_with_a_message(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="SDXL tab"):
        client.predict(**dict(SD1, checkpoint="Stable-diffusion/sdxl.safetensors"), api_name="/generate_sd1")


def test_batch_count_and_size(client):
    r = client.predict(**dict(SD1, steps=1, batch_size=2, batch_count=2, seed=10), api_name="/generate_sd1")
    seeds = [to_settings(parse_parameters(Image.open(i["image"]).info["parameters"]))["seed"] for i in r[0]]
    assert seeds == [10, 11, 12, 13]   # image i of batch n: seed + n * batch size + i (A1111's per-image seeds)


def test_stop_through_the_api_and_next_run(client):
    """Stop during a run: the run ends soon after (at most a step in flight plus the observation lag) and returns
    an image; the next run completes."""
    job = client.submit(**dict(SD1, steps=40, seed=3), api_name="/generate_sd1")
    seen = 0
    deadline = time.time() + 600
    while seen < 6 and time.time() < deadline:  # a preview comes every 5 steps of 40
        for out in job.outputs():
            if isinstance(out[2], str) and out[2].startswith("step "):
                seen = max(seen, int(out[2].split()[1].split("/")[0]))
        time.sleep(0.05)
    assert seen >= 6
    assert any(isinstance(o[1], str) and Path(o[1]).is_file() for o in job.outputs())  # a live preview was sent
    client.predict(api_name="/stop_sd1")
    observed = max(int(o[2].split()[1].split("/")[0]) for o in job.outputs()
                   if isinstance(o[2], str) and o[2].startswith("step "))
    res = job.result(timeout=300)
    done = int(res[2].split("stopped after ")[1].split()[0])
    assert done <= observed + 1 and done < 40
    assert len(res[0]) == 1
    nxt = client.predict(**SD1, api_name="/generate_sd1")
    assert nxt[2].startswith("done: 1 image(s), 2 steps")


def test_stop_ends_within_one_step(server):
    """In-process: the Stop event set during step 3 ends the run after exactly 3 steps; the next run is whole."""
    ctx = server[2].sd_context
    stop = threading.Event()
    steps = []

    def report(kind, payload):
        if kind == "step":
            steps.append(payload[0])
            if payload[0] == 3:
                stop.set()

    out = app.run_request(ctx, "sd1", dict(SD1, steps=20), stop, report)
    assert steps == [1, 2, 3] and out.status.startswith("stopped after 3 of 20 steps")
    out = app.run_request(ctx, "sd1", dict(SD1, steps=2), threading.Event(), lambda *a: None)
    assert out.status.startswith("done: 1 image(s), 2 steps")


def test_png_info_endpoint(client, singles):
    from gradio_client import handle_file

    text, settings, hint = client.predict(handle_file(singles["sdxl"][0][0]["image"]), api_name="/png_info")
    assert text.startswith("a blue square\n") and settings["seed"] == 77 and "SDXL" in hint


def test_send_to_tab_values(server):
    ctx = server[2].sd_context
    settings = to_settings(parse_parameters(
        "a cat\nSteps: 9, Sampler: DPM++ 2M Karras, CFG scale: 4.5, Seed: 3, Size: 64x64, Model: sd1, "
        "SDXL crop top: 8"))
    up, note = app.send_values(ctx, "sd1", settings)
    assert (up["checkpoint"], up["sampler"], up["schedule"], up["steps"], up["cfg"]) == (
        "sd1.safetensors", "DPM++ 2M", "Karras", 9, 4.5) and note == ""
    up, note = app.send_values(ctx, "sdxl", dict(settings, model="missing"))
    assert up["crop_top"] == 8 and "checkpoint" not in up and "missing" in note
    up, note = app.send_values(ctx, "sdxl", dict(settings, model="sdxl", refiner="gone", refiner_switch_at=0.7))
    assert (up["checkpoint"], up["switch_at"]) == ("Stable-diffusion/sdxl.safetensors", 0.7) and "gone" in note


def test_empty_models_folder_starts_fast(tmp_path):
    """python app.py with an empty models folder serves its page in under 20 s and says where to put files."""
    (tmp_path / "models").mkdir()
    port = free_port()
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--models-dir", str(tmp_path / "models"),
                             "--outputs-dir", str(tmp_path / "out"), "--port", str(port), "--device", "cpu"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        page = None
        while time.time() - t0 < 60 and proc.poll() is None:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2).read().decode()
                break
            except OSError:
                time.sleep(0.2)
        elapsed = time.time() - t0
        assert page is not None, proc.stdout.read().decode() if proc.poll() is not None else "no answer"
        assert elapsed < 20, f"took {elapsed:.1f} s"
        assert "No checkpoint found" in page and "python -m sd download" in page
        html = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read().decode()
        assert "<html" in html.lower()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_app_without_demo_model_says_so(tmp_path):
    demo = app.build_app(tmp_path, demo_path=tmp_path / "missing.safetensors", outputs_dir=tmp_path / "o")
    ctx = demo.sd_context
    text = app.banner(ctx, [])
    assert "demo model is not available" in text and "No checkpoint found" in text
    assert app.tab_choices(ctx, "sd1", []) == []


# ------------------------------------------------------------------------------------------------
# SDXL refiner hand-off


def test_switch_index():
    assert [switch_index(10, f) for f in (0, 0.25, 0.8, 1)] == [0, 3, 8, 10]
    with pytest.raises(ValueError):
        switch_index(10, 1.5)


def test_refiner_hand_off(tiny_files):
    base = load_model(tiny_files("sdxl_base"))
    refiner = load_model(tiny_files("sdxl_refiner"))
    p = GenerateParams(prompt="a cat", width=64, height=64, steps=4, cfg=5, seed=9, sampler="euler")
    # switch at 0: the refiner alone, exactly as a plain refiner run
    alone = generate(refiner, p)
    handed = generate_with_refiner(base, refiner, p, switch_at=0.0)
    assert torch.equal(alone.latents, handed.latents)
    # switch at 0.5: two steps on the base, then two on the refiner, continuing the same latent
    models = []
    half = generate_with_refiner(base, refiner, p, switch_at=0.5, callback=lambda i: models.append((i["step"],
                                                                                                   i["model"])))
    assert models == [(0, "base"), (1, "base"), (2, "refiner"), (3, "refiner")]
    assert half.steps_done == 4 and not half.stopped
    assert not torch.allclose(half.latents, alone.latents)


def test_demo_model_is_the_default_with_an_empty_folder(tmp_path, tiny_files):
    """With nothing in the models folder, SD 1.x offers and selects the demo model (a tiny SD1 file stands in)."""
    demo = app.build_app(tmp_path / "empty", demo_path=tiny_files("sd1"), outputs_dir=tmp_path / "o")
    ctx = demo.sd_context
    assert app.default_choice(ctx, "sd1", []) == app.DEMO_LABEL
    assert app.tab_choices(ctx, "sd1", []) == [(app.DEMO_LABEL, app.DEMO_LABEL)]
    assert "Demo (built in)" in app.banner(ctx, []) and "No checkpoint found" in app.banner(ctx, [])
    up = app.preset_updates(ctx, app.DEMO_LABEL)
    assert (up["width"], up["height"]) == (64, 64) and "built-in demo" in up["facts"]
    out = app.run_request(ctx, "sd1", dict(SD1, checkpoint=app.DEMO_LABEL, steps=1), threading.Event(),
                          lambda *a: None)
    assert len(out.gallery) == 1 and "Model: sd1," in out.infotext


def test_sd2_facts_say_what_decided_the_prediction(tmp_path, tiny_files):
    """Listing an SD 2 file does not load it; selecting it runs the probe; the override picks the 768-v preset."""
    (tmp_path / "m").mkdir()
    os.symlink(tiny_files("sd2_768_v"), tmp_path / "m" / "sd2.safetensors")
    demo = app.build_app(tmp_path / "m", demo_path=None, outputs_dir=tmp_path / "o")
    ctx = demo.sd_context
    listed = app.preset_updates(ctx, "sd2.safetensors", probe=False)
    assert "`eps or v`: decided by A1111's probe" in listed["facts"] and ctx.cache.loaded() == []
    picked = app.preset_updates(ctx, "sd2.safetensors")
    assert "A1111 probe on the UNet" in picked["facts"] and len(ctx.cache.loaded()) == 1
    forced = app.preset_updates(ctx, "sd2.safetensors", prediction="v")
    assert "`v`: user override" in forced["facts"] and (forced["width"], forced["height"]) == (768, 768)


def test_selecting_a_file_of_another_family_says_which_tab(server):
    up = app.preset_updates(server[2].sd_context, "Stable-diffusion/sdxl.safetensors", tab="sd1")
    assert up == {"facts": up["facts"]} and "use the SDXL tab" in up["facts"]
