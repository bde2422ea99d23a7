"""SD3 / SD3.5 as a family end to end (issue 16 phase B), CPU, tiny checkpoints in the released layouts.

Esser et al. 2024 ("Scaling Rectified Flow Transformers for High-Resolution Image Synthesis"). What is shown:
- the released key lists are detected as sd3 / sd3.5-large / sd3.5-medium (exactly one family each) and every
  tensor is accounted for (loaded, or ignored under a named rule) with nothing missing;
- a tiny bundled SD3 file generates through `generate` and the CLI equal to a hand-built run of the parity-proven
  pieces (tests/test_parity_sd3.py: MMDiT, flow denoiser, CFG, Euler, CLIP-L/G + T5 assembly) with the same
  sigmas and noise, within 1e-5; the shift and the schedules reach the sampler; the decode is latent / 1.5305 +
  0.0609;
- separate files: a tiny SD3.5 file in models/checkpoints/ with clip_l / clip_g / t5xxl_fp16 + spiece.model in
  models/text_encoders/ generates (equal to the hand-built run from those files); without T5 it falls back to
  CLIP-L/G alone and says so; a missing CLIP-G names the file it needs; a CLIP-L file where CLIP-G belongs and a
  T5 tokenizer that is not sentencepiece are one-line errors naming the file (CLI exit 2);
- skip-layer guidance: scale 0 equals plain CFG exactly, a real scale equals the hand-built sd.slg run;
- infotext `Shift` / `Skip layer guidance ...` / `T5: off` written and read back.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sd.__main__ import main
from sd.checkpoint import CheckpointError, ignore_reason
from sd.denoiser import make_denoiser
from sd.families import FAMILIES, detect, get_family
from sd.families.sd3 import parse_layers
from sd.guidance import cfg_denoiser
from sd.loader import account_keys, expected_tensors
from sd.mmdit import MMDiT, load_mmdit, mmdit_config_for, mmdit_net
from sd.pipeline import GenerateParams, generate, load_model
from sd.pnginfo import build_parameters, guess_tab, parse_parameters, to_settings
from sd.samplers import sample, sample_euler
from sd.schedules import flow_schedule, flow_sigmas
from sd.sd3_text import encode_sd3_prompt, load_sd3_clip
from sd.slg import SkipLayerGuidance, slg_cfg_denoiser
from sd.t5 import build_t5, load_t5, load_t5_tokenizer
from sd.text import build_text_encoder
from sd.text_encoders import TextSources, clip_config
from sd.vae import AutoencoderKL

from .tiny_sd3 import (CLIP_WIDTH, LAYOUTS, TINY_VAE, _perturb, reference_shapes, tiny_clip_configs,
                       tiny_mmdit_config, tiny_t5_config, tiny_vae_tensors, write_tiny_sd3, write_tiny_spiece)

FAMILY = {"sd3_medium": "sd3", "sd35_large": "sd3.5-large", "sd35_medium": "sd3.5-medium"}
PROMPT, NEGATIVE = "a red cat on the moon", "blurry"
G_WIDTH = 48              # the separate-file CLIP-G is wider than CLIP-L (32), as bigG (1280) is wider than L (768)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("name", LAYOUTS)
def test_released_layouts_detected_and_accounted_exactly(name: str) -> None:
    shapes = reference_shapes(name)
    net = mmdit_config_for(shapes)
    fits = [f.name for f in FAMILIES if f.network == "mmdit" and f.matches(shapes, net)]
    assert fits == [FAMILY[name]]
    spec = detect(shapes)
    assert (spec.family, spec.network, spec.prediction, spec.unsupported) == (FAMILY[name], "mmdit", "flow", ())
    assert spec.latent == get_family(spec.family).latent and (spec.latent.scale, spec.latent.shift) == (1.5305, 0.0609)
    assert spec.unet.depth == {"sd3_medium": 24, "sd35_large": 38, "sd35_medium": 24}[name]
    assert spec.unet.x_block_self_attn_layers == (tuple(range(13)) if name == "sd35_medium" else ())
    rep = account_keys(shapes, spec)
    assert rep.missing == rep.unexpected == rep.shape_mismatch == rep.unsupported == []
    ignored = {k for k in shapes if ignore_reason(k)}
    assert set(rep.ignored) == ignored
    built = {k: s for comp in expected_tensors(spec, shapes).values() for k, s in comp.items()}
    assert built == {k: s for k, s in shapes.items() if k not in ignored}      # names and shapes, exactly
    if name == "sd3_medium":   # the bundle: CLIP-L/G as text towers, T5 through the family, 4 keys ignored by rule
        assert [len(v) for v in rep.loaded.values()] == [491, 244, 196, 517, 219] and len(ignored) == 4
        assert rep.ignored["text_encoders.clip_l.transformer.text_projection.weight"].startswith("SD3 bundles'")
    else:
        assert list(rep.loaded) == ["mmdit", "vae"] and spec.text_encoders == ()


def test_inspect_reads_the_three_tiny_layouts(tmp_path, capsys) -> None:
    for name in LAYOUTS:
        path = write_tiny_sd3(name, tmp_path / f"{name}.safetensors")
        assert main(["inspect", str(path)]) == 0
        rep = json.loads(capsys.readouterr().out)
        n = len(load_file(str(path)))
        assert (rep["family"], rep["network"], rep["prediction"]) == (FAMILY[name], "mmdit", "flow")
        assert rep["tensors"]["total"] == n == rep["tensors"]["loaded"] + rep["tensors"]["ignored"]
        assert rep["unet"]["depth"] == {"sd3_medium": 2, "sd35_large": 3, "sd35_medium": 4}[name]


# ---------------------------------------------------------------------------------------------- bundled file


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    """tiny sd3_medium (all text encoders bundled) with spiece.model beside it."""
    root = tmp_path_factory.mktemp("bundled")
    path = write_tiny_sd3("sd3_medium", root / "sd3_medium_incl_clips_t5xxlfp16.safetensors")
    write_tiny_spiece(root / "spiece.model")
    return path


def hand_built(ckpt: dict, clip_l, clip_g, t5, tok, p: GenerateParams, shift=3.0, slg=None) -> torch.Tensor:
    """The parity path of tests/test_parity_sd3.py, by hand: both prompts encoded, flow denoiser on the MMDiT,
    CFG (+ SLG), the reference sigmas, the seed's noise unscaled, Euler."""
    cond = encode_sd3_prompt(p.prompt, clip_l, clip_g, 96, t5, tok)
    uncond = encode_sd3_prompt(p.negative_prompt, clip_l, clip_g, 96, t5, tok)
    den = make_denoiser(mmdit_net(load_mmdit(ckpt)), "flow", None)
    sigmas = flow_sigmas(p.steps, shift)
    guided = (cfg_denoiser(den, cond, uncond, p.cfg) if slg is None
              else slg_cfg_denoiser(den, cond, uncond, p.cfg, sigmas, slg))
    noise = torch.randn((1, 16, p.height // 8, p.width // 8), generator=torch.Generator("cpu").manual_seed(p.seed))
    return sample_euler(guided, noise, sigmas)


def bundle_text(ckpt: dict, tok_path: Path):
    lcfg, gcfg = tiny_clip_configs()
    strip = lambda pfx: {k[len(pfx):]: v for k, v in ckpt.items() if k.startswith(pfx)}  # noqa: E731
    return (load_sd3_clip(strip(lcfg.prefix), lcfg), load_sd3_clip(strip(gcfg.prefix), gcfg),
            load_t5(strip("text_encoders.t5xxl.transformer.")), load_t5_tokenizer(tok_path))


@torch.no_grad()
def test_bundled_file_generates_like_the_parity_path(bundled) -> None:
    model = load_model(bundled)
    assert model.spec.family == "sd3" and [type(m).__name__ for m in model.parts.text_encoders] == \
        ["TextEncoder", "TextEncoder", "T5Tower"]
    assert model.spec.notes == ("text encoders: CLIP-L from the checkpoint; CLIP-G from the checkpoint; T5-XXL from "
                                "the checkpoint (tokenizer spiece.model)",)
    p = GenerateParams(prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=48, steps=6, cfg=4.5, seed=11)
    res = generate(model, p)
    ckpt = load_file(str(bundled))
    clip_l, clip_g, t5, tok = bundle_text(ckpt, bundled.parent / "spiece.model")
    ref = hand_built(ckpt, clip_l, clip_g, t5, tok, p)
    assert res.latents.shape == (1, 16, 6, 8) and ref.abs().max() > 0.5
    assert (res.latents - ref).abs().max() < 1e-5
    assert res.info["notes"] == list(model.spec.notes)
    # decoded with SD3's latent format, rounded to 8 bits as every family
    vae = AutoencoderKL(TINY_VAE).eval()
    vae.load_state_dict({k[len("first_stage_model."):]: v for k, v in ckpt.items()
                         if k.startswith("first_stage_model.")})
    px = ((vae.decode(res.latents / 1.5305 + 0.0609) + 1) / 2).clamp(0, 1) * 255
    got = torch.from_numpy(np.array(res.images[0])).permute(2, 0, 1).float()
    assert res.images[0].size == (64, 48) and (got - px[0].round()).abs().max() <= 1
    # the shift reaches the sigmas; T5 off gives the CLIP-only context; the negative is always encoded
    ref1 = hand_built(ckpt, clip_l, clip_g, t5, tok, p, shift=1.0)
    got1 = generate(model, replace(p, inputs={"shift": 1.0})).latents
    assert (got1 - ref1).abs().max() < 1e-5 and (got1 - ref).abs().max() > 1e-2
    no_t5 = generate(model, replace(p, inputs={"use_t5": False}))
    assert (no_t5.latents - hand_built(ckpt, clip_l, clip_g, None, None, p)).abs().max() < 1e-5
    assert no_t5.info["notes"][-1] == "T5-XXL off for this request: the prompt went through CLIP-L/G alone"
    empty_neg = generate(model, replace(p, negative_prompt="")).latents
    assert (empty_neg - hand_built(ckpt, clip_l, clip_g, t5, tok, replace(p, negative_prompt=""))).abs().max() < 1e-5


@torch.no_grad()
def test_schedules_and_samplers_run_on_the_flow_model(bundled) -> None:
    model = load_model(bundled)
    base = GenerateParams(prompt=PROMPT, width=32, height=32, steps=4, cfg=3.0, seed=2)
    # "normal" is the reference's schedule (the pinned numbers at 8 steps, shift 3)
    assert torch.allclose(flow_schedule("normal", 8, 3.0), torch.tensor(
        [1.0, 0.947542, 0.882788, 0.800837, 0.693793, 0.548046, 0.337972, 0.00892857, 0]), atol=1e-6)
    k = flow_schedule("karras", 5, 3.0)
    assert k[0] == 1.0 and abs(k[-2].item() - 3 * 0.001 / (1 + 2 * 0.001)) < 1e-7 and k[-1] == 0
    outs = {}
    for sampler, schedule in (("euler", "normal"), ("dpmpp_2m", "karras"), ("euler_ancestral", "exponential")):
        outs[sampler] = generate(model, replace(base, sampler=sampler, schedule=schedule)).latents
        assert torch.isfinite(outs[sampler]).all() and outs[sampler].abs().max() > 0.1
    assert (outs["euler"] - outs["dpmpp_2m"]).abs().max() > 1e-3
    # the ancestral sampler runs through the flow form (sd.samplers.sample(..., flow=True)), not the VE one
    x = torch.randn((1, 16, 4, 4), generator=torch.Generator("cpu").manual_seed(2))
    from sd.pipeline import guided_denoiser

    p = replace(base, sampler="euler_ancestral", schedule="exponential")
    want = sample("euler_ancestral", guided_denoiser(model, p), x, flow_schedule("exponential", 4, 3.0),
                  generator=torch.Generator("cpu").manual_seed(3), flow=True)
    assert (outs["euler_ancestral"] - want).abs().max() < 1e-5


def test_bad_requests_are_one_line_errors(bundled, tmp_path, capsys) -> None:
    model = load_model(bundled)
    with pytest.raises(ValueError, match="multiples of 16 and at least 32 pixels; got 72x48"):
        generate(model, GenerateParams(prompt="a", width=72, height=48, steps=1))
    with pytest.raises(ValueError, match="slg_layers must be block numbers"):
        generate(model, GenerateParams(prompt="a", width=32, height=32, steps=1, inputs={"slg_layers": "7,x"}))
    with pytest.raises(ValueError, match=r"slg_layers \[5\] do not exist: this MMDiT has joint blocks 0..1"):
        generate(model, GenerateParams(prompt="a", width=32, height=32, steps=1, inputs={"slg_layers": "5"}))
    out = tmp_path / "o.png"
    base = ["generate", "--checkpoint", str(bundled), "--prompt", "a", "--steps", "1", "--out", str(out)]
    assert main(base + ["--width", "72", "--height", "48"]) == 2 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: width and height must be multiples of 16 and at least 32 pixels; got 72x48"]
    bad = tmp_path / "spiece.model"
    bad.write_text("this is not a sentencepiece model\n")
    assert main(base + ["--width", "32", "--height", "32", "--t5-tokenizer", str(bad)]) == 2 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: spiece.model: not a T5 tokenizer (")
    assert err[0].endswith("expected T5's sentencepiece model (spiece.model) or its tokenizers tokenizer.json")


def test_cli_generate_equals_generate(bundled, tmp_path, capsys) -> None:
    out, z = tmp_path / "img.png", tmp_path / "z.safetensors"
    args = ["generate", "--checkpoint", str(bundled), "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--width",
            "64", "--height", "48", "--steps", "4", "--cfg", "4.5", "--seed", "5", "--out", str(out),
            "--save-latent", str(z), "--shift", "2", "--slg-layers", "1", "--slg-scale", "2", "--slg-end", "0.6",
            "--no-t5"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["family"] == "sd3"
    assert "note: T5-XXL off (--no-t5): running on CLIP-L/G alone" in captured.err
    model = load_model(bundled, sources=TextSources(t5=False))
    assert len(model.parts.text_encoders) == 2          # --no-t5: T5 not even loaded
    want = generate(model, GenerateParams(prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=48, steps=4,
                                          cfg=4.5, seed=5, inputs={"shift": 2.0, "slg_layers": "1", "slg_scale": 2.0,
                                                                   "slg_end": 0.6, "use_t5": False}))
    assert torch.equal(load_file(str(z))["latent"], want.latents)
    from PIL import Image

    assert Image.open(out).size == (64, 48)


@torch.no_grad()
def test_skip_layer_guidance_through_generate(bundled) -> None:
    model = load_model(bundled)
    p = GenerateParams(prompt=PROMPT, negative_prompt=NEGATIVE, width=32, height=32, steps=10, cfg=4.0, seed=8)
    plain = generate(model, replace(p, inputs={"slg_layers": "none"})).latents
    zero = generate(model, replace(p, inputs={"slg_layers": "1", "slg_scale": 0.0})).latents
    assert torch.equal(zero, plain)                   # scale 0 is plain CFG, exactly
    assert torch.equal(generate(model, p).latents, plain)   # SD3 medium: no SLG unless asked
    slg = generate(model, replace(p, inputs={"slg_layers": "1", "slg_scale": 2.5, "slg_end": 0.35})).latents
    ckpt = load_file(str(model.path))
    clip_l, clip_g, t5, tok = bundle_text(ckpt, model.path.parent / "spiece.model")
    ref = hand_built(ckpt, clip_l, clip_g, t5, tok, p, slg=SkipLayerGuidance((1,), 2.5, 0.01, 0.35))
    assert (slg - ref).abs().max() < 1e-5 and (slg - plain).abs().max() > 1e-3
    # the 3.5 medium default is layers 7, 8, 9; parsing
    assert parse_layers("", (7, 8, 9)) == (7, 8, 9) and parse_layers("[1, 2]", ()) == (1, 2)
    assert parse_layers("none", (7, 8, 9)) == () and parse_layers(" 3 4 ", ()) == (3, 4)


def test_infotext_round_trip() -> None:
    kw = dict(prompt="a cat", negative_prompt="", steps=40, sampler="dpmpp_2m", schedule="normal", cfg=4.5, seed=3,
              width=1024, height=1024, model_name="sd3.5_medium", model_hash="0123456789")
    text = build_parameters(**kw, family="sd3.5-medium", inputs={"shift": 2.5, "slg_layers": "", "slg_scale": 2.5,
                                                                 "slg_start": 0.01, "slg_end": 0.2, "use_t5": False})
    assert ('Shift: 2.5, Skip layer guidance layers: "7,8,9", Skip layer guidance scale: 2.5, Skip layer guidance '
            'start: 0.01, Skip layer guidance end: 0.2, T5: off') in text
    s = to_settings(parse_parameters(text))
    assert (s["shift"], s["slg_layers"], s["slg_scale"], s["slg_start"], s["slg_end"], s["use_t5"]) == \
        (2.5, "7,8,9", 2.5, 0.01, 0.2, False)
    assert guess_tab(s) == "sd3" and s["steps"] == 40 and s["sampler"] == "dpmpp_2m"
    # SD3 medium with SLG off writes only the shift
    plain = build_parameters(**kw, family="sd3", inputs={"shift": 3.0, "slg_layers": "", "slg_scale": 2.5,
                                                         "use_t5": True})
    assert "Shift: 3," in plain and "Skip layer" not in plain and "T5:" not in plain


# ---------------------------------------------------------------------------------------------- separate files


def _save(tensors: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def tiny_clip_g_config():
    return dataclasses.replace(clip_config_base(), width=G_WIDTH, mlp=2 * G_WIDTH, projection_dim=G_WIDTH)


def clip_config_base():
    return dataclasses.replace(tiny_clip_configs()[1], prefix="")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """models/checkpoints/sd3.5_medium.safetensors (MMDiT + VAE only, vector 32 + 48 wide) and
    models/text_encoders/{clip_l, clip_g, t5xxl_fp16}.safetensors + spiece.model, as ComfyUI lays them out."""
    root = tmp_path_factory.mktemp("models")
    cfg = replace(tiny_mmdit_config("sd35_medium"), adm_in_channels=CLIP_WIDTH + G_WIDTH)
    g = torch.Generator().manual_seed(21)
    torch.manual_seed(20)
    sd = _perturb(MMDiT(cfg).state_dict(), g)
    sd["pos_embed"] = torch.randn(sd["pos_embed"].shape, generator=g)
    ckpt = _save({**{"model.diffusion_model." + k: v for k, v in sd.items()}, **tiny_vae_tensors(3)},
                 root / "checkpoints" / "sd3.5_medium.safetensors")
    te = root / "text_encoders"
    lcfg = dataclasses.replace(tiny_clip_configs()[0], prefix="")
    torch.manual_seed(22)
    l_sd = {k: v for k, v in _perturb(build_text_encoder(lcfg).state_dict(), g).items() if "position_ids" not in k}
    _save({**l_sd, "text_projection.weight": torch.eye(CLIP_WIDTH), "logit_scale": torch.tensor(4.6)},
          te / "clip_l.safetensors")   # a released clip_l file carries an (unused) projection
    torch.manual_seed(23)
    g_sd = {k: v for k, v in _perturb(build_text_encoder(tiny_clip_g_config()).state_dict(), g).items()
            if "position_ids" not in k}
    _save(g_sd, te / "clip_g.safetensors")
    torch.manual_seed(24)
    t5 = _perturb(build_t5(tiny_t5_config(48)).state_dict(), g)
    t5.pop("encoder.embed_tokens.weight")
    _save({k: v.half() for k, v in t5.items()}, te / "t5xxl_fp16.safetensors")   # stored in fp16, upcast on load
    write_tiny_spiece(te / "spiece.model")
    return ckpt, te


def separate_text(te: Path, with_t5: bool = True):
    lcfg = clip_config(dict((k, tuple(v.shape)) for k, v in load_file(str(te / "clip_l.safetensors")).items()),
                       "clip_l", "")
    assert lcfg.projection_dim == 0 and lcfg.heads == 1 and lcfg.pad_token == 49407
    clip_l = load_sd3_clip(load_file(str(te / "clip_l.safetensors")), lcfg)
    clip_g = load_sd3_clip(load_file(str(te / "clip_g.safetensors")), tiny_clip_g_config())
    if not with_t5:
        return clip_l, clip_g, None, None
    return clip_l, clip_g, load_t5(load_file(str(te / "t5xxl_fp16.safetensors"))), load_t5_tokenizer(te / "spiece.model")


@torch.no_grad()
def test_separate_text_encoder_files(models, tmp_path) -> None:
    ckpt_path, te = models
    model = load_model(ckpt_path)
    assert model.spec.family == "sd3.5-medium" and model.spec.text_encoders == ()
    assert model.spec.notes == ("text encoders: CLIP-L from text_encoders/clip_l.safetensors; CLIP-G from "
                                "text_encoders/clip_g.safetensors; T5-XXL from text_encoders/t5xxl_fp16.safetensors "
                                "(tokenizer text_encoders/spiece.model)",)
    p = GenerateParams(prompt=PROMPT, negative_prompt=NEGATIVE, width=48, height=32, steps=5, cfg=4.0, seed=4,
                       inputs={"slg_layers": "1,2", "slg_end": 0.5})
    got = generate(model, p)
    ckpt = load_file(str(ckpt_path))
    clip_l, clip_g, t5, tok = separate_text(te)
    slg = SkipLayerGuidance((1, 2), 2.5, 0.01, 0.5)
    ref = hand_built(ckpt, clip_l, clip_g, t5, tok, p, slg=slg)
    assert got.latents.shape == (1, 16, 4, 6) and ref.abs().max() > 0.5
    assert (got.latents - ref).abs().max() < 1e-5

    # a copy of the layout without T5: CLIP-L/G alone, said in plain words
    other = tmp_path / "m"
    shutil.copytree(ckpt_path.parent.parent, other)
    (other / "text_encoders" / "t5xxl_fp16.safetensors").unlink()
    clip_only = load_model(other / "checkpoints" / "sd3.5_medium.safetensors")
    assert clip_only.spec.notes[-1].startswith("no T5-XXL found (t5xxl_fp16.safetensors in a text_encoders/ "
                                               "(or ComfyUI clip/) folder beside the checkpoint or in the models "
                                               "folder, or give --text-encoders DIR): running on CLIP-L/G alone")
    res = generate(clip_only, p)
    assert res.info["notes"] == list(clip_only.spec.notes)
    ref0 = hand_built(ckpt, clip_l, clip_g, None, None, p, slg=slg)
    assert (res.latents - ref0).abs().max() < 1e-5 and (res.latents - got.latents).abs().max() > 1e-3

    # no CLIP-G: the error names the file and where it goes
    (other / "text_encoders" / "clip_g.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        load_model(other / "checkpoints" / "sd3.5_medium.safetensors")
    assert str(e.value) == ("sd3.5_medium.safetensors: the CLIP-G (OpenCLIP ViT-bigG/14 text encoder) is missing: "
                            "put clip_g.safetensors in a text_encoders/ (or ComfyUI clip/) folder beside the checkpoint "
                            "or in the models folder, or give --text-encoders DIR")

    # a CLIP-L file where CLIP-G belongs
    shutil.copy(te / "clip_l.safetensors", other / "text_encoders" / "clip_g.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_model(other / "checkpoints" / "sd3.5_medium.safetensors")
    assert str(e.value).startswith("clip_g.safetensors: expected the CLIP-G (OpenCLIP ViT-bigG/14 text encoder) whose "
                                   "pooled output completes the MMDiT's 80-wide vector after CLIP-L's 32 (48 wide); "
                                   "this file gives 32")


def test_separate_files_through_the_cli(models, tmp_path, capsys) -> None:
    """--text-encoders DIR and --t5-tokenizer PATH from anywhere; the wrong CLIP-G is exit 2 with one line."""
    ckpt_path, te = models
    alone = tmp_path / "elsewhere" / "sd3.5_medium.safetensors"
    alone.parent.mkdir()
    shutil.copy(ckpt_path, alone)
    enc = tmp_path / "encoders"
    shutil.copytree(te, enc)
    tok = enc / "spiece.model"
    tok.rename(tmp_path / "t5.model")
    out = tmp_path / "o.png"
    args = ["generate", "--checkpoint", str(alone), "--prompt", PROMPT, "--width", "32", "--height", "32", "--steps",
            "2", "--slg-layers", "1", "--out", str(out), "--save-latent", str(tmp_path / "z.safetensors")]
    assert main(args) == 2 and not out.exists()    # nothing beside the checkpoint
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the CLIP-L (OpenAI CLIP ViT-L/14 text encoder) is missing: put clip_l.safetensors" in err[0]
    assert main(args + ["--text-encoders", str(enc), "--t5-tokenizer", str(tmp_path / "t5.model")]) == 0
    assert "note: text encoders: CLIP-L from encoders/clip_l.safetensors; CLIP-G from encoders/clip_g.safetensors; " \
           "T5-XXL from encoders/t5xxl_fp16.safetensors (tokenizer t5.model)" in capsys.readouterr().err
    z = load_file(str(tmp_path / "z.safetensors"))["latent"]
    direct = load_model(ckpt_path)
    want = generate(direct, GenerateParams(prompt=PROMPT, width=32, height=32, steps=2, cfg=7.0, seed=0,
                                           inputs={"slg_layers": "1"})).latents
    assert torch.equal(z, want)
    shutil.copy(enc / "clip_l.safetensors", enc / "clip_g.safetensors")
    assert main(args + ["--text-encoders", str(enc)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: clip_g.safetensors: expected the CLIP-G")


@torch.no_grad()
def test_img2img_starts_on_the_flow_path(bundled) -> None:
    """img2img on a flow model: x = (1 - sigma_0) z0 + sigma_0 n on the strength-truncated schedule, z0 the VAE mean
    in SD3's latent format ((z - 0.0609) * 1.5305)."""
    from PIL import Image

    from sd.pipeline import encode_image, guided_denoiser
    from sd.samplers import img2img_start

    model = load_model(bundled)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    p = GenerateParams(prompt=PROMPT, width=32, height=32, steps=6, cfg=3.0, seed=5, init_image=img, strength=0.5)
    got = generate(model, p)
    sigmas = img2img_start(flow_sigmas(6, 3.0), 0.5)
    assert 0.5 < sigmas[0] < 1 and got.steps_done == len(sigmas) - 1 == 4   # A1111: t_enc int(0.5 * 6) = 3, 4 steps
    z = model.parts.vae.encode(torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None])
    z0 = encode_image(model, img, 32, 32)
    assert torch.allclose(z0, (z - 0.0609) * 1.5305)
    noise = torch.randn((1, 16, 4, 4), generator=torch.Generator("cpu").manual_seed(5))
    x = (1 - sigmas[0]) * z0 + sigmas[0] * noise
    ref = sample_euler(guided_denoiser(model, p), x, sigmas)
    assert (got.latents - ref).abs().max() < 1e-5 and (got.latents - z0).abs().max() > 1e-2


@torch.no_grad()
def test_diffusers_component_folders(models, tmp_path) -> None:
    """text_encoder{,_2,_3}/model.safetensors + tokenizer_3/spiece.model beside the checkpoint (diffusers' layout)
    give the same towers as the ComfyUI layout."""
    ckpt_path, te = models
    root = tmp_path / "pipe"
    for sub, name in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"), ("text_encoder_3", "t5xxl_fp16")):
        (root / sub).mkdir(parents=True)
        shutil.copy(te / f"{name}.safetensors", root / sub / "model.safetensors")
    (root / "tokenizer_3").mkdir()
    shutil.copy(te / "spiece.model", root / "tokenizer_3" / "spiece.model")
    shutil.copy(ckpt_path, root / "sd3.5_medium.safetensors")
    model = load_model(root / "sd3.5_medium.safetensors")
    assert model.spec.notes == ("text encoders: CLIP-L from text_encoder/model.safetensors; CLIP-G from "
                                "text_encoder_2/model.safetensors; T5-XXL from text_encoder_3/model.safetensors "
                                "(tokenizer tokenizer_3/spiece.model)",)
    p = GenerateParams(prompt=PROMPT, width=32, height=32, steps=2, seed=1, inputs={"slg_layers": "none"})
    assert torch.equal(generate(model, p).latents, generate(load_model(ckpt_path), p).latents)


def test_a_text_encoder_file_is_not_taken_for_a_checkpoint(models) -> None:
    """In a models-folder listing, clip_l / t5xxl files get a one-line reason saying where they belong."""
    _, te = models
    for name in ("clip_l", "clip_g", "t5xxl_fp16"):
        shapes = {k: tuple(v.shape) for k, v in load_file(str(te / f"{name}.safetensors")).items()}
        with pytest.raises(CheckpointError, match="it looks like a separate text encoder .* which MMDiT checkpoints "
                                                  "read from a text_encoders/ folder"):
            detect(shapes)
        # and the models-folder listing keeps it out of the SD3 tab (its message does not read as an SD3 file's)
        from sd.models_dir import detect_file

        assert detect_file(te / f"{name}.safetensors")[0] is None


@torch.no_grad()
def test_half_precision_runs_close_to_float32(bundled) -> None:
    """dtype is an argument: bfloat16 / float16 weights (T5's wo kept in float32 for float16) on the CPU give the
    float32 latents within 5% / 1% of their largest magnitude (measured 2.0% / 0.2%)."""
    p = GenerateParams(prompt=PROMPT, negative_prompt=NEGATIVE, width=32, height=32, steps=3, cfg=4.5, seed=3)
    ref = generate(load_model(bundled), p).latents
    for dtype, bound in (("bfloat16", 0.05), ("float16", 0.01)):
        got = generate(load_model(bundled, dtype=dtype), p).latents
        assert torch.isfinite(got).all() and got.dtype == torch.float32
        assert (got - ref).abs().max() / ref.abs().max() < bound, dtype
