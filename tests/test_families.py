"""The family table (sd/families/): every released layout matches exactly one family, the declarations hold
(concat layout vs the UNet's input channels, vector width vs adm_in_channels), no family-name tests outside the
family modules, and a throwaway family defined here runs through `generate` and the CLI without any other file
changing (the test of the shape, issue 9).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sd.families
from sd.families import ldm
from sd.__main__ import main
from sd.checkpoint import CheckpointError
from sd.denoiser import make_denoiser
from sd.families import FAMILIES, Family, Input, detect, get_family
from sd.families.common import SD_LATENT, SD_RGB, batched, text_pair
from sd.families.sd1 import build as sd1_build
from sd.families.shapes import detect_unet, hf_text
from sd.guidance import cfg_denoiser
from sd.pipeline import GenerateParams, generate, load_model
from sd.presets import load_presets
from sd.samplers import sample
from sd.schedules import get_sigmas

from .tiny import REFERENCE_DIR, reference_shapes, tiny_state_dict

ROOT = Path(__file__).resolve().parents[1]
RELEASED = {"sd1": "sd1", "sd1_inpaint": "sd1-inpaint", "sd2_512_eps": "sd2", "sd2_768_v": "sd2",
            "sd2_inpaint": "sd2-inpaint", "sd2_depth": "sd2-depth", "sd2_x4_upscaler": "sd2-x4-upscaler",
            "sd21_unclip_h": "sd2-unclip-h", "sdxl_base": "sdxl-base", "sdxl_inpaint": "sdxl-inpaint",
            "sdxl_refiner": "sdxl-refiner"}


def test_every_sd_key_list_is_covered() -> None:
    """The table of cases above holds every sd1/sd2*/sdxl* list in tests/data (a new list must be added)."""
    lists = {p.stem for p in REFERENCE_DIR.glob("*.json") if re.match(r"(sd1|sd2|sd21|sdxl)", p.stem)}
    assert lists == set(RELEASED) - {"sd1_inpaint", "sdxl_inpaint"}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_each_layout_matches_exactly_one_family(name: str) -> None:
    shapes = reference_shapes(name)
    unet = detect_unet(shapes)
    fits = [f.name for f in FAMILIES if f.latent.channels + f.concat_channels() == unet.in_channels
            and f.matches(shapes, unet)]
    assert fits == [RELEASED[name]]
    spec = detect(shapes)
    fam = get_family(spec.family)
    # the declarations hold on the released numbers
    assert spec.latent == fam.latent and spec.latent.channels + fam.concat_channels() == spec.unet.in_channels
    assert spec.unet.adm_in_channels == (fam.vector_width(spec.text_encoders, spec.unet) if fam.vector_width else 0)
    assert spec.unet.out_channels == spec.latent.channels and spec.vae.factor == spec.latent.factor


@pytest.mark.parametrize("name,words", [
    ("ldm_kl_f8", "standalone VAE"),
    ("vqgan_imagenet_f16_1024", "standalone VAE")])   # lsun_churches256 runs now (tests/test_ldm.py)
def test_sd3_and_ldm_files_keep_their_refusal(name: str, words: str) -> None:
    with pytest.raises(CheckpointError, match=re.escape(words)):
        detect(reference_shapes(name))


def test_table_declarations() -> None:
    names = [f.name for f in FAMILIES if f not in ldm.FAMILIES]   # the LDM families: tests/test_ldm.py
    assert len(names) == len(set(names)) == 14
    presets = load_presets()
    for f in FAMILIES:
        assert f.preset_for("eps") in presets and f.preset_for("v") in presets, f.name
        assert f.tab == "ldm" or f.tab in {"sd1", "sd2", "sdxl", "inpaint", "variants", "sd3", "upscale", "depth", "unclip"}
        assert f.empty_negative in ("encode", "zeros")
        assert len(f.preview[0]) == f.latent.channels and len(f.preview[1]) == 3
        assert f.runs == (f.unsupported == ""), f.name
        for i in f.inputs + f.options:
            assert i.kind in sd.families.INPUT_KINDS and i.label and i.flag.startswith("--")
            assert not i.choices or i.default in i.choices
    # the running families are these, and only SDXL drops an empty negative to zeros
    assert [f.name for f in FAMILIES if f.runs and f not in ldm.FAMILIES] == ["sd1", "sd1-inpaint", "sd2", "sd2-inpaint", "sd2-depth", "sd2-x4-upscaler", "sd2-unclip-h", "sd2-unclip-l", "sdxl-base",
                                                     "sdxl-inpaint", "sdxl-refiner", "sd3", "sd3.5-large",
                                                     "sd3.5-medium"]
    assert [f.name for f in FAMILIES if f.empty_negative == "zeros"] == ["sdxl-base", "sdxl-inpaint", "sdxl-refiner"]
    assert get_family("sdxl-refiner").refines == ("sdxl-base",)
    assert (get_family("sd2").size_for("v"), get_family("sd2").size_for("eps"), get_family("sdxl-base").size_for(None)) \
        == (768, 512, 1024)
    assert get_family("sd2").preset_for("v") == "sd2-v" and get_family("sd2-unclip-l").preset_for("v") == "sd2-unclip"
    inp = {i.name: i for i in get_family("sd2-inpaint").inputs}
    assert (inp["image"].kind, inp["image"].flag, inp["mask"].kind, inp["mask"].flag) == \
        ("image", "--init-image", "mask", "--mask")
    assert inp["image"].required and inp["mask"].required
    assert get_family("sd1-inpaint").concat == (("mask", 1), ("masked_image", 4))


# family-name string tests: `family == "sd1"`, `"sd1" != spec.family`, `family.startswith(...)`,
# `family in ("sd1", ...)`, `"x4" in spec.family` (comparisons with the table's own values, f.name, are not flagged)
FAMILY_TEST = re.compile(r"""family\s*(==|!=)\s*[rbf]?["']|["']\s*(==|!=)\s*[\w.]*family\b|family\.(startswith|endswith)\("""
                         r"""|family\s+(not\s+)?in\s*[(\[{]\s*["']|["'][^"']*["']\s+(not\s+)?in\s+[\w.]*family\b""")


