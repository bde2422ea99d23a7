"""Hires fix (sd.hires, issue 12 item 4): A1111's target sizes and second-pass sigmas by their formulas, the output
size, pass 2 equal pixel for pixel to an explicit upscale + img2img run (image upscaler) and to the written-out
sampling of the upscaled latent (latent upscaler), the infotext round trip, a bad upscaler name in one line."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from sd.hires import Hires, generate_hires, infotext_fields, second_pass_sigmas, target_size
from sd.pipeline import GenerateParams, decode_latents, generate, guided_denoiser, load_model, seed_generator
from sd.pnginfo import build_parameters, parse_parameters, to_settings
from sd.samplers import sample
from sd.schedules import get_sigmas

from .test_cli import run_sd


@pytest.fixture(scope="module")
def sd1(tiny_files):
    return load_model(tiny_files("sd1"))


def base(**kw) -> GenerateParams:
    return GenerateParams(**{**dict(prompt="a red circle", negative_prompt="blurry", width=64, height=64, steps=3,
                                    cfg=5.0, seed=7, sampler="euler_ancestral"), **kw})


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(int)


def test_target_size_as_a1111():
    assert target_size(512, 512, Hires(scale=1.5)) == (768, 768, 0, 0)            # int(side * scale)
    assert target_size(512, 768, Hires(scale=1.3)) == (665, 998, 0, 0)
    assert target_size(512, 768, Hires(resize_x=1024)) == (1024, 1536, 0, 0)      # height from the aspect
    assert target_size(512, 768, Hires(resize_y=1024)) == (682, 1024, 0, 0)       # 1024 * 512 // 768
    # both given, another aspect: cover the box, the rest is cropped (A1111's truncate_x / truncate_y in pixels)
    assert target_size(512, 512, Hires(resize_x=1024, resize_y=768)) == (1024, 1024, 0, 256)
    assert target_size(512, 512, Hires(resize_x=768, resize_y=1024)) == (1024, 1024, 256, 0)


def test_second_pass_sigmas_are_a1111s_fixed_steps(sd1):
    # hires steps 10 at denoise 0.6: the schedule of int(10 / 0.6) = 16 steps, its last 10 (sigmas[6:])
    sig = second_pass_sigmas(sd1, base(steps=10), 10, 0.6)
    full = get_sigmas("normal", sd1.sigmas, 16)
    assert sig.shape == (11,) and torch.equal(sig, full[6:])
    # denoise 1: min(1, 0.999) -> int(4 / 0.999) = 4 steps, all of them
    assert torch.equal(second_pass_sigmas(sd1, base(), 4, 1.0), get_sigmas("normal", sd1.sigmas, 4))


def test_image_upscaler_pass_equals_upscale_plus_img2img(sd1):
    p = base()
    h = Hires(scale=2, steps=2, denoise=0.5, upscaler="Lanczos")
    res = generate_hires(sd1, p, h)
    assert [im.size for im in res.images] == [(128, 128)] and res.steps_done == 5
    first = generate(sd1, p)
    up = first.images[0].resize((128, 128), Image.LANCZOS)
    # the pipeline's img2img with 4 = int(2 / 0.5) steps runs its last 2 when the strength is 1.5 / 4
    ref = generate(sd1, replace(p, width=128, height=128, steps=4, init_image=up, strength=1.5 / 4))
    assert np.array_equal(arr(res.images[0]), arr(ref.images[0]))
    plain = generate(sd1, replace(p, width=128, height=128))
    assert np.abs(arr(res.images[0]) - arr(plain.images[0])).mean() > 1     # not a plain 128 px run


def test_latent_upscaler_pass_equals_the_written_out_sampling(sd1):
    p = base(sampler="euler")
    h = Hires(scale=2, steps=2, denoise=0.7, upscaler="Latent (nearest)")
    res = generate_hires(sd1, p, h)
    first = generate(sd1, p)
    z = first.latents.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)   # nearest x2 = each latent pixel 2x2
    q = replace(p, width=128, height=128, steps=2)
    g = seed_generator(p.seed)
    guided = guided_denoiser(sd1, q, generator=g)
    sig = get_sigmas("normal", sd1.sigmas, 2)          # int(2 / 0.7) = 2 steps: both run
    x = z + torch.randn(z.shape, generator=g) * sig[0]
    out = sample("euler", guided, x, sig, generator=torch.Generator().manual_seed(p.seed + 1))
    assert torch.equal(res.latents, out) and np.array_equal(arr(res.images[0]), arr(decode_latents(sd1, out)[0]))
    bilinear = generate_hires(sd1, p, replace(h, upscaler="Latent"))
    assert not torch.equal(bilinear.latents, res.latents)


def test_resize_with_crop_gives_the_box(sd1):
    res = generate_hires(sd1, base(steps=1), Hires(resize_x=128, resize_y=64, steps=1, denoise=0.5))
    assert res.images[0].size == (128, 64)


def test_infotext_round_trip():
    h = Hires(scale=1.5, steps=12, denoise=0.45, upscaler="Latent (bicubic antialiased)")
    fields = infotext_fields(h)
    assert fields == {"Denoising strength": "0.45", "Hires upscale": "1.5", "Hires steps": "12",
                      "Hires upscaler": "Latent (bicubic antialiased)"}
    text = build_parameters(prompt="a", negative_prompt="", steps=20, sampler="euler", schedule="normal", cfg=7,
                            seed=1, width=512, height=512, model_name="m", model_hash=None, extra_fields=fields)
    s = to_settings(parse_parameters(text))
    assert (s["hires"], s["hires_scale"], s["hires_steps"], s["hires_upscaler"], s["hires_denoise"]) == \
        (True, 1.5, 12, "Latent (bicubic antialiased)", 0.45)
    assert (s["width"], s["height"]) == (512, 512)                   # Size stays the first pass's
    resized = to_settings(parse_parameters(text.replace("Hires upscale: 1.5", "Hires resize: 1024x768")))
    assert (resized["hires_resize_x"], resized["hires_resize_y"]) == (1024, 768) and "hires_scale" not in resized
    assert "hires" not in to_settings(parse_parameters(text.replace(", Hires upscaler: Latent (bicubic antialiased)",
                                                                    "").replace("Hires upscale: 1.5, ", "")))


def test_bad_upscaler_is_one_line(tiny_files, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown hires upscaler 'Bogus'; choose one of Latent, "):
        Hires(upscaler="Bogus").check()
    with pytest.raises(ValueError, match=r"denoising strength must be in \(0, 1\]"):
        Hires(denoise=0).check()
    r = run_sd(capsys, "generate", "--checkpoint", str(tiny_files("sd1")), "--prompt", "a", "--width", "64",
               "--height", "64", "--steps", "1", "--hires-scale", "2", "--hires-upscaler", "Bogus",
               "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "unknown hires upscaler 'Bogus'" in r.stderr
    assert not (tmp_path / "x.png").exists()


def test_hires_on_the_cli(tiny_files, tmp_path, capsys):
    out = tmp_path / "h.png"
    r = run_sd(capsys, "generate", "--checkpoint", str(tiny_files("sd1")), "--prompt", "a red circle", "--width",
               "64", "--height", "64", "--steps", "2", "--seed", "3", "--hires-scale", "1.5", "--hires-steps", "1",
               "--hires-denoise", "0.5", "--hires-upscaler", "Nearest", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (96, 96)


def test_sd3_flow_model_hires_equals_upscale_plus_img2img(tmp_path):
    """SD3 (rectified flow, 16 px steps): the same identity, through the family's flow sigmas and its shift input."""
    from .tiny_sd3 import write_tiny_sd3, write_tiny_spiece

    path = write_tiny_sd3("sd3_medium", tmp_path / "sd3_medium_incl_clips_t5xxlfp16.safetensors")
    write_tiny_spiece(tmp_path / "spiece.model")
    model = load_model(path)
    p = base(width=32, height=32, steps=2, cfg=3.0, sampler="euler")
    res = generate_hires(model, p, Hires(scale=1.5, steps=1, denoise=0.5, upscaler="Lanczos"))
    assert res.images[0].size == (48, 48)
    up = generate(model, p).images[0].resize((48, 48), Image.LANCZOS)
    ref = generate(model, replace(p, width=48, height=48, steps=2, init_image=up, strength=0.25))
    assert np.array_equal(arr(res.images[0]), arr(ref.images[0]))


def test_hires_refuses_image_families_in_one_line(tiny_files):
    with pytest.raises(ValueError, match="hires fix is for text-to-image checkpoints; SD 1.x inpainting takes an image of its own"):
        generate_hires(load_model(tiny_files("sd1_inpaint")), base(), Hires())
    with pytest.raises(ValueError, match="hires fix is a text-to-image pass"):
        generate_hires(load_model(tiny_files("sd1")), base(init_image=Image.new("RGB", (64, 64))), Hires())
