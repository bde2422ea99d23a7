"""A1111's "Clip skip SDXL" option (`sdxl_clip_l_skip`, issue 12): with it on, SDXL's CLIP-L takes transformers'
`hidden_states[-k]` (k = clip skip, no final LayerNorm) as A1111's `FrozenCLIPEmbedderForSDXLWithCustomWords`
does; bigG, the SDXL refiner and SD 1.x do not change with it. Checked on the tiny SDXL / SD1 checkpoints against
a transformers CLIPTextModel holding the file's CLIP-L weights, through the text side, the pipeline, the CLI and the
app's request handling."""
from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import app
import app_extras
from sd.families.common import encode_text
from sd.pipeline import GenerateParams, generate, load_model
from sd.tokenizer import EOT, SOT

from .test_text import SENTENCE, SENTENCE_IDS

CLIP_L = "conditioner.embedders.0.transformer."   # SDXL base: CLIP-L in transformers naming


@pytest.fixture(scope="module")
def sdxl(tiny_files):
    return load_model(tiny_files("sdxl_base")), tiny_files("sdxl_base")


def reference_clip_l(path, cfg):
    """transformers' CLIPTextModel built from the tower's numbers, holding the file's CLIP-L tensors."""
    from transformers import CLIPTextConfig, CLIPTextModel

    conf = CLIPTextConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp,
                          num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                          max_position_embeddings=cfg.context_length, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    ref = CLIPTextModel(conf).eval()
    tower = getattr(ref, "text_model", ref)
    tensors = {k[len(CLIP_L + "text_model."):]: v for k, v in load_file(str(path)).items()
               if k.startswith(CLIP_L + "text_model.") and not k.endswith("position_ids")}
    missing, unexpected = tower.load_state_dict(tensors, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    return ref


def ctx_of(model, k: int, opt_in: bool, text: str = SENTENCE):
    with torch.no_grad():
        return encode_text(model.parts.text_encoders, model.spec, text, k, opt_in)   # (1, 77, 128), (1, 64)


def test_the_option_moves_clip_l_only(sdxl):
    model, path = sdxl
    clip_l, bigg = model.spec.text_encoders
    assert (clip_l.naming, clip_l.layer, clip_l.final_ln, clip_l.clip_skip_opt_in) == ("hf", "penultimate", False, True)
    assert (bigg.naming, bigg.clip_skip_opt_in) == ("openclip", False)
    w = clip_l.width
    ids = torch.tensor([[SOT, *SENTENCE_IDS, EOT] + [EOT] * (75 - len(SENTENCE_IDS))])   # open_clip ids, EOT padding
    with torch.no_grad():
        hs = reference_clip_l(path, clip_l)(input_ids=ids, output_hidden_states=True).hidden_states  # 13 x (1, 77, w)
    off, pooled_off = ctx_of(model, 1, False)
    for k in (1, 3):
        on, pooled_on = ctx_of(model, k, True)
        ref = hs[-k]                                                             # no final LayerNorm
        assert (on[..., :w] - ref).abs().max() <= 1e-5 * ref.abs().max()
        assert (on[..., :w] - hs[-2]).abs().max() > 0.1 * ref.abs().max()       # not the default layer
        assert torch.equal(on[..., w:], off[..., w:]) and torch.equal(pooled_on, pooled_off)   # bigG unchanged
    assert (off[..., :w] - hs[-2]).abs().max() <= 1e-5 * hs[-2].abs().max()   # off: the penultimate layer


def test_k2_is_the_default_and_off_ignores_k(sdxl):
    model, _ = sdxl
    off, pooled = ctx_of(model, 1, False)
    on2, pooled2 = ctx_of(model, 2, True)
    assert torch.equal(on2, off) and torch.equal(pooled2, pooled)
    for k in (2, 3, 12):
        ctx, p = ctx_of(model, k, False)
        assert torch.equal(ctx, off) and torch.equal(p, pooled)


def test_sd1_and_the_refiner_ignore_the_option(tiny_files):
    sd1 = load_model(tiny_files("sd1"))
    assert not sd1.spec.text_encoders[0].clip_skip_opt_in
    for k in (1, 2):
        assert torch.equal(ctx_of(sd1, k, True)[0], ctx_of(sd1, k, False)[0])
    assert not torch.equal(ctx_of(sd1, 2, False)[0], ctx_of(sd1, 1, False)[0])   # SD1's own clip skip still works
    refiner = load_model(tiny_files("sdxl_refiner"))
    assert [t.clip_skip_opt_in for t in refiner.spec.text_encoders] == [False]
    for k in (1, 3):
        on, pooled_on = ctx_of(refiner, k, True)
        off, pooled_off = ctx_of(refiner, k, False)
        assert torch.equal(on, off) and torch.equal(pooled_on, pooled_off)


P = GenerateParams(prompt="a red cat", negative_prompt="blurry", width=64, height=64, steps=2, cfg=5.0, seed=3)


def test_generation_pipeline_and_app(sdxl):
    model, _ = sdxl
    off = generate(model, P).latents
    on1 = generate(model, replace(P, clip_skip=1, sdxl_clip_l_skip=True)).latents
    on2 = generate(model, replace(P, clip_skip=2, sdxl_clip_l_skip=True)).latents
    assert torch.equal(on2, off)
    assert (on1 - off).abs().max() > 1e-3 * off.abs().max()
    # the app's request handling carries the checkbox into the request; nothing goes into the infotext (as A1111)
    via_app = app_extras.run(SimpleNamespace(), {"clip_skip": 1, "sdxl_clip_l_skip": True}, model, P)
    assert torch.equal(via_app.latents, on1) and "Clip skip" not in str(via_app.info.get("infotext", {}))
    with pytest.raises(ValueError, match="sdxl_clip_l_skip must be true or false, got 'yes'"):
        app_extras.check(SimpleNamespace(), {"sdxl_clip_l_skip": "yes"})
    names = app.tab_inputs("sdxl")
    i = names.index(app_extras.PARAMS[0])
    assert names[i:i + len(app_extras.PARAMS)] == app_extras.PARAMS and app_extras.PARAMS[-1] == "sdxl_clip_l_skip"


def test_cli_flag(sdxl, tmp_path):
    """`--sdxl-clip-l-skip` gives the pipeline's image of the option on (and another image than without it)."""
    from sd.__main__ import main

    model, path = sdxl
    args = ["generate", "--checkpoint", str(path), "--prompt", P.prompt, "--negative-prompt", P.negative_prompt,
            "--width", "64", "--height", "64", "--steps", "2", "--cfg", "5", "--seed", "3", "--sampler", "euler",
            "--schedule", "normal", "--clip-skip", "1"]
    assert main([*args, "--out", str(tmp_path / "off.png")]) == 0
    assert main([*args, "--sdxl-clip-l-skip", "--out", str(tmp_path / "on.png")]) == 0
    off, on = (np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int) for n in ("off", "on"))
    want = np.asarray(generate(model, replace(P, sdxl_clip_l_skip=True)).images[0]).astype(int)
    assert np.array_equal(on, want) and np.abs(off - on).max() > 0
