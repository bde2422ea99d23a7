"""Inpainting: the pure image helpers of sd/inpaint.py (A1111's mask blur, "only masked" crop box, masked content
fill, paste back), the pipeline's pinned conventions for 9-channel models, and the CLI's --init-image/--mask with
its one-line errors (nothing written on error)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sd.__main__ import main
from sd.families.common import vae_posterior_sample
from sd.inpaint import (blur_mask, check_mask, crop_to, fill_masked, image_to_tensor, load_image, mask_to_tensor,
                        masked_crop_box, paste_back)
from sd.pipeline import GenerateParams, generate, load_model, seed_generator


def gray(a) -> Image.Image:
    return Image.fromarray(np.asarray(a, dtype=np.uint8))


# ------------------------------------------------------------------------------------------- pure functions


def test_pixel_and_mask_conversion() -> None:
    img = Image.fromarray(np.array([[[0, 255, 51]]], np.uint8))
    assert image_to_tensor(img).flatten().tolist() == pytest.approx([-1.0, 1.0, 51 / 127.5 - 1])
    m = mask_to_tensor(gray([[0, 127, 128, 255]]))
    assert m.shape == (1, 1, 1, 4) and m.flatten().tolist() == [0, 0, 1, 1]   # 127/255 < 0.5 <= 128/255
    assert mask_to_tensor(Image.new("RGB", (2, 1), (255, 255, 255))).flatten().tolist() == [1, 1]  # mode L first


def test_check_mask_and_load_image(tmp_path) -> None:
    img = Image.new("RGB", (8, 6))
    with pytest.raises(ValueError, match="the mask is 8x5 but the image is 8x6; give a mask of the image's size"):
        check_mask(img, Image.new("L", (8, 5), 255))
    with pytest.raises(ValueError, match="all black"):
        check_mask(img, Image.new("L", (8, 6), 127))   # grey below one half repaints nothing
    check_mask(img, Image.new("L", (8, 6), 128))
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="mask '.*notes.txt' is not an image"):
        load_image(tmp_path / "notes.txt", "mask")
    with pytest.raises(ValueError, match="no such file"):
        load_image(tmp_path / "missing.png", "mask")
    with pytest.raises(ValueError, match="must be an image"):
        load_image(3, "mask")
    assert load_image(np.zeros((2, 3), np.uint8)).size == (3, 2)


def test_blur_mask() -> None:
    m = np.zeros((21, 21), np.uint8)
    m[10, 10] = 255
    assert np.array_equal(np.asarray(blur_mask(gray(m), 0)), m)
    b = np.asarray(blur_mask(gray(m), 2)).astype(int)
    assert b[10, 10] < 255 and b[10, 12] > 0 and b[10, 8] == b[10, 12] == b[8, 10]   # spread, symmetric
    assert b[10, 10] > b[10, 11] > b[10, 12] > b[10, 14]                               # falling off
    assert abs(b.sum() - 255) < 40                                                      # mass kept (8-bit rounding)


def test_masked_crop_box() -> None:
    m = np.zeros((80, 100), np.uint8)
    m[10:16, 20:31] = 255                     # bbox (20, 10, 31, 16)
    # + padding 4 -> (16, 6, 35, 20): 19 x 14, wider than 1:1 -> height grown by 5 (2 above, 3 below)
    assert masked_crop_box(gray(m), 64, 64, padding=4) == (16, 4, 35, 23)
    # 2:1 output: the same box is too tall -> width grown to 28: 9 // 2 = 4 left, 5 right
    assert masked_crop_box(gray(m), 128, 64, padding=4) == (12, 6, 40, 20)
    # at the bottom edge the grown box is shifted back inside the image
    e = np.zeros((80, 100), np.uint8)
    e[74:80, 40:70] = 255                     # bbox (40, 74, 70, 80) -> padded (38, 72, 72, 80): 34 x 8
    box = masked_crop_box(gray(e), 64, 64, padding=2)
    assert box == (38, 46, 72, 80) and box[3] - box[1] == box[2] - box[0]
    with pytest.raises(ValueError, match="all black"):
        masked_crop_box(gray(np.zeros((4, 4))), 8, 8)
    crop = crop_to(Image.new("RGB", (100, 80), (9, 8, 7)), (16, 4, 35, 23), 64, 64)
    assert crop.size == (64, 64) and crop.getpixel((5, 5)) == (9, 8, 7)


def test_fill_and_paste_back() -> None:
    a = np.zeros((32, 32, 3), np.uint8)
    a[:, :16] = (200, 20, 20)
    a[:, 16:] = (20, 20, 200)
    m = np.zeros((32, 32), np.uint8)
    m[10:20, 2:10] = 255                       # a hole in the red half
    filled = np.asarray(fill_masked(Image.fromarray(a), gray(m))).astype(int)
    assert np.array_equal(filled[m == 0], a[m == 0])                     # outside: unchanged
    hole = filled[m == 255]
    assert (hole[:, 0] > 120).all() and (hole[:, 0] > hole[:, 2] + 60).all()   # inside: reddish, from around
    result = Image.new("RGB", (32, 32), (0, 255, 0))
    out = np.asarray(paste_back(Image.fromarray(a), result, gray(m)))
    assert np.array_equal(out[m == 0], a[m == 0]) and (out[m == 255] == (0, 255, 0)).all()
    half = np.asarray(paste_back(Image.fromarray(a), result, gray(np.full((32, 32), 128, np.uint8))))
    assert abs(int(half[0, 0, 1]) - (255 * 128 + 20 * 127) // 255) <= 1    # blurred mask = alpha blend
    # through a crop box: the 8 x 8 result is resized into the box, the rest stays the original
    boxed = np.asarray(paste_back(Image.fromarray(a), Image.new("RGB", (8, 8), (0, 255, 0)), gray(m), (2, 10, 10, 20)))
    assert np.array_equal(boxed[m == 0], a[m == 0]) and (boxed[m == 255] == (0, 255, 0)).all()


# ------------------------------------------------------------------------------------------- the pipeline


def pictures(w=64, h=48):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    m = np.zeros((h, w), np.uint8)
    m[8:32, 16:48] = 255
    return image, gray(m)


@pytest.fixture(scope="module")
def sd1_inpaint(tiny_files):
    return load_model(tiny_files("sd1_inpaint"))


@torch.no_grad()
def test_inpaint_conventions(sd1_inpaint) -> None:
    """concat = [nearest mask latent, posterior sample of image * (m < 0.5)], the same in both branches; the posterior
    sample is the first draw of the image's generator, the starting noise its second; image i of a batch has seed
    s + i, so its own posterior sample and noise."""
    model, (image, mask) = sd1_inpaint, pictures()
    p = GenerateParams(prompt="a cat", negative_prompt="", width=64, height=48, steps=3, cfg=4.0, seed=21,
                       batch_size=2, sampler="euler", inputs={"image": image, "mask": mask})
    cond, uncond = model.family.condition(model.parts, model.spec, p, seed_generator(21))
    assert set(cond) == set(uncond) == {"crossattn", "concat"}
    assert cond["concat"].shape == (2, 5, 6, 8) and torch.equal(cond["concat"], uncond["concat"])
    assert torch.equal(cond["concat"][0], cond["concat"][1])
    m = mask_to_tensor(mask)
    assert torch.equal(cond["concat"][:1, :1], F.interpolate(m, size=(6, 8)))
    g = seed_generator(21)
    z = vae_posterior_sample(model.parts.vae, image_to_tensor(image) * (m < 0.5), model.spec.latent, g)
    assert torch.allclose(cond["concat"][:1, 1:], z, atol=1e-6, rtol=0)
    mean = model.parts.vae.encode(image_to_tensor(image) * (m < 0.5)) * model.spec.latent.scale
    assert (z - mean).abs().max() > 1e-3, "a sample, not the mean"
    # the starting noise is the second draw of the same generator; image 1 draws both from seed 22
    g2 = seed_generator(22)
    z2 = vae_posterior_sample(model.parts.vae, image_to_tensor(image) * (m < 0.5), model.spec.latent, g2)
    noise = torch.cat([torch.randn((1, 4, 6, 8), generator=g, dtype=torch.float32),
                       torch.randn((1, 4, 6, 8), generator=g2, dtype=torch.float32)])
    a = generate(model, p).latents
    b = generate(model, GenerateParams(**{**p.__dict__, "initial_latent": noise})).latents
    assert torch.equal(a, b)
    one = generate(model, GenerateParams(**{**p.__dict__, "seed": 22, "batch_size": 1})).latents  # image 1 alone
    assert (a[1:] - one).abs().max() < 1e-4 and (a[0] - a[1]).abs().max() > 1e-2 and not torch.equal(z2, z)
    # the img2img field fills the family's image input: the same request written the app's way
    c = generate(model, GenerateParams(**{**p.__dict__, "init_image": image, "inputs": {"mask": mask}})).latents
    assert torch.equal(a, c)
    # the output is the decoded latent as is: no paste-back of the original outside the mask
    out = np.asarray(generate(model, GenerateParams(**{**p.__dict__, "batch_size": 1})).images[0]).astype(int)
    assert np.abs(out - np.asarray(image).astype(int))[np.asarray(mask) == 0].mean() > 5


def test_inpaint_requests_refused(sd1_inpaint) -> None:
    image, mask = pictures()
    base = dict(prompt="x", width=64, height=48, steps=2)
    for inputs, msg in [({"image": image}, "needs the input 'mask'"),
                        ({"image": image, "mask": mask.resize((32, 24))}, "the mask is 32x24 but the image is 64x48"),
                        ({"image": image, "mask": Image.new("L", (64, 48))}, "all black"),
                        ({"image": image, "mask": mask, "hint": 1}, "does not take 'hint'")]:
        with pytest.raises(ValueError, match=msg):
            generate(sd1_inpaint, GenerateParams(**base, inputs=inputs))
    with pytest.raises(ValueError, match="set width and height to 64x48"):
        generate(sd1_inpaint, GenerateParams(**{**base, "width": 64, "height": 64}, inputs={"image": image, "mask": mask}))


# ------------------------------------------------------------------------------------------- the CLI


def run_sd(capsys, *args: str) -> subprocess.CompletedProcess:
    code = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


@pytest.mark.parametrize("name", ["sd2_inpaint", "sdxl_inpaint"])
def test_cli_inpaint(tiny_files, tmp_path: Path, capsys, name: str) -> None:
    path = tiny_files(name)
    r = run_sd(capsys, "inspect", str(path))
    assert r.returncode == 0 and json.loads(r.stdout)["unsupported"] == []   # the mask input is no longer listed
    image, mask = pictures()
    image.save(tmp_path / "img.png")
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out" / "img.png"
    r = run_sd(capsys, "generate", "--checkpoint", str(path), "--prompt", "a cat", "--init-image",
               str(tmp_path / "img.png"), "--mask", str(tmp_path / "mask.png"), "--steps", "3", "--seed", "5",
               "--save-latent", str(tmp_path / "z.safetensors"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["family"] == name.replace("_", "-")
    assert Image.open(out).size == (64, 48)                                   # the image's own size
    from safetensors.torch import load_file

    model = load_model(path)
    ref = generate(model, GenerateParams(prompt="a cat", width=64, height=48, steps=3, seed=5,
                                         inputs={"image": image, "mask": mask})).latents
    assert torch.equal(load_file(str(tmp_path / "z.safetensors"))["latent"], ref)


def test_cli_bad_inputs(tiny_files, tmp_path: Path, capsys) -> None:
    path = tiny_files("sd2_inpaint")
    image, mask = pictures()
    image.save(tmp_path / "img.png")
    mask.resize((64, 40)).save(tmp_path / "small.png")
    Image.new("L", (64, 48)).save(tmp_path / "black.png")
    (tmp_path / "notes.txt").write_text("hello")
    mask.save(tmp_path / "mask.png")
    outdir = tmp_path / "outputs"
    common = ["generate", "--checkpoint", str(path), "--prompt", "x", "--steps", "2", "--init-image",
              str(tmp_path / "img.png"), "--out", str(outdir / "o.png")]
    for extra, words in [(["--mask", str(tmp_path / "small.png")], "the mask is 64x40 but the image is 64x48"),
                         (["--mask", str(tmp_path / "black.png")], "the mask is all black"),
                         (["--mask", str(tmp_path / "notes.txt")], "notes.txt' is not an image"),
                         ([], "needs the input 'mask'"),
                         (["--mask", str(tmp_path / "mask.png"), "--width", "64", "--height", "64"],
                          "--width/--height 64x64 differ from the --init-image image's size 64x48")]:
        r = run_sd(capsys, *common, *extra)
        assert r.returncode == 2, (extra, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: ") and words in r.stderr
    assert not outdir.exists()
    # a mask for a model without a mask input
    r = run_sd(capsys, "generate", "--checkpoint", str(tiny_files("sd1")), "--prompt", "x", "--mask",
               str(tmp_path / "mask.png"), "--out", str(outdir / "o.png"))
    assert r.returncode == 2 and "--mask: a sd1 checkpoint takes no mask" in r.stderr and not outdir.exists()
