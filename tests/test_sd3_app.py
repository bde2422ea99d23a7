"""The SD3 / 3.5 tab through its API (gradio_client): /generate_sd3 on a tiny bundled SD3 file (CLIP-L/G + T5 in the
file, spiece.model beside it), the app started in this process as tests/test_app.py does.

Checked: the tab exists with the family's declared inputs (shift, skip-layer guidance, T5 on/off) as API
parameters; the images equal the engine's `generate` for the same request pixel for pixel; the status says which
text encoders were used and when T5 was off; the PNG parameters carry the request back (with `Shift` and the
skip-layer-guidance fields); a width that is not a multiple of 16 is a one-line error.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

import app
from sd.pipeline import GenerateParams, ModelCache, generate, load_model
from sd.pnginfo import parse_parameters, to_settings

from .serving import serving
from .tiny_sd3 import write_tiny_sd3, write_tiny_spiece


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    torch.set_num_threads(1)
    models = tmp_path_factory.mktemp("models")
    path = write_tiny_sd3("sd3_medium", models / "sd3m.safetensors")
    write_tiny_spiece(models / "spiece.model")
    outputs = tmp_path_factory.mktemp("outputs")
    demo = app.build_app(models, device="cpu", dtype="float32", cache=ModelCache(), outputs_dir=outputs,
                         concurrency=1)
    with serving(demo, outputs) as url:
        yield url, path


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server[0], verbose=False)


REQUEST = dict(checkpoint="sd3m.safetensors", prompt="a red cat on the moon", negative_prompt="blurry",
               sampler="Euler", schedule="Normal", steps=3, cfg=4.5, seed=7, width=64, height=64, batch_size=1,
               batch_count=1, init_image=None, strength=0.75, shift=2.0, slg_layers="1", slg_scale=2.0,
               slg_start=0.01, slg_end=0.6, use_t5=True)
INPUTS = {"shift": 2.0, "slg_layers": "1", "slg_scale": 2.0, "slg_start": 0.01, "slg_end": 0.6, "use_t5": True}


def test_the_tab_has_the_family_inputs() -> None:
    names = app.tab_inputs("sd3")   # the family's inputs in a row, after the common ones (other tabs' extras after)
    i = names.index("shift")
    assert names[i:i + 6] == ("shift", "slg_layers", "slg_scale", "slg_start", "slg_end", "use_t5")
    assert names.index("strength") < i
    assert [f.name for f in app.family_tabs()["sd3"]] == ["sd3", "sd3.5-large", "sd3.5-medium"]


def test_generate_sd3_equals_the_engine(server, client) -> None:
    _, path = server
    r = client.predict(**REQUEST, api_name="/generate_sd3")
    gallery, status, infotext = r[0], r[2], r[3]
    got = np.asarray(Image.open(gallery[0]["image"]).convert("RGB"))
    want = generate(load_model(path), GenerateParams(
        prompt=REQUEST["prompt"], negative_prompt="blurry", width=64, height=64, steps=3, cfg=4.5, seed=7,
        sampler="euler", schedule="normal", inputs=INPUTS)).images[0]
    assert got.shape == (64, 64, 3) and got.std() > 1
    assert np.array_equal(got, np.asarray(want))
    assert "text encoders: CLIP-L from the checkpoint; CLIP-G from the checkpoint; T5-XXL from the checkpoint" \
        in status
    s = to_settings(parse_parameters(infotext))
    assert (s["steps"], s["seed"], s["cfg"], s["width"], s["height"], s["sampler"]) == (3, 7, 4.5, 64, 64, "euler")
    assert s.get("shift") == 2.0 and s.get("slg_layers") == "1" and s.get("slg_scale") == 2.0, (
        "the PNG parameters lack the SD3 fields: app.py's run_request must pass the request's family inputs to "
        "build_parameters (inputs=p.inputs) so that Family.infotext writes Shift / Skip layer guidance; got "
        f"{infotext!r}")


def test_t5_off_and_bad_width(client) -> None:
    r = client.predict(**{**REQUEST, "use_t5": False, "slg_layers": "none"}, api_name="/generate_sd3")
    assert "T5-XXL off for this request: the prompt went through CLIP-L/G alone" in r[2]
    with pytest.raises(Exception) as e:
        client.predict(**{**REQUEST, "width": 72}, api_name="/generate_sd3")
    assert "width and height must be multiples of 16 and at least 32 pixels; got 72x64" in str(e.value)