def family_tests_in(path: Path) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1)
            if FAMILY_TEST.search(line)]


def test_no_family_name_tests_outside_the_family_modules() -> None:
    """Family knowledge lives in sd/families/ only: no `family == "..."`, `family.startswith(...)`,
    `family in ("...", ...)` in the rest of the engine or in app.py."""
    files = [p for p in (ROOT / "sd").rglob("*.py") if "families" not in p.relative_to(ROOT / "sd").parts]
    assert len(files) > 15
    assert [hit for p in sorted(files) + [ROOT / "app.py"] for hit in family_tests_in(p)] == []
    # the pattern catches the forms it is meant for, and not a comparison with the table's values
    forms = ['a.family == "x"', "'sd1' != spec.family", 'spec.family.startswith("sdxl")', 'e.family in ("sd1",)',
             '"x4" not in spec.family', "e.family not in ['a']"]
    assert [bool(FAMILY_TEST.search(f)) for f in forms] == [True] * 6
    assert not FAMILY_TEST.search("main = e.family == fams[0].name") and not FAMILY_TEST.search("family: str = 'sd1'")


# --------------------------------------------------------------------------- a throwaway family, defined here only


def _hint(request) -> torch.Tensor:
    """The 1-channel concat: the hint image's grey levels in [-1, 1], area-averaged to the latent size."""
    img = request.inputs["hint"].convert("L")
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1)[None, None]   # (1, 1, H, W)
    return F.interpolate(x, size=(request.height // 8, request.width // 8), mode="area") * request.inputs["gain"]


def hint_condition(parts, spec, request, generator):
    ctx, _, nctx, _ = text_pair(parts, spec, request, "encode")
    hint = _hint(request)
    return (batched({"crossattn": ctx, "concat": hint}, request.batch_size),
            batched({"crossattn": nctx, "concat": hint}, request.batch_size))


def hint_matches(shapes, unet) -> bool:
    return "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in shapes


HINT = Family(
    name="sd1-hint", label="SD 1.x with a grey hint (test only)", tab="sd1", matches=hint_matches, build=sd1_build,
    latent=SD_LATENT, condition=hint_condition, concat=(("hint", 1),), preview=SD_RGB, preset="sd1",
    default_size=32,
    inputs=(Input("hint", "image", "Hint image", required=True, help="grey levels steer the layout"),
            Input("gain", "number", "Hint gain", default=1.0, min=0.0, max=4.0)),
)


@pytest.fixture
def hint_family(monkeypatch, tmp_path):
    monkeypatch.setattr(sd.families, "FAMILIES", (*FAMILIES, HINT))
    sd_ = tiny_state_dict("sd1")
    g = torch.Generator().manual_seed(5)
    w = sd_["model.diffusion_model.input_blocks.0.0.weight"]                       # (32, 4, 3, 3)
    sd_["model.diffusion_model.input_blocks.0.0.weight"] = torch.cat([w, torch.randn(w.shape[0], 1, 3, 3, generator=g)], 1)
    from safetensors.torch import save_file

    path = tmp_path / "hint.safetensors"
    save_file(sd_, str(path))
    grad = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1))
    Image.fromarray(grad).save(tmp_path / "hint.png")
    return path, tmp_path / "hint.png"


