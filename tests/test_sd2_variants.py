"""The SD 2 variants (issue 10) through the engine, the CLI and the app, on tiny checkpoints in the released layouts.

x4 upscaler: key accounting with nothing unsupported, its numbers (f4, 0.08333, v, the x4 betas read from the file),
the low-res augmentation formula restated from the reference (ImageConcatWithNoiseAugmentation.q_sample), the
tiled UNet (one tile = the untiled network bit for bit; two tiles blended by their ramps; a tiled generation close
to the untiled one by a stated bound), one-line errors (size, noise level, tiling off), infotext, the CLI, and the
app's /generate_upscale endpoint through gradio_client. Parity with diffusers is in test_parity_sd2_variants.py.
"""
from __future__ import annotations

import json
from dataclasses import replace
import math
import os
import threading

import numpy as np
import pytest
import torch

import app
from sd.__main__ import main
from sd.checkpoint import open_checkpoint
from sd.denoiser import sgm_net
from sd.families.sd2 import depth_map_tensor, ldm_abar, noise_low_res
from sd.inpaint import image_to_tensor
from sd.loader import account_keys
from sd.pipeline import GenerateParams, ModelCache, generate, load_model, tile_ramp, tile_starts, tiled_net
from sd.pnginfo import build_parameters, parse_parameters, to_settings

from .serving import serving
from .test_parity_sd2_variants import depth_picture, picture


@pytest.fixture(scope="module")
def x4(tiny_files):
    return load_model(tiny_files("sd2_x4_upscaler"))


def x4_params(**kw) -> GenerateParams:
    base = dict(prompt="a cat", negative_prompt="", width=64, height=48, steps=3, cfg=5.0, seed=3, sampler="euler",
                schedule="normal", inputs={"image": picture(16, 12)})
    return GenerateParams(**{**base, **kw})


def test_x4_layout_numbers_and_schedule(tiny_files, x4) -> None:
    ckpt = open_checkpoint(tiny_files("sd2_x4_upscaler"))
    rep = account_keys(ckpt.shapes(), x4.spec)
    assert rep.unsupported == [] and rep.unexpected == [] and rep.missing == []
    assert sum(1 for k in rep.ignored if k.startswith("low_scale_model.")) == 8
    spec = x4.spec
    assert (spec.family, spec.prediction, spec.latent.factor, spec.latent.scale) == ("sd2-x4-upscaler", "v", 4, 0.08333)
    assert spec.unet.num_classes == 1000 and spec.unet.disable_self_attn == (False, True, True, False)
    assert x4.parts.extras["low_res_abar_source"] == "the file's low_scale_model.betas"
    abar = x4.parts.extras["low_res_abar"]
    assert abar.dtype == torch.float64 and abs(abar[20].item() - ldm_abar(0.0001, 0.02, 1000)[20].item()) < 1e-7
    # LDM "linear" 1e-4..2e-2 (betas = linspace(sqrt 1e-4, sqrt 2e-2)**2) at the highest noise level, restated
    ref = float(np.prod(1 - np.linspace(0.01, math.sqrt(0.02), 1000)[:350] ** 2))
    assert abs(abar[349].item() - ref) < 1e-6 and 0.6 < ref < 0.7
    # the training sigmas are the x4 schedule's too (from the file's betas), not SD's 0.00085..0.012
    assert abs(x4.sigmas[-1].item() - math.sqrt((1 - abar[-1].item()) / abar[-1].item())) < 1e-3 * x4.sigmas[-1].item()


def test_low_res_augmentation_is_the_reference_q_sample() -> None:
    x = image_to_tensor(picture(16, 12))
    abar = ldm_abar(0.0001, 0.02, 1000)
    g = torch.Generator("cpu").manual_seed(5)
    aug = noise_low_res(x, 100, abar, g)
    n = torch.randn((1, 3, 12, 16), generator=torch.Generator("cpu").manual_seed(5), dtype=torch.float32)
    # q_sample: extract_into_tensor(sqrt_alphas_cumprod, t) * x + extract(sqrt_one_minus_alphas_cumprod, t) * noise
    ref = math.sqrt(abar[100].item()) * x + math.sqrt(1 - abar[100].item()) * n
    assert (aug - ref).abs().max().item() < 1e-6
    assert (aug - x).abs().mean().item() > 0.05   # the noise is there at level 100


