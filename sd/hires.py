"""Hires fix: AUTOMATIC1111's two-pass txt2img (`StableDiffusionProcessingTxt2Img.sample` / `sample_hr_pass`).

Pass 1 runs the request at its own size (`sd.pipeline.generate`). Its result is upscaled to the target size either
in latent space (`torch.nn.functional.interpolate`, A1111's `latent_upscale_modes` table: "Latent" = bilinear,
"(antialiased)" = antialias on, "(bicubic)", "(nearest)", "(nearest-exact)") or as an image (the decoded 8-bit
pass-1 image resized with PIL's Lanczos or nearest filter, or by a caller-given upscaler such as the SD 2 x4
upscaler, then VAE-encoded as img2img does). Pass 2 is an img2img of the upscaled latent with its own step count and
denoising strength, by A1111's rule for a second pass (`setup_img2img_steps` with `steps` given: N = hires steps or
the first pass's, the schedule is built for int(N / min(strength, 0.999)) steps and only its last N run).

Seeds, as A1111's `sample_hr_pass` (a fresh `ImageRNG` over the same seeds with the upscaled shape): pass 2 draws its
noise from new generators seeded with the images' seeds s + i (the pipeline's convention: the family's input-side
draw, then randn of image i's (1, C, h2, w2) latent), and its ancestral noise from new s + i + 1 generators, like any
request.
So pass 2 equals `generate` on the upscaled image at the upscaled size with the strength that makes the pipeline's
img2img run the same N steps (`tests/test_hires.py` checks it pixel for pixel).

Target size (A1111 `calculate_target_resolution`): `Hires upscale` s gives int(width * s) x int(height * s);
`Hires resize` WxH gives that size, one side 0 keeping the aspect ratio, both given: upscaled to cover and cropped in
the latent. Sides are rounded down to the model's size multiple (8 px, SD3 16) as A1111's latent // 8 does.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image

from .denoiser import noised
from .pipeline import (GenerateParams, GenerateResult, LoadedModel, check_params, decode_latents_info, encode_image,
                       generate, guided_denoiser, image_generators, loaded, request_inputs, sampling_sigmas,
                       step_generators)
from .samplers import img2img_steps, sample

Tensor = torch.Tensor

# A1111 `shared.latent_upscale_modes`: name -> (torch interpolate mode, antialias)
LATENT_UPSCALERS = {"Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
                    "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
                    "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False)}
IMAGE_UPSCALERS = {"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}   # A1111's built-in PIL upscalers
UPSCALERS = (*LATENT_UPSCALERS, *IMAGE_UPSCALERS)

# An image upscaler given by the caller (the SD 2 x4 upscaler): (image, (width, height), seed) -> image of that size
ImageUpscaler = Callable[[Image.Image, tuple[int, int], int], Image.Image]


@dataclass(frozen=True)
class Hires:
    """One hires-fix request (A1111's `enable_hr` fields)."""

    scale: float = 2.0          # Hires upscale: target = int(side * scale), used when resize_x = resize_y = 0
    resize_x: int = 0           # Hires resize: target width (0: from the height and the aspect ratio)
    resize_y: int = 0           # Hires resize: target height
    steps: int = 0              # Hires steps of the second pass; 0: the first pass's steps
    denoise: float = 0.7        # Denoising strength of the second pass, in (0, 1]
    upscaler: str = "Latent"    # a key of UPSCALERS, or the name of a caller-given image upscaler

    def check(self, external: tuple[str, ...] = ()) -> None:
        """Refuse an impossible request in one line saying what to change."""
        if self.upscaler not in UPSCALERS and self.upscaler not in external:
            raise ValueError(f"unknown hires upscaler {self.upscaler!r}; choose one of "
                             f"{', '.join((*UPSCALERS, *external))}")
        if not 0.0 < float(self.denoise) <= 1.0:
            raise ValueError(f"hires denoising strength must be in (0, 1], got {self.denoise}")
        if not 0 <= int(self.steps) <= 1000:
            raise ValueError(f"hires steps must be between 0 (same as the first pass) and 1000, got {self.steps}")
        if self.resize_x < 0 or self.resize_y < 0:
            raise ValueError(f"hires resize sides must be 0 or positive, got {self.resize_x}x{self.resize_y}")
        if not (self.resize_x or self.resize_y) and not 1.0 <= float(self.scale) <= 8.0:
            raise ValueError(f"hires upscale must be between 1 and 8, got {self.scale}")


def target_size(width: int, height: int, h: Hires) -> tuple[int, int, int, int]:
    """(upscale-to width, height, crop x, crop y) in pixels, A1111's calculate_target_resolution: the crop is what
    covering a `resize_x` x `resize_y` box of another aspect ratio leaves over (0 otherwise)."""
    if not h.resize_x and not h.resize_y:
        return int(width * h.scale), int(height * h.scale), 0, 0
    if not h.resize_y:
        return h.resize_x, h.resize_x * height // width, 0, 0
    if not h.resize_x:
        return h.resize_y * width // height, h.resize_y, 0, 0
    if width / height < h.resize_x / h.resize_y:
        to_x, to_y = h.resize_x, h.resize_x * height // width
    else:
        to_x, to_y = h.resize_y * width // height, h.resize_y
    return to_x, to_y, to_x - h.resize_x, to_y - h.resize_y


def second_pass_sigmas(model: LoadedModel, p: GenerateParams, steps: int, denoise: float) -> Tensor:
    """The (steps + 1,) sigmas pass 2 walks: A1111's setup_img2img_steps with `steps` given builds the request's
    schedule for total = int(steps / min(denoise, 0.999)) steps and runs sigmas[total - steps:] (k-diffusion
    sample_img2img: sigmas[total - t_enc - 1:] with t_enc = steps - 1)."""
    total, t_enc = img2img_steps(steps, float(denoise), fixed=True)           # (int(steps / min(s, .999)), steps - 1)
    q = replace(p, steps=total, init_image=None, inputs=request_inputs(model.spec, p))   # inputs completed (SD3 shift)
    full = sampling_sigmas(model, q)                                                     # (total + 1,)
    return full[total - t_enc - 1:]


def upscale_latent(z: Tensor, size: tuple[int, int], upscaler: str) -> Tensor:
    """(B, C, h, w) -> (B, C, size[0], size[1]) with A1111's latent mode (align_corners left at torch's default)."""
    mode, antialias = LATENT_UPSCALERS[upscaler]
    return F.interpolate(z.float(), size=size, mode=mode, antialias=antialias)


def upscale_image(image: Image.Image, size: tuple[int, int], upscaler: str) -> Image.Image:
    """A PIL upscaler ("Lanczos", "Nearest") to `size` (width, height), A1111's resize_image mode 0."""
    return image.convert("RGB").resize(size, IMAGE_UPSCALERS[upscaler])


def infotext_fields(h: Hires) -> dict[str, str]:
    """What A1111 writes for a hires image (`Denoising strength`, `Hires upscale` or `Hires resize`, `Hires steps`
    when not 0, `Hires upscaler`); `Size` stays the first pass's."""
    from .pnginfo import num

    out = {"Denoising strength": num(h.denoise)}
    if h.resize_x or h.resize_y:
        out["Hires resize"] = f"{int(h.resize_x)}x{int(h.resize_y)}"
    else:
        out["Hires upscale"] = num(h.scale)
    if h.steps:
        out["Hires steps"] = str(int(h.steps))
    out["Hires upscaler"] = h.upscaler
    return out


def _crop(z: Tensor, cx: int, cy: int) -> Tensor:
    """A1111's latent truncation: cx, cy latent pixels removed, the odd one from the far side."""
    return z[:, :, cy // 2:z.shape[2] - (cy + 1) // 2, cx // 2:z.shape[3] - (cx + 1) // 2]


@torch.no_grad()
def generate_hires(model: LoadedModel, p: GenerateParams, h: Hires, callback: Callable[[dict], None] | None = None,
                   stop: Callable[[], bool] | threading.Event | None = None,
                   external: dict[str, ImageUpscaler] | None = None) -> GenerateResult:
    """Pass 1 at p.width x p.height, upscale, pass 2 (img2img) at the target size. Callback infos count the steps
    of both passes (`pass` 1 or 2). LoRA tags and embeddings apply to both passes. `external`: image upscalers by
    name besides the built-in ones. Stopped in pass 1: pass 1's result, marked stopped."""
    from .networks import needs_networks, run_with_networks

    external = external or {}
    h.check(tuple(external))
    if needs_networks(p, model):
        return run_with_networks(lambda m, q, callback=None, stop=None: generate_hires(m, q, h, callback, stop,
                                                                                      external),
                                 model, p, callback=callback, stop=stop)
    if p.init_image is not None:
        raise ValueError("hires fix is a text-to-image pass: leave the init image out or turn hires fix off")
    if any(i.kind == "image" for i in model.family.inputs):
        raise ValueError(f"hires fix is for text-to-image checkpoints; {model.family.label} takes an image of its "
                         "own: turn hires fix off")
    check_params(model.spec, p)
    m = model.spec.latent.factor * getattr(model.spec.unet, "patch_size", 1)   # pixels per latent step the net takes
    f = model.spec.latent.factor
    to_x, to_y, crop_x, crop_y = target_size(p.width, p.height, h)
    to_x, to_y = to_x // m * m, to_y // m * m
    n = int(h.steps) or p.steps
    q = replace(p, width=to_x - crop_x // f * f, height=to_y - crop_y // f * f, steps=n, init_image=None,
                initial_latent=None)
    check_params(model.spec, q)
    total = p.steps + n

    def on_first(info: dict) -> None:
        if callback is not None:
            callback({**info, "total": total, "pass": 1})

    first = generate(model, p, callback=on_first, stop=stop)
    if first.stopped:
        return replace(first, info={**first.info, "hires": "stopped in the first pass"})
    if h.upscaler in LATENT_UPSCALERS:
        z = upscale_latent(first.latents, (to_y // f, to_x // f), h.upscaler)          # (B, C, to_y/f, to_x/f)
    else:
        up = external.get(h.upscaler)
        images = [up(img, (to_x, to_y), p.seed) if up is not None else upscale_image(img, (to_x, to_y), h.upscaler)
                  for img in first.images]
        z = torch.cat([encode_image(model, img, to_x, to_y) for img in images])       # (B, C, to_y/f, to_x/f)
    z = _crop(z, crop_x // f, crop_y // f)                                             # (B, C, q.height/f, q.width/f)
    g = image_generators(q)                          # A1111: a fresh ImageRNG over the images' seeds (s + i)
    guided = guided_denoiser(model, q, generator=g)  # the family's input-side draw first, as generate does
    noise = torch.cat([torch.randn((1, *z.shape[1:]), generator=gi, dtype=torch.float32) for gi in g])  # (B, C, h, w)
    sigmas = second_pass_sigmas(model, q, n, h.denoise)                                 # (n + 1,)
    x = noised(model.spec.prediction, z, noise, sigmas[0]).to(model.device, model.dtype)
    done = {"n": 0}

    def on_second(info: dict) -> None:
        done["n"] = info["step"] + 1
        if callback is not None:
            callback({**info, "step": p.steps + info["step"], "total": total, "pass": 2})

    gen = step_generators(q)   # per-step noise of ancestral samplers, image by image (seed s + i + 1)
    with loaded(model.parts.unet):   # low memory: the UNet read for this pass only, dropped before the decode
        latents = sample(q.sampler, guided, x, sigmas.to(model.device), generator=gen, callback=on_second, stop=stop,
                         eta=q.eta, flow=model.spec.prediction == "flow")
    images, notes = decode_latents_info(model, latents)
    info = dict(first.info)
    info["notes"] = list(dict.fromkeys([*info.get("notes", []), *notes]))
    if not info["notes"]:
        del info["notes"]
    info["infotext"] = {**info.get("infotext", {}), **infotext_fields(h)}
    info["hires_size"] = (q.width, q.height)
    return GenerateResult(images, latents.float().cpu(), p.seed, model.spec, stopped=done["n"] < len(sigmas) - 1,
                          steps_done=first.steps_done + done["n"], info=info)
