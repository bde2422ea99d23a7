"""The VQ-GAN / LDM generate tab (issue 11) is built from the family table: a tiny cin256-v2, a tiny celeba256 and a
tiny txt2img-f8-large checkpoint generate through `/generate_ldm` with gradio_client, pixel for pixel what the engine
gives, the class given as an ImageNet name (the class input is a dropdown of the 1000 names), the txt2img model's
BERT vocabulary found in the models folder's text_encoders/; a class label outside 0..999 is a one-line error."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

import app
from sd.pipeline import GenerateParams, ModelCache, generate, load_model

from .serving import serving
from .test_ldm_text import write_txt2img, write_vocab
from .tiny import write_tiny

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    write_tiny("ldm_cin256_v2", models / "cin256-v2.safetensors")
    write_tiny("ldm_celeba256", models / "celeba256.safetensors")
    write_txt2img(models / "txt2img-f8-large.safetensors")
    write_vocab(models / "text_encoders" / "vocab.txt")
    demo = app.build_app(models, device="cpu", dtype="float32", cache=ModelCache(), demo_path=None,
                         outputs_dir=tmp_path_factory.mktemp("out"))
    from gradio_client import Client

    with serving(demo) as url:
        yield Client(url, verbose=False), models


RUN = dict(prompt="", negative_prompt="", sampler="DDIM", schedule="DDIM", steps=2, seed=11, width=64, height=64,
           batch_size=1, batch_count=1)


def test_ldm_tab_generates_class_conditional_and_unconditional(client) -> None:
    c, models = client
    assert "ldm" in app.family_tabs() and "class_label" in app.tab_inputs("ldm")
    out = c.predict(checkpoint="cin256-v2.safetensors", cfg=3.0, class_label="golden retriever", **RUN,
                    api_name="/generate_ldm")
    got = np.asarray(Image.open(out[0][0]["image"]).convert("RGB"))
    want = generate(load_model(models / "cin256-v2.safetensors"),
                    GenerateParams(width=64, height=64, steps=2, cfg=3.0, seed=11, sampler="ddim",
                                   schedule="ddim_uniform", inputs={"class_label": "207"}))
    assert np.array_equal(got, np.asarray(want.images[0]))
    assert 'Class label: "207: golden retriever"' in out[3]
    out = c.predict(checkpoint="celeba256.safetensors", cfg=1.0, **RUN, api_name="/generate_ldm")
    assert np.asarray(Image.open(out[0][0]["image"])).shape == (64, 64, 3)
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=r"0\.\.999") as e:
        c.predict(checkpoint="cin256-v2.safetensors", cfg=3.0, class_label="1000", **RUN, api_name="/generate_ldm")
    assert "\n" not in str(e.value).strip()


def test_class_input_is_a_dropdown_of_the_imagenet_names() -> None:
    import gradio as gr

    from sd.families.ldm import CLASS_INPUT

    with gr.Blocks():
        comp = app.input_component(CLASS_INPUT, "ldm-class_label")
    assert isinstance(comp, gr.Dropdown) and comp.allow_custom_value
    values = [c[1] for c in comp.choices]
    assert len(values) == 1000 and values[207] == "207: golden retriever" and comp.value == "88: macaw"


def test_ldm_tab_generates_text_to_image(client) -> None:
    c, models = client
    run = {**RUN, "prompt": "a red house", "negative_prompt": "the cat"}
    out = c.predict(checkpoint="txt2img-f8-large.safetensors", cfg=5.0, **run, api_name="/generate_ldm")
    got = np.asarray(Image.open(out[0][0]["image"]).convert("RGB"))
    want = generate(load_model(models / "txt2img-f8-large.safetensors"),
                    GenerateParams(prompt="a red house", negative_prompt="the cat", width=64, height=64, steps=2,
                                   cfg=5.0, seed=11, sampler="ddim", schedule="ddim_uniform"))
    assert np.array_equal(got, np.asarray(want.images[0]))
    assert out[3].startswith("a red house\nNegative prompt: the cat\n")