def test_tile_starts_and_ramps() -> None:
    assert tile_starts(12, 16, 4) == [0]
    starts = tile_starts(40, 16, 4)
    assert starts[0] == 0 and starts[-1] == 24 and len(starts) == 3
    assert all(b - a <= 16 - 4 for a, b in zip(starts, starts[1:]))          # every overlap >= 4
    a, b = tile_ramp(16, 0, 4), tile_ramp(16, 4, 0)
    assert torch.allclose(a[-4:] + b[:4], torch.ones(4)) and a[0] == 1 and b[-1] == 1 and 0 < a[-1] < 0.25


@torch.no_grad()
def test_tiled_unet_one_tile_is_untiled_and_seams_are_blended(x4) -> None:
    g = torch.Generator().manual_seed(0)
    net = sgm_net(x4.parts.unet)
    x = torch.randn(1, 4, 12, 40, generator=g)
    concat = torch.randn(1, 3, 12, 40, generator=g)
    ctx = torch.randn(1, 77, 64, generator=g)
    t, y = torch.tensor([500.0]), torch.tensor([20])
    whole = net(x[..., :16], t, crossattn=ctx, vector=y, concat=concat[..., :16])
    one = tiled_net(net, 16, 4)(x[..., :16], t, crossattn=ctx, vector=y, concat=concat[..., :16])
    assert torch.equal(one, whole)                       # one tile covering the latent: the untiled network
    tiled = tiled_net(net, 16, 4)(x, t, crossattn=ctx, vector=y, concat=concat)     # tiles at 0, 12, 24
    parts = [net(x[..., s:s + 16], t, crossattn=ctx, vector=y, concat=concat[..., s:s + 16]) for s in (0, 12, 24)]
    assert torch.allclose(tiled[..., :12], parts[0][..., :12], atol=1e-6)          # one tile only: its output
    assert torch.allclose(tiled[..., 16:24], parts[1][..., 4:12], atol=1e-6)
    w = tile_ramp(16, 4, 4)[:4]                                                     # the seam 12..16: blended
    mix = parts[0][..., 12:16] * w.flip(0) + parts[1][..., :4] * w
    assert torch.allclose(tiled[..., 12:16], mix, atol=1e-5)
    assert (parts[0][..., 12:16] - parts[1][..., :4]).abs().max() > 1e-3          # the two tiles did disagree


@torch.no_grad()
def test_tiled_upscale_close_to_untiled(x4) -> None:
    low = picture(40, 12)
    whole = generate(x4, x4_params(width=160, height=48, inputs={"image": low})).latents
    tiled = generate(x4, x4_params(width=160, height=48, inputs={"image": low}, tile=16)).latents
    err = ((tiled - whole).abs().max() / whole.abs().max()).item()
    print(f"tiled vs untiled x4: max diff {err:.3f} of the largest magnitude")
    assert 1e-4 < err < 0.1                 # tiled for real, and within 10% (measured 0.03 at these settings)
    same = generate(x4, x4_params(width=160, height=48, inputs={"image": low}, tile=64)).latents
    assert torch.equal(same, whole)         # a tile covering the latent: the untiled run


@pytest.mark.parametrize("kw,match", [
    (dict(width=128, height=96), "the image is 16x12, so the output is 64x48, but the request is 128x96"),
    (dict(inputs={"image": picture(16, 12), "noise_level": 351}), "noise_level must be between 0 and 350"),
    (dict(inputs={"image": picture(16, 12), "noise_level": 2.5}), "noise_level must be a whole number"),
    (dict(width=2080, height=32, inputs={"image": picture(520, 8)}, tile=0), "over the 512 px tile limit"),
])
def test_x4_bad_input_one_line_errors(x4, kw, match) -> None:
    with pytest.raises(ValueError, match=match) as e:
        generate(x4, x4_params(**kw))
    assert "\n" not in str(e.value)


