"""The txt2img tabs' A1111 habits through the app (app_extras.py, issue 12): hires fix (output size, infotext, PNG Info
back to the accordion), clip skip (changes the image, round-trips), styles (merged prompt = written-out prompt),
the extra-networks listing (fits from keys, previews, the inserted text), old API calls without the new parameters,
and a LoRA from --loras-dir."""
from __future__ import annotations

import os
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

import app
import app_extras
from sd.pipeline import ModelCache

from .test_app import SD1
from .test_lora import _lora_for


@pytest.fixture(scope="module")
def ctx(tiny_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("install")
    models = root / "models"
    (models / "loras").mkdir(parents=True)
    os.link(tiny_files("sd1"), models / "sd1.safetensors")
    (root / "styles.csv").write_text('name,prompt,negative_prompt\nneon,"neon {prompt}",dark\nsharp,sharp,\n')
    demo = app.build_app(models, device="cpu", cache=ModelCache(), outputs_dir=root / "out")
    return demo.sd_context


def run(ctx, **kw):
    out = app.run_request(ctx, "sd1", dict(SD1, **kw), threading.Event(), lambda *a: None)
    return out, np.asarray(Image.open(out.gallery[0][0])).astype(int)


def test_tab_parameters_and_old_calls(ctx):
    names = app.tab_inputs("sd1")
    i = names.index(app_extras.PARAMS[0])
    assert names[i:i + len(app_extras.PARAMS)] == app_extras.PARAMS and i > names.index("strength")  # after the tab's
    assert app_extras.PARAMS[0] not in app.tab_inputs("inpaint")           # only the txt2img tabs
    s = app.fill_defaults(ctx, "sd1", {**dict.fromkeys(names), "prompt": "a"})
    assert {k: s[k] for k in app_extras.PARAMS} == app_extras.DEFAULTS      # left out: off
    plain, a = run(ctx)                                                     # SD1 has none of the new keys
    assert a.shape == (72, 64, 3) and "Hires" not in plain.infotext and "Clip skip" not in plain.infotext


def test_hires_through_the_app_and_png_info(ctx):
    out, img = run(ctx, hires=True, hires_scale=1.5, hires_steps=1, hires_denoise=0.5, hires_upscaler="Lanczos")
    assert img.shape == (104, 96, 3)        # int(72 * 1.5) = 108 rounded down to 8s, int(64 * 1.5) = 96
    text, settings, _ = app.png_info(out.gallery[0][0])
    assert "Hires upscale: 1.5, Hires steps: 1, Hires upscaler: Lanczos" in text and "Size: 64x72" in text
    up, _ = app.send_values(ctx, "sd1", settings)
    assert {k: up[k] for k in app_extras.HIRES_PARAMS} == dict(
        hires=True, hires_upscaler="Lanczos", hires_scale=1.5, hires_resize_x=0, hires_resize_y=0, hires_steps=1,
        hires_denoise=0.5)
    again, same = run(ctx, **{k: up[k] for k in app_extras.HIRES_PARAMS})
    assert np.array_equal(img, same)
    with pytest.raises(ValueError, match="unknown hires upscaler 'ESRGAN'"):
        run(ctx, hires=True, hires_upscaler="ESRGAN")


def test_clip_skip_changes_the_image_and_round_trips(ctx):
    _, one = run(ctx)
    out, two = run(ctx, clip_skip=2)
    assert np.abs(one - two).mean() > 1 and "Clip skip: 2" in out.infotext
    up, _ = app.send_values(ctx, "sd1", app.png_info(out.gallery[0][0])[1])
    assert up["clip_skip"] == 2
    with pytest.raises(ValueError, match="clip skip must be between 1 and 12, got 0"):
        run(ctx, clip_skip=0)


def test_styles_in_the_app(ctx):
    styled, a = run(ctx, prompt="a cat", negative_prompt="", styles=["neon", "sharp"])
    written, b = run(ctx, prompt="neon a cat, sharp", negative_prompt="dark")
    assert np.array_equal(a, b) and styled.infotext.startswith("neon a cat, sharp\nNegative prompt: dark\n")
    assert app_extras.style_names(ctx) == ["neon", "sharp"]
    with pytest.raises(ValueError, match=r"no such style 'gone' \(styles: neon, sharp\)"):
        run(ctx, styles=["gone"])


def _kohya(path, te_keys, k_width):
    save_file({**{f"{k}.lora_down.weight": torch.zeros(4, 8) for k in te_keys},
               "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, k_width),
               "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(8, 4)}, path)


def test_extra_networks_listing(tmp_path):
    models = tmp_path / "models"
    (models / "Lora" / "sub").mkdir(parents=True)
    (tmp_path / "embeddings").mkdir()
    _kohya(models / "Lora" / "xl.safetensors", ["lora_te1_text_model_encoder_layers_0_mlp_fc1"], 2048)
    _kohya(models / "Lora" / "sub" / "one.safetensors", ["lora_te_text_model_encoder_layers_0_mlp_fc1"], 768)
    _kohya(models / "Lora" / "odd.safetensors", [], 77)
    Image.new("RGB", (400, 300), (255, 0, 0)).save(models / "Lora" / "sub" / "one.preview.png")
    save_file({"emb_params": torch.zeros(2, 1024)}, tmp_path / "embeddings" / "v2emb.safetensors")
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, tmp_path / "embeddings" / "xlemb.safetensors")
    nets = app_extras.list_networks(models)
    assert [(n.kind, n.name, n.insert, n.fits) for n in nets] == [
        ("LoRA", "odd.safetensors", "<lora:odd:1>", ""), ("LoRA", "sub/one.safetensors", "<lora:one:1>", "SD 1.x"),
        ("LoRA", "xl.safetensors", "<lora:xl:1>", "SDXL"), ("embedding", "v2emb.safetensors", "v2emb", "SD 2.x"),
        ("embedding", "xlemb.safetensors", "xlemb", "SDXL")]
    assert nets[1].preview == models / "Lora" / "sub" / "one.preview.png" and nets[0].preview is None
    items = app_extras.gallery_items(nets)
    assert items[1][0].size == (256, 192) and items[1][0].getpixel((0, 0)) == (255, 0, 0)
    assert items[1][1] == "sub/one.safetensors (LoRA, SD 1.x)" and items[0][0].size == (128, 128)
    assert app_extras.insert("a cat", "<lora:one:1>") == "a cat <lora:one:1>"
    assert app_extras.insert("a cat <lora:one:1>", "<lora:one:1>") == "a cat <lora:one:1>"
    assert app_extras.insert("  ", "v2emb") == "v2emb"


def test_lora_from_the_loras_dir_flag(ctx, tmp_path):
    loras = tmp_path / "elsewhere"
    loras.mkdir()
    model = ctx.cache.get(ctx.index.resolve("sd1.safetensors"))
    names = {n for n, m in model.parts.unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    _lora_for(model, loras / "far.safetensors", 10, names)
    args = app.parse_args(["--loras-dir", str(loras), "--vae-dir", str(tmp_path), "--styles", "s.csv"])
    extras = app_extras.from_args(args)
    assert (extras.loras_dir, extras.vae_dir, extras.styles_file) == (loras, tmp_path, Path("s.csv"))
    c = replace(ctx, extras=extras)
    assert [n.name for n in app_extras.list_networks(c.index.root, extras.loras_dir)] == ["far.safetensors"]
    _, plain = run(c)
    out, tagged = run(c, prompt="a red circle <lora:far:1>", styles=[])
    assert np.abs(plain - tagged).mean() > 1 and "Lora hashes" in out.infotext
    with pytest.raises(ValueError, match="styles file s.csv: no such file"):
        run(c, styles=["neon"])


def test_x4_upscaler_checkpoint_as_hires_upscaler(ctx, tiny_files):
    """An SD 2 x4 upscaler file in the models folder is offered as an upscaler; pass 2 then equals: the x4 model
    (its preset's steps / sampler / CFG) on the pass-1 image, Lanczos to the target, img2img of N steps."""
    from sd.pipeline import GenerateParams, generate

    x4_path = ctx.index.root / "x4.safetensors"
    os.link(tiny_files("sd2_x4_upscaler"), x4_path)
    x4 = ctx.cache.get(x4_path)
    pre = {**ctx.presets["sd2-x4-upscaler"], "steps": 1}          # its 50 steps are the slow part of a CPU test
    c = replace(ctx, presets={**ctx.presets, "sd2-x4-upscaler": pre})
    try:
        assert list(app_extras.upscaler_models(c)) == ["x4.safetensors"]
        kw = dict(steps=1, width=32, height=40, hires_steps=1, hires_denoise=0.5, hires_scale=2)
        out, img = run(c, hires=True, hires_upscaler="x4.safetensors", **kw)
        assert img.shape == (80, 64, 3) and "Hires upscaler: x4.safetensors" in out.infotext
        first = Image.open(run(c, steps=1, width=32, height=40)[0].gallery[0][0]).convert("RGB")
        big = generate(x4, GenerateParams(prompt=SD1["prompt"], negative_prompt=SD1["negative_prompt"], width=128,
                                          height=160, steps=1, cfg=pre["cfg"], seed=SD1["seed"],
                                          sampler=pre["sampler"], schedule=pre["schedule"],
                                          inputs={"image": first})).images[0]
        p = app._params(app.fill_defaults(c, "sd1", dict(SD1, steps=1, width=32, height=40)), SD1["seed"])
        sd1 = c.cache.get(c.index.resolve("sd1.safetensors"))
        # pass 2: int(1 / 0.5) = 2 steps, the last 1 = the pipeline's img2img of 2 steps at strength 0.25
        ref = generate(sd1, replace(p, width=64, height=80, steps=2, strength=0.25,
                                    init_image=big.resize((64, 80), Image.LANCZOS), models_dir=str(c.index.root)))
        assert np.array_equal(img, np.asarray(ref.images[0]).astype(int))
        with pytest.raises(ValueError, match="unknown hires upscaler 'x5.safetensors'; choose one of .*x4.safetensors"):
            run(c, hires=True, hires_upscaler="x5.safetensors")
    finally:
        x4_path.unlink()
