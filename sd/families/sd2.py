"""SD 2.x (Stability AI's LDM release, Rombach et al. 2022): the LDM UNet with linear proj_in and 64-channel heads,
cross-attention on OpenCLIP ViT-H/14's penultimate layer (+ final LN), eps (512) or v (768) prediction, kl-f8.

Families: `sd2` (text to image; eps or v settled by the A1111 probe), `sd2-inpaint` (512-inpainting-ema: 9-channel
UNet, concat = mask + masked-image latent), `sd2-depth` (5 channels: latent + a depth map, given or estimated by
the MiDaS DPT-Hybrid stored in the file, img2img from the init image), `sd2-x4-upscaler` (7 channels: latent + the noised
low-res RGB, noise-level class label, kl-f4 latent), `sd2-unclip-h` / `sd2-unclip-l` (image variations: the CLIP
image embedding of `embedder.model.visual.*`, noise-augmented, + its level embedding as the UNet's vector).
Recognised by: an OpenCLIP text tower under `cond_stage_model.model.` (or SGM's `conditioner.embedders.0.model.`
without a second tower and without a vector input, which would be the SDXL refiner).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..config import LatentFormat, ModelSpec
from ..inpaint import image_to_tensor, load_image
from .common import (INPAINT_CONCAT, INPAINT_INPUTS, INPAINT_OPTIONS, SD_LATENT, SD_RGB, batched, inpaint_check,
                     inpaint_infotext, text_condition, vae_posterior_sample, with_inpaint)
from .family import Family, Input
from .shapes import detect_vae, has, openclip_text

Tensor = torch.Tensor

LDM_TEXT, SGM_TEXT = "cond_stage_model.model.", "conditioner.embedders.0.model."
X4_LATENT = LatentFormat(scale=0.08333, shift=0.0, channels=4, factor=4)  # x4-upscaling.yaml scale_factor


def text_prefix(shapes, unet) -> str | None:
    if has(shapes, LDM_TEXT):
        return LDM_TEXT
    if has(shapes, SGM_TEXT) and not has(shapes, "conditioner.embedders.1.") and not unet.adm_in_channels:
        return SGM_TEXT
    return None


def build(shapes, unet):
    return detect_vae(shapes), (openclip_text(shapes, text_prefix(shapes, unet), "penultimate", True, False),)


def plain(shapes, unet) -> bool:
    """No vector and no class input: sd2, sd2-inpaint, sd2-depth (told apart by their concat channels)."""
    return text_prefix(shapes, unet) is not None and not unet.adm_in_channels and not unet.num_classes


def upscaler(shapes, unet) -> bool:
    return text_prefix(shapes, unet) is not None and unet.num_classes > 0


def unclip(h: bool):
    def match(shapes, unet) -> bool:
        if text_prefix(shapes, unet) != LDM_TEXT or not unet.adm_in_channels:
            return False
        width = shapes[LDM_TEXT + "token_embedding.weight"][1]
        return (unet.adm_in_channels // 2 == width) == h   # ViT-H image embedding (1024) + its noise level
    return match


# The checkpoint card's words (sd.card).
EVIDENCE = (LDM_TEXT, "!model.diffusion_model.label_emb.0.0.weight")
TEXT_WORDS = ("crossattn", "OpenCLIP ViT-H/14's penultimate layer ({w0} wide, + final layer norm), 77 tokens per "
                          "75-token chunk")
INPAINT_WORDS = ("concat", "the mask (1 channel) and the masked image's latent (4), after the noisy latent")

SD2 = Family(
    name="sd2", label="SD 2.x", tab="sd2", matches=plain, build=build, latent=SD_LATENT, condition=text_condition,
    default_size=512, v_size=768, preview=SD_RGB, preset="sd2", preset_v="sd2-v",
    evidence=EVIDENCE, conditioning=(TEXT_WORDS,),
    about="adds over SD 1.x the OpenCLIP ViT-H/14 text encoder (its penultimate layer) and v-prediction for the "
          "768 px model (the 512 px base stays eps); same UNet layout with 64-channel heads",
)

SD2_INPAINT = Family(
    name="sd2-inpaint", label="SD 2 inpainting", tab="inpaint", matches=plain, build=build, latent=SD_LATENT,
    condition=with_inpaint(text_condition), concat=INPAINT_CONCAT, inputs=INPAINT_INPUTS, options=INPAINT_OPTIONS,
    check=inpaint_check, preview=SD_RGB, infotext=inpaint_infotext, evidence=EVIDENCE,
    conditioning=(TEXT_WORDS, INPAINT_WORDS),
    about="SD 2 retrained for inpainting: adds the mask and the masked image's latent as 5 extra input channels",
)

# ------------------------------------------------------------------------------------------- depth-to-image
# Reference: Stability-AI/stablediffusion `ldm/models/diffusion/ddpm.py` LatentDepth2ImageDiffusion
# (configs/stable-diffusion/v2-midas-inference.yaml): the depth map (MiDaS DPT-Hybrid, larger = nearer) resized to
# the latent size (bicubic) and normalised to [-1, 1] per image is the 1 concat channel; img2img from the init image's
# latent (its posterior sample). The normalisation is diffusers' StableDiffusionDepth2ImgPipeline.prepare_depth_map,
# `2 (d - min) / (max - min) - 1`, as pinned in issue 10 (the LDM code adds 0.001 to the denominator).

DEPTH_STRENGTH = 0.9   # scripts/gradio/depth2img.py's default strength


def depth_map_tensor(image, size: tuple[int, int]) -> Tensor:
    """A depth map image (mode L, larger = nearer; any size; or mode F: MiDaS's float estimate, taken as is) ->
    (1, 1, h, w) float32 in [-1, 1] at the latent size `size` = (h, w): /255, F.interpolate bicubic (align_corners
    False), then 2 (d - min) / (max - min) - 1."""
    d = depth_values(image)                                                                    # (H, W)
    t = F.interpolate(torch.from_numpy(d)[None, None], size=size, mode="bicubic", align_corners=False)  # (1, 1, h, w)
    lo, hi = t.amin(dim=(1, 2, 3), keepdim=True), t.amax(dim=(1, 2, 3), keepdim=True)
    if float((hi - lo).min()) <= 0:
        raise ValueError("the depth map has one value everywhere (no near and far); give a depth map with some range")
    return 2.0 * (t - lo) / (hi - lo) - 1.0


def depth_values(image) -> np.ndarray:
    """(H, W) float32 of a depth map: an L (or RGB) image / 255, or a mode F image (the estimate) as it is."""
    img = load_image(image, "depth_map")
    if img.mode == "F":
        return np.array(img, dtype=np.float32)
    return np.array(img.convert("L"), dtype=np.float32) / 255.0


def depth_check(inputs: dict) -> None:
    if inputs.get("depth_map") is not None:
        depth_map_tensor(inputs["depth_map"], (8, 8))   # readable, not flat (without one, MiDaS estimates it)


def midas_extra_config(shapes) -> tuple:
    """ModelSpec.extra of a depth file: the MiDaS DPT-Hybrid numbers read from `depth_model.*` (nothing when a
    pruned file left the estimator out: then a depth map must be given)."""
    from ..midas import midas_config

    cfg = midas_config(shapes)
    return (("midas", cfg),) if cfg is not None else ()


def midas_tensors(spec: ModelSpec) -> dict:
    from ..midas import PREFIX, build_midas

    cfg = dict(spec.extra).get("midas")
    if cfg is None:
        return {}
    return {"depth_model": {PREFIX + k: tuple(v.shape) for k, v in build_midas(cfg, "meta").state_dict().items()}}


def midas_extras(ckpt, spec: ModelSpec, device, dtype) -> dict:
    """{"midas": the estimator} loaded strictly from `depth_model.*`, kept in float32 whatever the dtype (its
    GroupNorms and the min-max normalisation of a relative depth gain nothing from half precision)."""
    from ..checkpoint import CheckpointError
    from ..midas import PREFIX, build_midas

    cfg = dict(spec.extra).get("midas")
    if cfg is None:
        return {}
    model = build_midas(cfg, device="meta")
    try:
        model.load_state_dict(ckpt.tensors(PREFIX), strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"MiDaS depth estimator: {str(e).splitlines()[0][:300]}") from None
    return {"midas": model.to(device=device, dtype=torch.float32).eval().requires_grad_(False)}


def depth_view(image, size: tuple[int, int]) -> Image.Image:
    """The depth map a request used, to show: its values resized to `size` = (w, h) (bicubic), stretched to 0..255
    (white = near), mode L."""
    d = torch.from_numpy(depth_values(image))[None, None]                                           # (1, 1, H, W)
    t = F.interpolate(d, size=(size[1], size[0]), mode="bicubic", align_corners=False)[0, 0]
    t = (t - t.min()) / (t.max() - t.min()).clamp(min=1e-12)
    return Image.fromarray(torch.round(t.clamp(0, 1) * 255).to(torch.uint8).numpy(), mode="L")


def depth_prepare(parts, spec: ModelSpec, request) -> tuple[dict, tuple]:
    """(inputs, shown): without a depth map, MiDaS estimates one from the init image (sd.midas.estimate_depth: the
    SD 2 reference's preprocessing) and it becomes the request's `depth_map` (a mode F image at the net's size, to
    which depth_map_tensor applies the resize and the normalisation as to a given map); shown = the map used."""
    from ..midas import estimate_depth

    inputs = dict(request.inputs)
    if inputs.get("depth_map") is None:
        model = parts.extras.get("midas")
        if model is None:
            raise ValueError("this sd2-depth file has no depth estimator (depth_model.*): give a depth map "
                             "(--depth-map PATH, larger = nearer)")
        x = image_to_tensor(load_image(inputs["image"], "image"))     # (1, 3, H, W) in [-1, 1]
        inputs["depth_map"] = Image.fromarray(estimate_depth(model, x)[0].numpy())   # mode F, (h, w) net size
        what = "depth map used (MiDaS estimate)"
    else:
        what = "depth map used (given)"
    return inputs, ((what, depth_view(inputs["depth_map"], (request.width, request.height))),)


def depth_condition(parts, spec: ModelSpec, request, generator) -> tuple[dict, dict]:
    """Text (OpenCLIP penultimate, "" encoded) + concat = the normalised depth map (B, 1, h, w), identical in both
    CFG branches. Draws nothing (the init image's posterior sample is drawn by depth_img2img, first). Without a
    map (a caller that skipped generate's Family.prepare) MiDaS estimates it here."""
    inputs = request.inputs if request.inputs.get("depth_map") is not None else depth_prepare(parts, spec, request)[0]
    cond, uncond = text_condition(parts, spec, request, generator)
    size = (request.height // spec.latent.factor, request.width // spec.latent.factor)
    depth = depth_map_tensor(inputs["depth_map"], size).to(cond["crossattn"].dtype)           # (1, 1, h, w)
    extra = batched({"concat": depth}, request.batch_size)
    return {**cond, **extra}, {**uncond, **extra}


def depth_img2img(parts, spec: ModelSpec, request, generator) -> tuple[Tensor, float]:
    """(z0 (1, 4, h, w), strength): the init image's VAE posterior SAMPLE (LDM get_first_stage_encoding, the family's
    input-side draw) and the request's strength; the pipeline runs the last int(strength * steps) steps."""
    x = image_to_tensor(load_image(request.inputs["image"], "image"))      # (1, 3, H, W) in [-1, 1]
    return vae_posterior_sample(parts.vae, x, spec.latent, generator), float(request.inputs["strength"])


def strength_infotext(kw: dict) -> dict[str, str]:
    return {"Denoising strength": f"{float(kw['strength']):g}"} if kw.get("strength") is not None else {}


DEPTH_INPUTS = (
    Input("image", "image", "Init image", required=True, cli="--init-image",
          help="RGB image to transform, used at its own size (width and height must equal it)."),
    Input("depth_map", "image", "Depth map (larger = nearer; empty: estimated)", scale=0,
          help="Grey image of any size, white = near; resized to the latent and normalised to [-1, 1]. Without "
               "one, the MiDaS model stored in the checkpoint estimates it from the init image."),
    Input("strength", "number", "Denoising strength", default=DEPTH_STRENGTH, min=0, max=1,
          help="How much of the schedule runs from the init image: 1 = all of it, 0 = the image back."),
)

SD2_DEPTH = Family(
    name="sd2-depth", label="SD 2 depth-to-image", tab="depth", matches=plain, build=build, latent=SD_LATENT,
    condition=depth_condition, concat=(("depth", 1),), preview=SD_RGB, inputs=DEPTH_INPUTS, check=depth_check,
    img2img=depth_img2img, infotext=strength_infotext, evidence=(*EVIDENCE, "depth_model."),
    conditioning=(TEXT_WORDS, ("concat", "the depth map (1 channel, larger = nearer) normalised to [-1, 1] at the "
                                         "latent size")),
    about="SD 2 conditioned on depth: adds a MiDaS depth map as one extra input channel; img2img from the init "
          "image keeps the layout and changes the rest",
    extra_config=midas_extra_config, extra_tensors=midas_tensors, extras=midas_extras, prepare=depth_prepare,
)

# ------------------------------------------------------------------------------------------- x4 upscaler
# Reference: Stability-AI/stablediffusion `ldm/models/diffusion/ddpm.py` LatentUpscaleDiffusion and
# `ldm/modules/diffusionmodules/upscaling.py` ImageConcatWithNoiseAugmentation (configs/stable-diffusion/
# x4-upscaling.yaml): the low-res RGB image is noised by q_sample of its own "linear" schedule (1e-4 .. 2e-2) at the
# noise level, concatenated to the latent, and the level is the UNet's class label; diffusers'
# StableDiffusionUpscalePipeline does the same (low_res_scheduler.add_noise, class_labels=noise_level).

X4_SCHEDULE = (0.0001, 0.02, 1000)   # x4-upscaling.yaml: linear_start / linear_end of both schedules
X4_MAX_NOISE = 350                   # ImageConcatWithNoiseAugmentation max_noise_level
X4_BUFFERS = "low_scale_model."


def ldm_abar(linear_start: float, linear_end: float, steps: int) -> Tensor:
    """alphas_cumprod (steps,) float64 of LDM's "linear" schedule: betas = linspace(sqrt(start), sqrt(end))**2."""
    betas = torch.linspace(math.sqrt(linear_start), math.sqrt(linear_end), steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def file_abar(ckpt, prefix: str, fallback: Tensor) -> tuple[Tensor, str]:
    """(alphas_cumprod (T,) float64, source) from the file's `<prefix>betas` buffer when it holds a valid one."""
    shapes = ckpt.shapes()
    if prefix + "betas" in shapes and len(shapes[prefix + "betas"]) == 1:
        betas = ckpt.get(prefix + "betas").double()
        if bool(((betas > 0) & (betas < 1)).all()):
            return torch.cumprod(1 - betas, 0), f"the file's {prefix}betas"
    return fallback, "the family's schedule"


def x4_extras(ckpt, spec: ModelSpec, device, dtype) -> dict:
    abar, source = file_abar(ckpt, X4_BUFFERS, ldm_abar(*X4_SCHEDULE))
    return {"low_res_abar": abar, "low_res_abar_source": source}


def x4_check(inputs: dict) -> None:
    nl = inputs["noise_level"]
    if float(nl) != int(nl):
        raise ValueError(f"noise_level must be a whole number (a class label of the UNet), got {nl:g}")


def noise_low_res(image: Tensor, level: int, abar: Tensor, generator: torch.Generator) -> Tensor:
    """q_sample of the low-res image at `level`: sqrt(abar) x + sqrt(1 - abar) n (float64 maths, float32 result).
    image (1, 3, h, w) in [-1, 1]; n is the family's input-side draw, randn (1, 3, h, w) from `generator`."""
    n = torch.randn(image.shape, generator=generator, dtype=torch.float32)   # (1, 3, h, w)
    a = abar[level].double()
    return (a.sqrt() * image.double() + (1 - a).sqrt() * n.double()).float()


def x4_condition(parts, spec: ModelSpec, request, generator) -> tuple[dict, dict]:
    """Text (OpenCLIP penultimate, "" encoded) + concat = the noised low-res RGB (B, 3, h, w) + vector = the noise
    level (B,) long as the class label; concat and label identical in both CFG branches."""
    cond, uncond = text_condition(parts, spec, request, generator)
    level = int(request.inputs["noise_level"])
    x = image_to_tensor(load_image(request.inputs["image"], "image"))       # (1, 3, h, w)
    aug = noise_low_res(x, level, parts.extras["low_res_abar"], generator)  # (1, 3, h, w)
    extra = batched({"concat": aug.to(cond["crossattn"].dtype), "vector": torch.full((1,), level, dtype=torch.long)},
                    request.batch_size)
    return {**cond, **extra}, {**uncond, **extra}


def noise_level_infotext(kw: dict) -> dict[str, str]:
    return {"Noise level": str(int(kw["noise_level"]))} if kw.get("noise_level") is not None else {}


X4_INPUTS = (
    Input("image", "image", "Low-res image", required=True, cli="--init-image", scale=4,
          help="RGB image to upscale; the output is 4x its size (width and height, when given, must be 4x it)."),
    Input("noise_level", "number", "Noise level", default=20, min=0, max=X4_MAX_NOISE,
          help="Noise added to the low-res image (0..350): higher invents more detail, lower keeps it closer."),
)

SD2_X4 = Family(
    name="sd2-x4-upscaler", label="SD 2 x4 upscaler", tab="upscale", matches=upscaler, build=build,
    latent=X4_LATENT, condition=x4_condition, concat=(("low_res", 3),), schedule=X4_SCHEDULE, preview=SD_RGB,
    inputs=X4_INPUTS, check=x4_check, extras=x4_extras, infotext=noise_level_infotext, tile=512,
    evidence=(LDM_TEXT, "model.diffusion_model.label_emb.weight", "low_scale_model."),
    conditioning=(TEXT_WORDS, ("concat", "the noised low-resolution RGB image (3 channels) at the latent size"),
                  ("vector", "the noise level of the low-resolution image, as a class label")),
    about="SD 2's 4x upscaler: a text-guided diffusion on an f4 latent, conditioned on the noised low-res image "
          "(3 extra input channels) and its noise level",
)

# ------------------------------------------------------------------------------------------- unCLIP
# Reference: Stability-AI/stablediffusion `ldm/models/diffusion/ddpm.py` ImageEmbeddingConditionedLatentDiffusion
# (configs/stable-diffusion/v2-1-stable-unclip-{h,l}-inference.yaml) and `ldm/modules/encoders/modules.py`
# CLIPEmbeddingNoiseAugmentation: the CLIP image embedding e of the input image is noised by q_sample of a
# squaredcos_cap_v2 schedule at the noise level, and the UNet's vector is cat(e', timestep_embedding(level)); the
# unconditional branch gets zeros (scripts/streamlit/stableunclip.py). diffusers: StableUnCLIPImg2ImgPipeline
# (noise_image_embeddings; its image normaliser is the identity, as the augmentor's default data_mean / data_std).

UNCLIP_BUFFERS = "noise_augmentor."
UNCLIP_VISION = "embedder.model.visual."
UNCLIP_MAX_NOISE = 999
UNCLIP_MIN_SIDE = 64


def squaredcos_abar(steps: int = 1000) -> Tensor:
    """alphas_cumprod (steps,) float64 of squaredcos_cap_v2 (Nichol & Dhariwal 2021, "Improved DDPM"): betas_i =
    min(1 - f(t_{i+1}) / f(t_i), 0.999), f(t) = cos((t + 0.008) / 1.008 * pi / 2)^2, t_i = i / steps."""
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0)


def unclip_extra_config(vit_h: bool):
    """ModelSpec.extra of an unCLIP file: the image tower's numbers (open_clip ViT-H-14: head width 80, GELU;
    OpenAI's ViT-L/14: 64, QuickGELU), or nothing when the file has no image embedder."""
    from ..clip_vision import vision_config

    def extra(shapes) -> tuple:
        if UNCLIP_VISION + "conv1.weight" not in shapes:
            return ()
        return (("vision", vision_config(shapes, UNCLIP_VISION, 80 if vit_h else 64, not vit_h)),)
    return extra


def unclip_tensors(spec: ModelSpec) -> dict:
    from ..clip_vision import build_vision_tower

    cfg = dict(spec.extra).get("vision")
    if cfg is None:
        return {}
    tower = build_vision_tower(cfg, device="meta")
    return {"image_encoder": {UNCLIP_VISION + k: tuple(v.shape) for k, v in tower.state_dict().items()}}


def unclip_extras(ckpt, spec: ModelSpec, device, dtype) -> dict:
    from ..checkpoint import CheckpointError
    from ..clip_vision import build_vision_tower

    abar, source = file_abar(ckpt, UNCLIP_BUFFERS, squaredcos_abar())
    out = {"embed_abar": abar, "embed_abar_source": source}
    cfg = dict(spec.extra).get("vision")
    if cfg is not None:
        tower = build_vision_tower(cfg, device="meta")
        try:
            tower.load_state_dict(ckpt.tensors(UNCLIP_VISION), strict=True, assign=True)
        except RuntimeError as e:
            raise CheckpointError(f"unCLIP image tower: {str(e).splitlines()[0][:300]}") from None
        out["image_encoder"] = tower.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return out


def unclip_check(inputs: dict) -> None:
    nl = inputs["noise_level"]
    if float(nl) != int(nl):
        raise ValueError(f"noise_level must be a whole number (a timestep of the augmentation), got {nl:g}")
    w, h = load_image(inputs["image"], "image").size
    if min(w, h) < UNCLIP_MIN_SIDE:
        raise ValueError(f"the image is {w}x{h}; unCLIP needs at least {UNCLIP_MIN_SIDE}x{UNCLIP_MIN_SIDE} pixels: "
                         "give a larger image")


def unclip_pixels(image) -> Tensor:
    """The input image as the reference scripts load it: each side shrunk to a multiple of 64 (PIL LANCZOS), RGB,
    x / 127.5 - 1. Returns (1, 3, H', W')."""
    img = load_image(image, "image").convert("RGB")
    w, h = img.size
    if (w % 64, h % 64) != (0, 0):
        img = img.resize((w - w % 64, h - h % 64), resample=Image.LANCZOS)
    return image_to_tensor(img)


def noise_embedding(e: Tensor, level: int, abar: Tensor, generator: torch.Generator) -> Tensor:
    """CLIPEmbeddingNoiseAugmentation: e' = sqrt(abar) e + sqrt(1 - abar) n (float64 maths, float32 result), then
    cat with timestep_embedding(level, D). e (1, D); n = randn (1, D) is the family's input-side draw. (1, 2D)."""
    from ..unet import timestep_embedding

    n = torch.randn(e.shape, generator=generator, dtype=torch.float32)             # (1, D)
    a = abar[level].double()
    noised = (a.sqrt() * e.double() + (1 - a).sqrt() * n.double()).float()         # (1, D)
    level_emb = timestep_embedding(torch.tensor([float(level)]), e.shape[1])       # (1, D), cos first
    return torch.cat([noised, level_emb], dim=1)


def unclip_condition(parts, spec: ModelSpec, request, generator) -> tuple[dict, dict]:
    """Text (OpenCLIP penultimate, "" encoded) + vector = cat(noised image embedding, level embedding) (B, 2D);
    zeros (noise-level part included) in the unconditional branch."""
    from ..clip_vision import image_embedding

    tower = parts.extras.get("image_encoder")
    if tower is None:
        raise ValueError("this unCLIP file has no image embedder (embedder.model.visual.*): use a checkpoint that "
                         "includes it")
    cond, uncond = text_condition(parts, spec, request, generator)
    e = image_embedding(tower, unclip_pixels(request.inputs["image"]))             # (1, D)
    vec = noise_embedding(e, int(request.inputs["noise_level"]), parts.extras["embed_abar"], generator)
    vec = vec.to(cond["crossattn"].dtype)
    return ({**cond, **batched({"vector": vec}, request.batch_size)},
            {**uncond, **batched({"vector": torch.zeros_like(vec)}, request.batch_size)})


UNCLIP_INPUTS = (
    Input("image", "image", "Image to vary", required=True, cli="--init-image", scale=0,
          help="RGB image of any size (at least 64x64); the output has the requested width and height."),
    Input("noise_level", "number", "Noise level", default=0, min=0, max=UNCLIP_MAX_NOISE,
          help="Noise added to the image embedding (0..999): higher strays further from the image."),
)
_UNCLIP = dict(tab="unclip", build=build, latent=SD_LATENT, condition=unclip_condition, default_size=768,
               preview=SD_RGB, preset="sd2-unclip", inputs=UNCLIP_INPUTS, check=unclip_check, extras=unclip_extras,
               extra_tensors=unclip_tensors, infotext=noise_level_infotext,
               evidence=(LDM_TEXT, "model.diffusion_model.label_emb.0.0.weight", "embedder.model.visual."),
               conditioning=(TEXT_WORDS, ("vector", "the CLIP image embedding of the given image, noise-augmented, "
                                                    "followed by the embedding of its noise level (half each)")),
               about="SD 2.1 for image variations: adds a CLIP image embedding (and its noise level) as the UNet's "
                     "vector, added to the time embedding; the prompt is optional")
SD2_UNCLIP_H = Family(
    name="sd2-unclip-h", label="SD 2.1 unCLIP (ViT-H)", matches=unclip(True),
    vector_width=lambda texts, unet: 2 * texts[0].width, extra_config=unclip_extra_config(True), **_UNCLIP,
)
SD2_UNCLIP_L = Family(
    name="sd2-unclip-l", label="SD 2.1 unCLIP (ViT-L)", matches=unclip(False),
    vector_width=lambda texts, unet: unet.adm_in_channels,  # CLIP-L image width: not in text shapes
    extra_config=unclip_extra_config(False), **_UNCLIP,
)

FAMILIES = (SD2, SD2_INPAINT, SD2_DEPTH, SD2_X4, SD2_UNCLIP_H, SD2_UNCLIP_L)
