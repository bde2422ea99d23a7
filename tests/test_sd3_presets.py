"""Per-model defaults of SD3 / 3.5 (issue 16): the reference's table (large 40 steps, CFG 4.5, dpmpp_2m; large turbo 4
steps, CFG 1, euler; medium 50 steps, CFG 5) in presets/sd3*.json, and since turbo has large's layout, a preset
picker: `--preset NAME` on the CLI, a Preset dropdown in the SD3 tab; a file name containing "turbo" preselects the
turbo preset (`file_name_hint`), said in a note / the facts. The SD3 tab's size sliders step by 16."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import app
from sd.__main__ import main
from sd.pipeline import GenerateParams, ModelCache, generate, load_model
from sd.presets import hinted_preset, load_presets, pick_preset
from sd.sd3_text import CLIP_G_PREFIX, CLIP_L_PREFIX

from .tiny_sd3 import tiny_mmdit_tensors, tiny_text_tensors, tiny_vae_tensors


def test_the_reference_table_and_the_hint() -> None:
    pre = load_presets()
    table = {n: (pre[n]["steps"], pre[n]["cfg"], pre[n]["sampler"], pre[n]["size_step"])
             for n in ("sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium", "sd3")}
    assert table == {"sd3.5-large": (40, 4.5, "dpmpp_2m", 16), "sd3.5-large-turbo": (4, 1.0, "euler", 16),
                     "sd3.5-medium": (50, 5.0, "euler", 16), "sd3": (50, 5.0, "euler", 16)}
    assert hinted_preset("m/SD3.5_Large_Turbo.safetensors", "sd3.5-large", pre)["name"] == "sd3.5-large-turbo"
    assert hinted_preset("m/sd3.5_large.safetensors", "sd3.5-large", pre) is None
    assert hinted_preset("m/sd3_turbo.safetensors", "sd3", pre) is None       # the hint is for sd3.5-large only
    assert pick_preset(None, "sd3.5-large", "sd3.5_large.safetensors", pre) == (None, "")
    with pytest.raises(ValueError, match=r"^--preset sd3.5-medium is for sd3.5-medium checkpoints; this is a "
                                         r"sd3.5-large checkpoint \(its presets: sd3.5-large, sd3.5-large-turbo\)$"):
        pick_preset("sd3.5-medium", "sd3.5-large", "x.safetensors", pre)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """models/sd3.5_large_turbo.safetensors and the same file as models/sd3.5_large.safetensors (tiny sd35_large
    layout + VAE), CLIP-L/G in models/text_encoders/ (no T5: CLIP-only, faster)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("models")
    turbo = root / "sd3.5_large_turbo.safetensors"
    save_file({k: v.contiguous() for k, v in {**tiny_mmdit_tensors("sd35_large"), **tiny_vae_tensors()}.items()},
              str(turbo))
    shutil.copy(turbo, root / "sd3.5_large.safetensors")
    text = tiny_text_tensors()
    (root / "text_encoders").mkdir()
    for name, prefix in (("clip_l", CLIP_L_PREFIX), ("clip_g", CLIP_G_PREFIX)):
        save_file({k[len(prefix):]: v.contiguous() for k, v in text.items() if k.startswith(prefix)},
                  str(root / "text_encoders" / f"{name}.safetensors"))
    return root


@torch.no_grad()
def test_cli_preset_and_the_turbo_file_name(models, tmp_path, capsys) -> None:
    turbo = models / "sd3.5_large_turbo.safetensors"
    base = ["generate", "--checkpoint", str(turbo), "--prompt", "a red cat", "--width", "32", "--height", "32"]

    def run(*extra):
        z = tmp_path / "z.safetensors"
        assert main([*base, *extra, "--out", str(tmp_path / "o.png"), "--save-latent", str(z)]) == 0
        out = capsys.readouterr()
        return json.loads(out.out.strip().splitlines()[-1]), out.err, load_file(str(z))["latent"]

    info, err, lat = run()   # the file name picks the turbo preset: 4 steps, CFG 1, euler, and says so
    assert info["steps"] == 4
    assert ("note: preset sd3.5-large-turbo (4 steps, CFG 1, euler): the file name contains \"turbo\"; --preset NAME "
            "chooses another") in err
    model = load_model(turbo)
    p = GenerateParams(prompt="a red cat", width=32, height=32, steps=4, cfg=1.0, sampler="euler", seed=0,
                       inputs={"shift": 3.0})
    assert torch.equal(lat, generate(model, p).latents)
    # --preset sd3.5-large on the same file: dpmpp_2m and CFG 4.5; a flag given by hand (--steps 3) wins
    info, err, lat = run("--preset", "sd3.5-large", "--steps", "3")
    assert info["steps"] == 3 and "note: preset" not in err
    want = generate(model, GenerateParams(prompt="a red cat", width=32, height=32, steps=3, cfg=4.5,
                                          sampler="dpmpp_2m", seed=0, inputs={"shift": 3.0})).latents
    assert torch.equal(lat, want) and not torch.equal(want, generate(model, GenerateParams(
        prompt="a red cat", width=32, height=32, steps=3, cfg=4.5, sampler="euler", seed=0)).latents)
    assert main([*base, "--preset", "nope", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --preset nope: no such preset; known: demo, ")


def test_tab_preset_picker_sliders_and_preselection(models) -> None:
    demo = app.build_app(models, device="cpu", dtype="float32", cache=ModelCache(), demo_path=None)
    ctx = demo.sd_context
    by_id = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    assert by_id["sd3-width"].step == by_id["sd3-height"].step == 16
    assert by_id["sd1-width"].step == 8 and "sd1-preset" not in by_id
    assert [v for _, v in by_id["sd3-preset"].choices] == ["sd3", "sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium"]

    up = app.preset_updates(ctx, "sd3.5_large_turbo.safetensors", tab="sd3")
    assert (up["preset"], up["steps"], up["cfg"], up["sampler"], up["shift"]) == ("sd3.5-large-turbo", 4, 1.0,
                                                                                  "Euler", 3.0)
    assert "**Preset: SD3.5 large turbo** (4 steps, CFG 1, euler), because the file name contains \"turbo\"" \
        in up["facts"]
    up = app.preset_updates(ctx, "sd3.5_large.safetensors", tab="sd3")
    assert (up["preset"], up["steps"], up["cfg"], up["sampler"]) == ("sd3.5-large", 40, 4.5, "DPM++ 2M")
    assert "Preset:" not in up["facts"]
    # an API call leaving steps / CFG / sampler out gets the file's preset
    filled = app.fill_defaults(ctx, "sd3", {"checkpoint": "sd3.5_large_turbo.safetensors", "steps": None,
                                            "cfg": None, "sampler": None, "schedule": None, "width": None,
                                            "height": None})
    assert (filled["steps"], filled["cfg"], filled["sampler"]) == (4, 1.0, "Euler")
    # picking a preset in the dropdown fills its values
    pick = next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "fill_from_preset")
    got = pick("sd3.5-medium")
    assert got[:4] == [50, 5.0, "Euler", "Normal"] and got[4:6] == [1024, 1024] and got[6] == 3.0
