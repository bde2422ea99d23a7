"""AUTOMATIC1111 `parameters` text: our text round-trips, A1111's own texts parse, PNGs never overwrite."""
from __future__ import annotations

import threading

from PIL import Image

from sd.pnginfo import build_parameters, guess_tab, parse_parameters, quote, read_parameters, save_png, to_settings

BASE = dict(prompt="a cat, sitting", negative_prompt="blurry", steps=20, sampler="euler_ancestral", schedule="karras",
            cfg=7.0, seed=1, width=512, height=512, model_name="v1-5-pruned-emaonly", model_hash="6ce0161689")


def test_build_matches_a1111_layout():
    text = build_parameters(**BASE)
    assert text == ("a cat, sitting\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, Schedule type: Karras, "
                    "CFG scale: 7, Seed: 1, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, "
                    "Version: sd-playground")


def test_round_trip_sdxl_with_refiner():
    text = build_parameters(**dict(BASE, prompt="line one\nline two", width=1024, height=768, cfg=5.5,
                                   sampler="dpmpp_2m", schedule="sgm_uniform", model_name="sd_xl_base_1.0"),
                            family="sdxl-base", sdxl_original_size=(2048, 1536), sdxl_crop=(16, 32),
                            refiner="sd_xl_refiner_1.0", refiner_hash="7440042bbd", refiner_switch_at=0.75,
                            aesthetic_score=6.5, negative_aesthetic_score=2.0, denoising_strength=0.6,
                            clip_skip=2, batch_size=2)
    assert "Batch size: 2" in text and "Batch pos" not in text   # the seed is the image's own (s + i)
    s = to_settings(parse_parameters(text))
    assert s["prompt"] == "line one\nline two" and s["negative_prompt"] == "blurry"
    assert (s["steps"], s["sampler"], s["schedule"], s["cfg"], s["seed"], s["width"], s["height"]) == (
        20, "dpmpp_2m", "sgm_uniform", 5.5, 1, 1024, 768)
    assert s["sdxl_original_size"] == (2048, 1536) and s["sdxl_crop"] == (16, 32)
    assert s["sdxl_target_size"] == (768, 1024)
    assert (s["refiner"], s["refiner_hash"], s["refiner_switch_at"]) == ("sd_xl_refiner_1.0", "7440042bbd", 0.75)
    assert (s["aesthetic_score"], s["negative_aesthetic_score"], s["strength"], s["clip_skip"]) == (6.5, 2.0, 0.6, 2)
    assert (s["batch_size"], s["model"], s["model_hash"]) == (2, "sd_xl_base_1.0", "6ce0161689")
    assert guess_tab(s) == "sdxl" and s["warnings"] == []


def test_parse_a1111_text():
    """A text as AUTOMATIC1111 writes it: old-style sampler with schedule, quoted values, extra fields."""
    text = ("masterpiece, (a cat:1.2)\nin a hat\nNegative prompt: lowres, bad anatomy\n"
            "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 3229558212, Size: 768x512, "
            "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, "
            'Lora hashes: "detail: 1a2b3c, style: 4d5e6f", Hires upscale: 2, Version: v1.10.1')
    p = parse_parameters(text)
    assert p["Prompt"] == "masterpiece, (a cat:1.2)\nin a hat" and p["Negative prompt"] == "lowres, bad anatomy"
    assert p["Lora hashes"] == "detail: 1a2b3c, style: 4d5e6f" and p["Version"] == "v1.10.1"
    s = to_settings(p)
    assert (s["sampler"], s["schedule"], s["steps"], s["cfg"], s["seed"], s["width"], s["height"]) == (
        "dpmpp_2m", "karras", 30, 7.5, 3229558212, 768, 512)
    assert s["strength"] == 0.45 and guess_tab(s) == "sd1"   # 768x512: an SD 1.x landscape (SD 2-v is 768 both ways)
    s = to_settings(parse_parameters("a dog\nSteps: 20, Sampler: Weird One, Schedule type: Automatic, Seed: 5, "
                                     "Size: 512x512"))
    assert "sampler" not in s and "schedule" not in s and s["warnings"] == ["unknown sampler 'Weird One'"]
    assert guess_tab(s) == "sd1"
    assert parse_parameters("just a prompt")["Prompt"] == "just a prompt"
    assert quote("a, b") == '"a, b"' and quote("plain") == "plain"


def test_save_png_never_overwrites(tmp_path):
    img = Image.new("RGB", (8, 8), (10, 20, 30))
    paths: list = []
    lock = threading.Lock()

    def save():
        p = save_png(img, "prompt\nSteps: 1, Seed: 4, Size: 8x8", tmp_path, 4)
        with lock:
            paths.append(p)

    threads = [threading.Thread(target=save) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 8 and all(p.name.endswith("-4.png") for p in paths)
    assert read_parameters(paths[0]) == "prompt\nSteps: 1, Seed: 4, Size: 8x8"
    assert Image.open(paths[0]).getpixel((0, 0)) == (10, 20, 30)


def test_read_jpeg_user_comment(tmp_path):
    """A1111 JPEG/WebP: the text sits in EXIF UserComment as 'UNICODE\\0' + UTF-16."""
    text = "a cat\nSteps: 5, Sampler: Euler, Seed: 2, Size: 64x64"
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + text.encode("utf-16-be")
    path = tmp_path / "a.jpg"
    Image.new("RGB", (16, 16)).save(path, exif=exif)
    assert read_parameters(path) == text
    assert read_parameters(Image.new("RGB", (4, 4))) is None


def test_inpaint_fields_round_trip():
    """The inpainting families add A1111's img2img-inpaint fields; they parse back and point to the inpaint tab."""
    text = build_parameters(**dict(BASE, model_name="512-inpainting-ema"), family="sd2-inpaint",
                            denoising_strength=1.0, mask_blur=4, masked_content="fill", inpaint_area="only masked",
                            masked_padding=32)
    assert text.endswith("Model: 512-inpainting-ema, Denoising strength: 1, Mask blur: 4, Masked content: fill, "
                         "Inpaint area: Only masked, Masked area padding: 32, Version: sd-playground")
    s = to_settings(parse_parameters(text))
    assert (s["strength"], s["mask_blur"], s["masked_content"], s["inpaint_area"], s["masked_padding"]) == (
        1.0, 4, "fill", "only masked", 32)
    assert guess_tab(s) == "inpaint"
    # SDXL inpainting writes the SDXL size fields as well; a family without inpainting ignores the mask fields
    xl = build_parameters(**BASE, family="sdxl-inpaint", mask_blur=8, inpaint_area="whole picture")
    assert "SDXL target size: 512x512, Mask blur: 8, Inpaint area: Whole picture, Version" in xl
    assert "Mask blur" not in build_parameters(**BASE, family="sd1", mask_blur=4)
    # an A1111 inpaint text
    a = to_settings(parse_parameters("a hat\nSteps: 20, Sampler: Euler a, Seed: 1, Size: 512x512, Denoising strength: "
                                     "0.75, Mask blur: 4, Inpaint area: Whole picture, Masked content: original"))
    assert (a["mask_blur"], a["inpaint_area"], a["masked_content"]) == (4, "whole picture", "original")
