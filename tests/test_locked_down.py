"""Issue 8, the app side: names stay inside the models folder, share links have a login, uploads and the queue are
bounded, every API parameter has a default, and the UX defects seen in the browser are gone.

One module-scoped server (app.build_app in this process, tiny SD1 + SDXL checkpoints, the built-in demo model) is
driven with gradio_client as a remote client would; the pieces behind it are also called directly.
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

import app
from sd.models_dir import ModelIndex, NotInModelsFolder
from sd.pipeline import ModelCache
from sd.pnginfo import parse_parameters, to_settings

from .serving import serving
from .test_app import SD1


@pytest.fixture(scope="module")
def world(tiny_files, tmp_path_factory):
    """A models folder (sd1 file, a symlink the owner put there pointing outside, an sdxl file), a checkpoint
    outside it, an outputs folder, and a running app."""
    root = tmp_path_factory.mktemp("world")
    models, outside, outputs = root / "models", root / "elsewhere", root / "outputs"
    models.mkdir(), outside.mkdir()
    os.link(tiny_files("sd1"), models / "sd1.safetensors")
    os.link(tiny_files("sd1"), outside / "x.safetensors")
    os.symlink(outside / "x.safetensors", models / "linked.safetensors")
    os.link(tiny_files("sdxl_base"), models / "xl.safetensors")
    demo = app.build_app(models, device="cpu", dtype="float32", cache=ModelCache(), outputs_dir=outputs)
    from gradio_client import Client

    with serving(demo, outputs, max_file_size="64kb") as url:
        yield dict(models=models, outside=outside, outputs=outputs, demo=demo, client=Client(url, verbose=False))


# ------------------------------------------------------------------------------------------------
# 1. names resolve only to listed files, with one answer for everything else

HOSTILE = ["../elsewhere/x.safetensors", "{outside}/x.safetensors", "../../../../etc/passwd", "/etc/passwd",
           "{outside}/missing.safetensors", "nope", "", "sd1.safetensors/../../elsewhere/x.safetensors"]


def _refusal(fn) -> str:
    with pytest.raises(NotInModelsFolder) as e:
        fn()
    return str(e.value)


def test_resolve_accepts_only_listed_files(world):
    index = ModelIndex(world["models"])
    assert index.resolve("sd1.safetensors") == world["models"] / "sd1.safetensors"
    assert index.resolve("sd1") == world["models"] / "sd1.safetensors"
    assert index.resolve("linked") == world["models"] / "linked.safetensors"   # the owner's symlink is listed
    answers = {}
    for name in HOSTILE:
        name = name.format(outside=world["outside"])
        msg = _refusal(lambda: index.resolve(name))
        answers[name] = rest = msg.replace(repr(name[:80] + ("..." if len(name) > 80 else "")), "NAME")
        assert "/" not in rest.replace("NAME", "")  # no server path beyond the caller's own words
    # existing, missing, outside and inside all get the very same words
    assert len(set(answers.values())) == 1, answers
    assert "no such checkpoint in the models folder" in next(iter(answers.values()))


def test_api_refuses_paths_outside_the_folder_identically(world):
    from gradio_client.exceptions import AppError

    c = world["client"]
    msgs = []
    for name in ("../elsewhere/x.safetensors", f"{world['outside']}/x.safetensors", "../../../../etc/passwd",
                 f"{world['outside']}/missing.safetensors"):
        with pytest.raises(AppError) as e:
            c.predict(checkpoint=name, prompt="x", steps=1, width=64, height=64, api_name="/generate_sd1")
        msgs.append(str(e.value).replace(repr(name), "NAME"))
        assert "/" not in msgs[-1].replace("NAME", "")
    assert len(set(msgs)) == 1 and "no such checkpoint in the models folder" in msgs[0], msgs
    with pytest.raises(AppError, match="no such checkpoint in the models folder"):  # the refiner too
        c.predict(checkpoint="xl.safetensors", prompt="x", steps=1, width=64, height=64,
                  refiner=f"{world['outside']}/x.safetensors", api_name="/generate_sdxl")
    assert not list(world["outputs"].rglob("*.png"))  # nothing was generated for any of them


# ------------------------------------------------------------------------------------------------
# 5. share links have a login; uploads and the queue are bounded


def test_share_without_auth_gets_a_random_password(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(app.gr.Blocks, "launch", lambda self, **kw: seen.update(kw))
    assert app.main(["--share", "--models-dir", "/nonexistent", "--outputs-dir", "/tmp/sd-share-out"]) == 0
    user, password = seen["auth"]
    out = capsys.readouterr().out
    assert user == "sd" and len(password) >= 16 and out.count(password) == 1
    assert seen["share"] is True and seen["max_file_size"] == "32768kb"
    assert app.share_auth(True, None)[0][1] != password                          # a new one each run
    assert app.share_auth(True, "ann:pw") == (("ann", "pw"), None)
    assert app.share_auth(False, None) == (None, None)
    assert app.main(["--share", "--auth", "nopassword"]) == 2


def test_upload_over_the_limit_is_refused(world, tmp_path):
    from gradio_client import handle_file

    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 64 * 1024
    with pytest.raises(Exception, match="(?i)too large|exceed|size"):
        world["client"].predict(handle_file(str(big)), api_name="/png_info")


def test_queue_is_bounded(tiny_files, tmp_path):
    """concurrency 1, queue 1: of 6 requests sent at once, the ones past the queue are refused at once."""
    from gradio_client import Client

    demo = app.build_app(tmp_path, device="cpu", cache=ModelCache(), outputs_dir=tmp_path / "out", concurrency=1,
                         queue_size=1)
    with serving(demo) as url:
        clients = [Client(url, verbose=False) for _ in range(6)]
        jobs = [c.submit(prompt="a red circle", steps=60, seed=i, api_name="/generate_sd1")
                for i, c in enumerate(clients)]
        outcomes = []
        for j in jobs:
            try:
                j.result(timeout=300)
                outcomes.append("ok")
            except Exception as e:  # noqa: BLE001 - the refusal is what is measured
                outcomes.append(str(e))
        refused = [o for o in outcomes if o != "ok"]
        assert 1 <= outcomes.count("ok") <= 3 and len(refused) >= 3, outcomes
        assert all("Queue is full" in o for o in refused), refused


# ------------------------------------------------------------------------------------------------
# 7. every parameter has a default


def test_one_line_api_call(world):
    c = world["client"]
    for ep in ("/generate_sd1", "/generate_sd2", "/generate_sdxl"):
        params = c.view_api(return_format="dict", print_info=False)["named_endpoints"][ep]["parameters"]
        assert all(p["parameter_has_default"] for p in params), [p["parameter_name"] for p in params]
    images, _, status, parameters, seed, _ = c.predict(prompt="a cat", steps=2, api_name="/generate_sd1")
    # the SD 1.x tab's first listed file (the folder has SD 1.x files, so not the demo), at its preset's size
    s = to_settings(parse_parameters(parameters))
    assert s["model"] == "linked" and s["steps"] == 2 and (s["width"], s["height"]) == (512, 512)
    assert status.startswith("done: 1 image(s), 2 steps") and "prompt 2 tokens" in status
    assert isinstance(seed, (int, float)) and seed >= 0
    assert Image.open(images[0]["image"]).size == (512, 512)


# ------------------------------------------------------------------------------------------------
# 8. the UX defects


def test_png_info_sends_the_demo_model(world):
    ctx = world["demo"].sd_context
    up, note = app.send_values(ctx, "sd1", {"model": "shapes-sd1", "steps": 7, "seed": 3})
    assert up["checkpoint"] == app.DEMO_LABEL and up["steps"] == 7 and note == ""


def test_picking_a_checkpoint_keeps_fields_the_user_set(world):
    ctx = world["demo"].sd_context
    fresh = app.select_updates(ctx, "sd1", "sd1.safetensors", [])
    assert fresh["steps"] == 20 and fresh["width"] == 512
    kept = app.select_updates(ctx, "sd1", "sd1.safetensors", ["steps", "width"])
    assert "steps" not in kept and "width" not in kept and kept["height"] == 512 and "facts" in kept


def test_used_seed_is_hidden_until_a_run(world):
    comps = {c.get("props", {}).get("elem_id"): c for c in world["demo"].config["components"]}
    assert comps["sd1-used-seed"]["props"]["visible"] is False


def test_error_status_and_no_traceback_for_user_errors(world, capfd):
    c = world["client"]
    job = c.submit(checkpoint="missing.safetensors", prompt="x", api_name="/generate_sd1")
    with pytest.raises(Exception, match="no such checkpoint"):
        job.result(timeout=60)
    statuses = [o[2] for o in job.outputs() if isinstance(o[2], str)]
    assert statuses and statuses[-1].startswith("**error:** no such checkpoint"), statuses
    time.sleep(0.2)
    assert "Traceback" not in capfd.readouterr().err


def test_stopped_run_infotext_says_what_ran(world):
    ctx = world["demo"].sd_context
    stop = threading.Event()
    out = app.run_request(ctx, "sd1", dict(SD1, checkpoint="sd1.safetensors", steps=30), stop,
                          lambda kind, payload: stop.set() if kind == "step" and payload[0] == 4 else None)
    assert "Steps: 30," in out.infotext and out.infotext.endswith("Stopped at step: 4/30")
    assert to_settings(parse_parameters(out.infotext))["steps"] == 30


def test_preview_size_and_banner_and_token_note(world, tmp_path):
    assert app.preview_size(64, 64) == (256, 256) and app.preview_size(64, 96) == (256, 384)
    assert app.preview_size(512, 768) == (512, 768)
    (tmp_path / "bad.safetensors").write_text("hello")
    ctx = world["demo"].sd_context
    text = app.banner(ctx, ModelIndex(tmp_path).scan())
    assert text.count("bad.safetensors") == 1
    assert app.token_note("a cat") == "prompt 2 tokens"
    long = " ".join(["cat"] * 80)
    assert app.token_note(long) == "prompt 80 tokens in 2 chunks of 75 (A1111-style, nothing cut)"


def test_hostile_parameters_get_one_line_answers(world):
    ctx = world["demo"].sd_context
    for bad, match in ((dict(batch_count=10**6), "batch count"), (dict(prompt="x" * 30_000), "characters"),
                       (dict(cfg="nan"), "cfg must be a number"), (dict(width=10**9), "too large|multiples")):
        with pytest.raises(ValueError, match=match):
            app.run_request(ctx, "sd1", dict(SD1, checkpoint="sd1.safetensors", **bad), threading.Event(),
                            lambda *a: None)


def test_abandoned_run_saves_nothing(world):
    """The client went away (stream_run sets `abandoned` and `stop`): the worker ends at its next step and writes
    no PNG; a plain Stop in the same place keeps the partial image."""
    ctx = world["demo"].sd_context
    before = set(world["outputs"].rglob("*.png"))
    stop, gone = threading.Event(), threading.Event()
    steps = []

    def report(kind, payload):
        if kind == "step":
            steps.append(payload[0])
            if payload[0] == 2:
                gone.set(), stop.set()

    with pytest.raises(app.Abandoned, match="nothing was saved"):
        app.run_request(ctx, "sd1", dict(SD1, checkpoint="sd1.safetensors", steps=30), stop, report, gone)
    assert steps == [1, 2] and set(world["outputs"].rglob("*.png")) == before