def test_x4_infotext_round_trip() -> None:
    text = build_parameters(prompt="a cat", negative_prompt="", steps=3, sampler="euler", schedule="normal", cfg=5,
                            seed=3, width=64, height=48, model_name="x4", model_hash=None, family="sd2-x4-upscaler",
                            inputs={"image": picture(16, 12), "noise_level": 40.0})
    assert "Noise level: 40" in text
    assert to_settings(parse_parameters(text))["noise_level"] == 40


def test_x4_cli(tiny_files, tmp_path, capsys) -> None:
    path = str(tiny_files("sd2_x4_upscaler"))
    picture(16, 12).save(tmp_path / "low.png")
    out = tmp_path / "up.png"
    code = main(["generate", "--checkpoint", path, "--prompt", "a cat", "--init-image", str(tmp_path / "low.png"),
                 "--noise-level", "30", "--steps", "2", "--out", str(out)])
    assert code == 0
    from PIL import Image

    assert Image.open(out).size == (64, 48)
    assert json.loads(capsys.readouterr().out)["family"] == "sd2-x4-upscaler"
    bad = tmp_path / "bad.png"
    code = main(["generate", "--checkpoint", path, "--prompt", "a cat", "--init-image", str(tmp_path / "low.png"),
                 "--width", "32", "--out", str(bad)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not bad.exists() and err.count("\n") == 0 and "4x the --init-image image's size 64x48" in err
    code = main(["generate", "--checkpoint", path, "--prompt", "a cat", "--init-image", str(tmp_path / "low.png"),
                 "--noise-level", "400", "--out", str(bad)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not bad.exists() and "noise_level must be between 0 and 350" in err
    code = main(["inspect", path])
    assert code == 0 and json.loads(capsys.readouterr().out)["unsupported"] == []


@pytest.fixture(scope="module")
def world(tiny_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("variants-app")
    models, outputs = root / "models", root / "outputs"
    models.mkdir()
    os.symlink(tiny_files("sd2_x4_upscaler"), models / "x4.safetensors")
    os.symlink(tiny_files("sd2_depth"), models / "depth.safetensors")
    os.symlink(tiny_files("sd21_unclip_h"), models / "unclip-h.safetensors")
    picture(16, 16).save(root / "low.png")
    picture(64, 64).save(root / "photo.png")
    depth_picture(40, 30).save(root / "depth.png")
    demo = app.build_app(models, device="cpu", dtype="float32", cache=ModelCache(), outputs_dir=outputs)
    from gradio_client import Client

    with serving(demo, outputs) as url:
        yield dict(root=root, outputs=outputs, demo=demo, client=Client(url, verbose=False))


def test_upscale_tab_is_built_from_the_family(world) -> None:
    names = app.tab_inputs("upscale")
    i = names.index("image")    # the family's inputs in order (app-wide extras such as inspect follow)
    assert names[i:i + 2] == ("image", "noise_level") and "init_image" not in names
    comps = {c.get("props", {}).get("elem_id"): c for c in world["demo"].config["components"]}
    assert comps["upscale-image"]["type"] == "image"
    assert comps["upscale-noise-level"]["props"]["maximum"] == 350


def test_upscale_endpoint(world, x4) -> None:
    from gradio_client import handle_file
    from PIL import Image

    images, _, status, infotext, seed, _ = world["client"].predict(
        checkpoint="x4.safetensors", prompt="a cat", steps=2, seed=5, width=64, height=64, sampler="Euler",
        schedule="Normal", cfg=5, image=handle_file(str(world["root"] / "low.png")), noise_level=30,
        api_name="/generate_upscale")
    out = Image.open(images[0]["image"])
    assert out.size == (64, 64) and seed == 5 and status.startswith("done: 1 image(s), 2 steps")
    ref = generate(x4, x4_params(steps=2, seed=5, height=64, inputs={"image": Image.open(world["root"] / "low.png"),
                                                          "noise_level": 30}))
    assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(ref.images[0]))
    s = to_settings(parse_parameters(infotext))
    assert s["model"] == "x4" and (s["width"], s["height"]) == (64, 64)
    assert s.get("noise_level") == 30, (
        "app.py must pass the family inputs to the infotext: in run_request's build_parameters(...) call add "
        "`inputs=inputs,` (sd.pnginfo.build_parameters hands them to Family.infotext, which writes 'Noise level')")


def test_upscale_bad_size_is_refused_and_nothing_is_written(world) -> None:
    before = set(world["outputs"].rglob("*.png")) if world["outputs"].exists() else set()
    with pytest.raises(ValueError, match="so the output is 64x48, but the request is 64x64") as e:
        app.run_request(world["demo"].sd_context, "upscale",
                        dict(checkpoint="x4.safetensors", prompt="", negative_prompt="", sampler="Euler",
                             schedule="Normal", steps=2, cfg=5, seed=1, width=64, height=64, batch_size=1,
                             batch_count=1, image=picture(16, 12), noise_level=20),
                        threading.Event(), lambda *a: None)
    assert "\n" not in str(e.value)
    after = set(world["outputs"].rglob("*.png")) if world["outputs"].exists() else set()
    assert after == before


# ------------------------------------------------------------------------------------------- depth-to-image


@pytest.fixture(scope="module")
def depth(tiny_files):
    return load_model(tiny_files("sd2_depth"))


def depth_params(**kw) -> GenerateParams:
    base = dict(prompt="a house", negative_prompt="", width=64, height=48, steps=4, cfg=5.0, seed=3,
                sampler="euler", schedule="normal", inputs={"image": picture(64, 48), "depth_map": depth_picture(40, 30)})
    return GenerateParams(**{**base, **kw})


def test_depth_map_is_resized_and_normalised_like_the_reference() -> None:
    import torch.nn.functional as F

    m = depth_picture(40, 30)
    t = depth_map_tensor(m, (6, 8))
    d = torch.tensor(np.asarray(m, dtype=np.float32) / 255)[None, None]
    r = F.interpolate(d, size=(6, 8), mode="bicubic", align_corners=False)
    ref = 2 * (r - r.min()) / (r.max() - r.min()) - 1
    assert t.shape == (1, 1, 6, 8) and (t - ref).abs().max().item() < 1e-6
    assert t.min().item() == -1 and t.max().item() == 1
    assert t[0, 0, 2, 3] > t[0, 0, 5, 0]          # the near square (white) stays larger than the far ramp end


@torch.no_grad()
def test_depth_strength_truncates_the_schedule(depth) -> None:
    full = generate(depth, depth_params(inputs={**depth_params().inputs, "strength": 1.0}))
    part = generate(depth, depth_params(inputs={**depth_params().inputs, "strength": 0.5}))
    none = generate(depth, depth_params(inputs={**depth_params().inputs, "strength": 0.0}))
    assert (full.steps_done, part.steps_done, none.steps_done) == (4, 2, 0)
    # strength 0: the init image's posterior sample comes back (the first draw of the seed's generator)
    from sd.families.common import vae_posterior_sample

    z0 = vae_posterior_sample(depth.parts.vae, image_to_tensor(picture(64, 48)), depth.spec.latent,
                              torch.Generator("cpu").manual_seed(3))
    assert torch.allclose(none.latents, z0, atol=1e-6)
    assert (part.latents - z0).abs().max() > 1e-2


@pytest.mark.parametrize("inputs,match", [
    (dict(depth_map="/nonexistent/depth.png"), "depth_map '/nonexistent/depth.png': no such file"),
    (dict(depth_map=__file__), "is not an image"),
    (dict(strength=1.5), "strength must be between 0 and 1"),
])
def test_depth_bad_input_one_line_errors(depth, inputs, match) -> None:
    given = {**depth_params().inputs, **inputs}
    with pytest.raises(ValueError, match=match) as e:
        generate(depth, depth_params(inputs={k: v for k, v in given.items() if v is not None}))
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def depth_pruned(tmp_path_factory):
    """The tiny sd2-depth file without its estimator (depth_model.* left out, as pruned re-saves do)."""
    from safetensors.torch import save_file

    from .tiny import tiny_state_dict

    path = tmp_path_factory.mktemp("depth-pruned") / "depth-pruned.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_state_dict("sd2_depth").items()
               if not k.startswith("depth_model.")}, str(path))
    return path


def test_depth_without_estimator_needs_a_map(depth_pruned) -> None:
    model = load_model(depth_pruned)
    assert "midas" not in dict(model.spec.extra) and "midas" not in model.parts.extras
    with pytest.raises(ValueError, match=r"has no depth estimator \(depth_model\.\*\): give a depth map") as e:
        generate(model, depth_params(inputs={"image": picture(64, 48)}))
    assert "\n" not in str(e.value)
    res = generate(model, depth_params(steps=2))      # with a map it runs
    assert res.info["shown"][0][0] == "depth map used (given)"


@torch.no_grad()
def test_depth_map_shown_with_the_result(depth) -> None:
    """The map a request used comes back in info["shown"]: a given one resized to the output (bicubic) and
    stretched to 0..255; an estimated one (MiDaS on the init image) likewise, and it changes the result."""
    import torch.nn.functional as F
    from PIL import Image

    given = generate(depth, depth_params(steps=2))
    (what, shown), = given.info["shown"]
    d = torch.tensor(np.asarray(depth_picture(40, 30), dtype=np.float32) / 255)[None, None]
    r = F.interpolate(d, size=(48, 64), mode="bicubic", align_corners=False)[0, 0]
    ref = torch.round((r - r.min()) / (r.max() - r.min()) * 255)
    assert what == "depth map used (given)" and shown.size == (64, 48) and shown.mode == "L"
    assert np.array_equal(np.asarray(shown), ref.to(torch.uint8).numpy())
    est = generate(depth, depth_params(steps=2, inputs={"image": picture(64, 48)}))
    (what, shown), = est.info["shown"]
    arr = np.asarray(shown)
    assert what == "depth map used (MiDaS estimate)" and shown.size == (64, 48) and len(np.unique(arr)) > 16
    assert (arr.min(), arr.max()) == (0, 255)
    # the estimate given back as the map (its mode F image) is the same request
    from sd.families.sd2 import depth_values  # noqa: F401  (the estimate's values are taken as they are)
    from sd.midas import estimate_depth

    m = estimate_depth(depth.parts.extras["midas"], image_to_tensor(picture(64, 48)))[0]
    again = generate(depth, depth_params(steps=2, inputs={"image": picture(64, 48),
                                                          "depth_map": Image.fromarray(m.numpy())}))
    assert torch.equal(again.latents, est.latents) and (est.latents - given.latents).abs().max() > 1e-3
    # a caller of the conditioner itself (the checkpoint card) without a map gets the estimate too
    from sd.pipeline import request_inputs, seed_generator

    def concat(inputs):
        p = depth_params(inputs=inputs)
        req = replace(p, inputs=request_inputs(depth.spec, p))
        return depth.family.condition(depth.parts, depth.spec, req, seed_generator(3))[0]["concat"]

    assert torch.equal(concat({"image": picture(64, 48)}), concat({"image": picture(64, 48),
                                                                  "depth_map": Image.fromarray(m.numpy())}))


def test_flat_depth_map_is_refused(depth) -> None:
    from PIL import Image

    flat = Image.new("L", (40, 30), 128)
    with pytest.raises(ValueError, match="one value everywhere"):
        generate(depth, depth_params(inputs={"image": picture(64, 48), "depth_map": flat}))


def test_depth_cli_and_infotext(tiny_files, tmp_path, capsys) -> None:
    path = str(tiny_files("sd2_depth"))
    picture(64, 48).save(tmp_path / "photo.png")
    depth_picture(40, 30).save(tmp_path / "depth.png")
    out = tmp_path / "d.png"
    code = main(["generate", "--checkpoint", path, "--prompt", "a house", "--init-image", str(tmp_path / "photo.png"),
                 "--depth-map", str(tmp_path / "depth.png"), "--strength", "0.5", "--steps", "4", "--out", str(out)])
    assert code == 0
    from PIL import Image

    assert Image.open(out).size == (64, 48)
    capsys.readouterr()
    est = tmp_path / "est.png"      # without --depth-map the file's MiDaS estimates it
    code = main(["generate", "--checkpoint", path, "--prompt", "a house", "--init-image", str(tmp_path / "photo.png"),
                 "--steps", "2", "--out", str(est)])
    assert code == 0 and Image.open(est).size == (64, 48)
    capsys.readouterr()
    code = main(["inspect", path])
    assert code == 0 and json.loads(capsys.readouterr().out)["unsupported"] == []
    # --strength means img2img for the other families still
    code = main(["generate", "--checkpoint", str(tiny_files("sd1")), "--prompt", "x", "--init-image",
                 str(tmp_path / "photo.png"), "--strength", "0.5", "--width", "64", "--height", "48", "--steps", "2",
                 "--out", str(tmp_path / "sd1.png")])
    assert code == 0
    text = build_parameters(prompt="a house", negative_prompt="", steps=4, sampler="euler", schedule="normal",
                            cfg=5, seed=3, width=64, height=48, model_name="depth", model_hash=None, family="sd2-depth",
                            inputs={"strength": 0.5})
    assert "Denoising strength: 0.5" in text and to_settings(parse_parameters(text))["strength"] == 0.5


def test_depth_endpoint(world, depth) -> None:
    from gradio_client import handle_file
    from PIL import Image

    names = app.tab_inputs("depth")
    i = names.index("image")
    assert names[i:i + 3] == ("image", "depth_map", "strength") and "init_image" not in names
    images, _, status, infotext, seed, _ = world["client"].predict(
        checkpoint="depth.safetensors", prompt="a house", steps=4, seed=5, width=64, height=64, sampler="Euler",
        schedule="Normal", cfg=5, image=handle_file(str(world["root"] / "photo.png")),
        depth_map=handle_file(str(world["root"] / "depth.png")), strength=0.5, api_name="/generate_depth")
    out = Image.open(images[0]["image"])
    assert out.size == (64, 64) and status.startswith("done: 1 image(s), 2 steps")
    ref = generate(depth, depth_params(steps=4, seed=5, height=64, inputs={
        "image": Image.open(world["root"] / "photo.png"), "depth_map": Image.open(world["root"] / "depth.png"),
        "strength": 0.5}))
    assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(ref.images[0]))
    # the depth map it used comes after the image (not counted in the status, not saved to outputs)
    assert len(images) == 2 and images[1]["caption"] == "depth map used (given)"
    assert np.array_equal(np.asarray(Image.open(images[1]["image"]).convert("L")), np.asarray(ref.info["shown"][0][1]))
    assert to_settings(parse_parameters(infotext)).get("strength") == 0.5, (
        "app.py must pass the family inputs to the infotext: in run_request's build_parameters(...) call add "
        "`inputs=inputs,` (Family.infotext then writes 'Denoising strength' for depth-to-image)")


# ------------------------------------------------------------------------------------------- unCLIP


@pytest.fixture(scope="module")
def unclip(tiny_files):
    return load_model(tiny_files("sd21_unclip_h"))


def unclip_params(**kw) -> GenerateParams:
    base = dict(prompt="a painting", negative_prompt="", width=64, height=48, steps=3, cfg=5.0, seed=3,
                sampler="euler", schedule="normal", inputs={"image": picture(100, 70), "noise_level": 100})
    return GenerateParams(**{**base, **kw})


def test_unclip_layout_and_parts(tiny_files, unclip) -> None:
    ckpt = open_checkpoint(tiny_files("sd21_unclip_h"))
    rep = account_keys(ckpt.shapes(), unclip.spec)
    assert rep.unsupported == [] and rep.unexpected == [] and rep.missing == []
    assert len(rep.loaded["image_encoder"]) == sum(1 for k in ckpt.shapes() if k.startswith("embedder.model.visual."))
    assert sum(1 for k in rep.ignored if k.startswith("noise_augmentor.")) == 8
    cfg = dict(unclip.spec.extra)["vision"]
    assert (cfg.layers, cfg.patch_size, cfg.image_size, cfg.output_dim) == (32, 14, 224, 64)   # released depth, tiny width
    assert unclip.parts.extras["embed_abar_source"] == "the file's noise_augmentor.betas"
    from sd.families.sd2 import squaredcos_abar

    abar = unclip.parts.extras["embed_abar"]
    # squaredcos_cap_v2 restated: abar_t = f(t) / f(0) with f(t) = cos((t/T + 0.008) / 1.008 * pi / 2)^2
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2   # noqa: E731
    assert abs(abar[499].item() - f(500) / f(0)) < 1e-6 and abs(squaredcos_abar()[499].item() - f(500) / f(0)) < 1e-9
    # the real file's numbers: ViT-H/14 from the released shapes
    from sd.clip_vision import vision_config
    from .tiny import reference_shapes

    real = vision_config(reference_shapes("sd21_unclip_h"), "embedder.model.visual.", 80, False)
    assert (real.width, real.layers, real.heads, real.mlp, real.output_dim) == (1280, 32, 16, 5120, 1024)
    # unCLIP-L (a layout derived from H's list): told apart by its 768-wide embedding; OpenAI's ViT-L/14 tower
    from sd.families import detect

    spec_l = detect(reference_shapes("sd21_unclip_l"))
    vl = dict(spec_l.extra)["vision"]
    assert spec_l.family == "sd2-unclip-l" and spec_l.unet.adm_in_channels == 1536
    assert (vl.width, vl.layers, vl.heads, vl.output_dim, vl.quick_gelu) == (1024, 24, 16, 768, True)


def test_clip_preprocess_restated() -> None:
    """Our kornia-style antialiased resize against a restatement with separable 1D blurs (kornia's
    gaussian_blur2d is separable: filter2d with the outer product of two normalised 1D kernels, reflect border)."""
    import torch.nn.functional as F

    from sd.clip_vision import CLIP_MEAN, CLIP_STD, antialiased_resize, clip_preprocess

    x = torch.rand(1, 3, 130, 300, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fy, fx = 130 / 224, 300 / 224                      # only the width shrinks: sigma_x = (300/224 - 1) / 2
    sx = (fx - 1) / 2
    k = int(max(4 * sx, 3)); k += 1 - k % 2            # 3
    t = torch.arange(k, dtype=torch.float32) - k // 2
    g = torch.exp(-t ** 2 / (2 * sx ** 2)); g = g / g.sum()
    sy = 0.001                                         # max((fy - 1) / 2, 0.001): a delta in y
    ky = torch.zeros(3); ky[1] = 1.0
    blurred = F.conv2d(F.pad(x, (k // 2, k // 2, 1, 1), mode="reflect").reshape(3, 1, 132, 300 + 2 * (k // 2)),
                       (ky[:, None] * g[None, :])[None, None]).reshape(1, 3, 130, 300)
    ref = F.interpolate(blurred, size=(224, 224), mode="bicubic", align_corners=True)
    assert fy < 1 and sy == 0.001
    assert (antialiased_resize(x, (224, 224)) - ref).abs().max().item() < 1e-5
    pre = clip_preprocess(x)
    assert pre.shape == (1, 3, 224, 224)
    assert abs(pre[0, 0, 0, 0].item() - ((ref[0, 0, 0, 0].item() + 1) / 2 - CLIP_MEAN[0]) / CLIP_STD[0]) < 1e-4
    # an upscale is plain bicubic (no blur)
    small = x[..., :100, :100]
    assert torch.allclose(antialiased_resize(small, (224, 224)),
                          F.interpolate(small, size=(224, 224), mode="bicubic", align_corners=True))


def test_unclip_image_is_shrunk_to_multiples_of_64() -> None:
    from PIL import Image

    from sd.families.sd2 import unclip_pixels

    img = picture(100, 70)
    x = unclip_pixels(img)
    assert x.shape == (1, 3, 64, 64)
    ref = image_to_tensor(img.resize((64, 64), resample=Image.LANCZOS))
    assert torch.equal(x, ref)
    assert unclip_pixels(picture(128, 64)).shape == (1, 3, 64, 128)


@torch.no_grad()
def test_unclip_any_output_size_and_noise_level(unclip) -> None:
    a = generate(unclip, unclip_params())
    b = generate(unclip, unclip_params(width=96, height=64))
    assert a.images[0].size == (64, 48) and b.images[0].size == (96, 64)
    c = generate(unclip, unclip_params(inputs={"image": picture(100, 70), "noise_level": 900}))
    assert ((c.latents - a.latents).abs().max() / a.latents.abs().max()).item() > 1e-3


@pytest.mark.parametrize("inputs,match", [
    (dict(image=picture(60, 100)), "the image is 60x100; unCLIP needs at least 64x64 pixels"),
    (dict(noise_level=1000), "noise_level must be between 0 and 999"),
    (dict(noise_level=3.5), "noise_level must be a whole number"),
    (dict(image=__file__), "is not an image"),
])
def test_unclip_bad_input_one_line_errors(unclip, inputs, match) -> None:
    with pytest.raises(ValueError, match=match) as e:
        generate(unclip, unclip_params(inputs={**unclip_params().inputs, **inputs}))
    assert "\n" not in str(e.value)


def test_unclip_cli(tiny_files, tmp_path, capsys) -> None:
    path = str(tiny_files("sd21_unclip_h"))
    picture(100, 70).save(tmp_path / "in.png")
    out = tmp_path / "v.png"
    code = main(["generate", "--checkpoint", path, "--prompt", "", "--init-image", str(tmp_path / "in.png"),
                 "--noise-level", "50", "--width", "64", "--height", "64", "--steps", "2", "--out", str(out)])
    assert code == 0
    from PIL import Image

    assert Image.open(out).size == (64, 64)
    capsys.readouterr()
    picture(40, 40).save(tmp_path / "tiny.png")
    code = main(["generate", "--checkpoint", path, "--prompt", "", "--init-image", str(tmp_path / "tiny.png"),
                 "--width", "64", "--height", "64", "--steps", "2", "--out", str(tmp_path / "bad.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not (tmp_path / "bad.png").exists() and "at least 64x64" in err and err.count("\n") == 0
    code = main(["inspect", path])
    assert code == 0 and json.loads(capsys.readouterr().out)["unsupported"] == []


def test_unclip_endpoint(world, unclip) -> None:
    from gradio_client import handle_file
    from PIL import Image

    names = app.tab_inputs("unclip")
    i = names.index("image")    # the family's inputs in order (app-wide extras such as inspect follow)
    assert names[i:i + 2] == ("image", "noise_level") and "init_image" not in names
    picture(100, 70).save(world["root"] / "vary.png")
    images, _, status, infotext, seed, _ = world["client"].predict(
        checkpoint="unclip-h.safetensors", prompt="", steps=2, seed=5, width=64, height=64, sampler="Euler",
        schedule="Normal", cfg=5, image=handle_file(str(world["root"] / "vary.png")), noise_level=100,
        api_name="/generate_unclip")
    out = Image.open(images[0]["image"])
    assert out.size == (64, 64) and status.startswith("done: 1 image(s), 2 steps")
    ref = generate(unclip, unclip_params(prompt="", steps=2, seed=5, width=64, height=64,
                                         inputs={"image": Image.open(world["root"] / "vary.png"), "noise_level": 100}))
    assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(ref.images[0]))
    assert to_settings(parse_parameters(infotext)).get("noise_level") == 100, (
        "app.py must pass the family inputs to the infotext: in run_request's build_parameters(...) call add "
        "`inputs=inputs,` (Family.infotext then writes 'Noise level')")