@torch.no_grad()
def test_a_new_family_runs_through_generate(hint_family) -> None:
    path, hint_png = hint_family
    model = load_model(path, prediction="eps")
    assert model.spec.family == "sd1-hint" and model.spec.unet.in_channels == 5
    hint = Image.open(hint_png)
    p = GenerateParams(prompt="a cat", negative_prompt="", width=32, height=32, steps=4, cfg=4.0, seed=9,
                       sampler="euler", inputs={"hint": hint})
    ours = generate(model, p).latents
    # by hand: the concat appended after the c_in scaling, the text as SD 1.x, the seed's noise scaled by
    # sqrt(1 + sigma_0^2), and the input's declared default (gain 1) filled in
    req = replace(p, inputs={"hint": hint, "gain": 1.0})
    ctx, _, nctx, _ = text_pair(model.parts, model.spec, req, "encode")
    concat = _hint(req)                                                              # (1, 1, 4, 4)

    def net(x, t, context):
        return model.parts.unet(torch.cat([x, concat.expand(x.shape[0], -1, -1, -1)], 1), t, context=context)

    den = cfg_denoiser(make_denoiser(net, "eps", model.sigmas), {"context": ctx}, {"context": nctx}, 4.0)
    sigmas = get_sigmas("normal", model.sigmas, 4)
    x = torch.randn((1, 4, 4, 4), generator=torch.Generator().manual_seed(9)) * math.sqrt(1 + sigmas[0].item() ** 2)
    ref = sample("euler", den, x, sigmas)
    assert ref.abs().max() > 0.1
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)
    # the input matters: another gain gives another result; bad requests are refused naming the input
    other = generate(model, replace(p, inputs={"hint": hint, "gain": 3.0})).latents
    assert (other - ours).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs the input 'hint'"):
        generate(model, replace(p, inputs={}))
    with pytest.raises(ValueError, match="does not take 'mask'"):
        generate(model, replace(p, inputs={"hint": hint, "mask": hint}))
    with pytest.raises(ValueError, match="gain must be between 0 and 4"):
        generate(model, replace(p, inputs={"hint": hint, "gain": 9}))
    with pytest.raises(ValueError, match="set width and height to 32x32"):
        generate(model, replace(p, width=64))


def test_a_new_family_runs_through_the_cli(hint_family, tmp_path, capsys) -> None:
    path, hint_png = hint_family
    assert main(["inspect", str(path), "--prediction", "eps"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["family"] == "sd1-hint" and rep["unet"]["in_channels"] == 5 and rep["unsupported"] == []
    out = tmp_path / "out" / "img.png"
    args = ["generate", "--checkpoint", str(path), "--prompt", "a cat", "--steps", "2", "--prediction", "eps",
            "--out", str(out)]
    assert main(args) == 2 and not out.exists()
    assert "error: sd1-hint needs the input 'hint'" in capsys.readouterr().err
    assert main(args + ["--hint", str(hint_png), "--gain", "2", "--save-latent", str(tmp_path / "z.safetensors")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["family"] == "sd1-hint" and Image.open(out).size == (32, 32)   # the hint's size, the family's size
    from safetensors.torch import load_file

    z = load_file(str(tmp_path / "z.safetensors"))["latent"]
    model = load_model(path, prediction="eps")
    again = generate(model, GenerateParams(prompt="a cat", width=32, height=32, steps=2, seed=0,
                                           inputs={"hint": Image.open(hint_png), "gain": 2.0})).latents
    assert torch.equal(z, again)


def test_sigmas_come_from_the_file_where_it_has_them(tmp_path) -> None:
    """LDM files carry `betas`, SGM files `denoiser.sigmas`; without either the family's schedule is used."""
    from safetensors.torch import save_file

    from sd.denoiser import discrete_sigmas, sigmas_from_betas

    sd_ = tiny_state_dict("sd1")
    betas = torch.linspace(0.0001**0.5, 0.02**0.5, 1000, dtype=torch.float64) ** 2  # another schedule (x4 upscaler's)
    sd_["betas"] = betas.float()
    save_file(sd_, str(tmp_path / "own.safetensors"))
    own = load_model(tmp_path / "own.safetensors")
    assert own.sigmas_source == "the file's betas"
    assert torch.equal(own.sigmas, sigmas_from_betas(betas.float()))
    assert own.sigmas[-1] > 2 * discrete_sigmas()[-1]            # really another schedule: sigma_max 36.9 vs 14.6
    del sd_["betas"]
    save_file(sd_, str(tmp_path / "none.safetensors"))
    none = load_model(tmp_path / "none.safetensors")
    assert none.sigmas_source.startswith("the sd1 schedule") and torch.equal(none.sigmas, discrete_sigmas())
    xl = tiny_state_dict("sdxl_refiner")
    xl["denoiser.sigmas"] = discrete_sigmas() * 1.5
    save_file(xl, str(tmp_path / "xl.safetensors"))
    m = load_model(tmp_path / "xl.safetensors")
    assert m.sigmas_source == "the file's denoiser.sigmas" and torch.equal(m.sigmas, discrete_sigmas() * 1.5)
