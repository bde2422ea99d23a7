"""Pieces several family modules condition with: prompt encoding, batch expansion, SDXL's Fourier features, the
LDM first-stage posterior sample, and the 9-channel inpainting concat (shared by sd1-inpaint, sd2-inpaint and
sdxl-inpaint, which differ only in their text side).

Conditioners speak the SGM language (`sgm/modules/encoders/modules.py`, `GeneralConditioner.OUTPUT_DIM2KEYS`):
they return `cond` / `uncond` dicts of `crossattn` (B, T, D), `vector` (B, A) and `concat` (B, C, h, w).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import LatentFormat, ModelSpec
from ..inpaint import INPAINT_AREA, MASKED_CONTENT, check_mask, image_to_tensor, load_image, mask_to_tensor
from ..text import encode_prompt
from ..unet import timestep_embedding
from .family import Input

Tensor = torch.Tensor
FOURIER_DIM = 256


def fourier(values: list[float], device=None) -> Tensor:
    """Each value -> a 256-dim sinusoidal embedding (cos first), concatenated: (len(values) * 256,)."""
    v = torch.tensor(values, dtype=torch.float32, device=device)
    return timestep_embedding(v, FOURIER_DIM).reshape(-1)


def encode_text(encoders, spec: ModelSpec, text: str, clip_skip: int,
                opt_in: bool = False) -> tuple[Tensor, Tensor | None]:
    """Run every text tower of the spec on `text`: (context (1, 77k, sum of widths), pooled (1, P) or None).
    `opt_in`: A1111's "Clip skip SDXL" (sd.text.encode_prompt: towers with cfg.clip_skip_opt_in follow clip_skip)."""
    hiddens, pooled = [], None
    for enc, cfg in zip(encoders, spec.text_encoders):
        h, p = encode_prompt(enc, text, clip_skip=clip_skip, opt_in=opt_in)
        hiddens.append(h)
        if cfg.output_pooled:
            pooled = p
    if len({h.shape[1] for h in hiddens}) > 1:   # each tower cleans text as its own tokenizer (sd.tokenizer)
        raise ValueError(f"the prompt makes {' and '.join(str(h.shape[1] // 77) for h in hiddens)} chunks of 75 tokens "
                         "in this model's text towers (their tokenizers read HTML entities such as &amp; differently "
                         "in text with a '<'): write the character itself or shorten the prompt")
    return torch.cat(hiddens, dim=-1), pooled


def text_pair(parts, spec: ModelSpec, request, empty_negative: str):
    """(ctx, pooled, negative ctx, negative pooled) of the request's prompt and negative prompt. An empty negative
    is encoded ("encode", LDM / A1111) or zeros like the prompt's ("zeros", SGM's SDXL). The request's
    sdxl_clip_l_skip (A1111 "Clip skip SDXL") is off where a request type has no such field."""
    opt_in = bool(getattr(request, "sdxl_clip_l_skip", False))   # sd.conditioning's SimpleNamespace has none
    ctx, pooled = encode_text(parts.text_encoders, spec, request.prompt, request.clip_skip, opt_in)
    if empty_negative == "zeros" and not request.negative_prompt:
        return ctx, pooled, torch.zeros_like(ctx), (torch.zeros_like(pooled) if pooled is not None else None)
    nctx, npooled = encode_text(parts.text_encoders, spec, request.negative_prompt, request.clip_skip, opt_in)
    return ctx, pooled, nctx, npooled


def batched(d: dict, batch: int) -> dict:
    """Every batch-1 tensor of a condition dict expanded to `batch`."""
    return {k: v.expand(batch, *v.shape[1:]).contiguous() for k, v in d.items()}


def text_condition(parts, spec: ModelSpec, request, generator=None) -> tuple[dict, dict]:
    """The plain text conditioner (SD 1.x, SD 2.x): crossattn only, the empty negative encoded."""
    ctx, _, nctx, _ = text_pair(parts, spec, request, "encode")
    return batched({"crossattn": ctx}, request.batch_size), batched({"crossattn": nctx}, request.batch_size)


def vae_posterior_sample(vae, x: Tensor, latent: LatentFormat, generator: torch.Generator) -> Tensor:
    """LDM `get_first_stage_encoding(encode_first_stage(x))`: mean, logvar = quant_conv(encoder(x)).chunk(2, 1),
    logvar clamped to [-30, 20], z = (mean + exp(logvar / 2) * randn - shift) * scale. x: (B, 3, H, W) in [-1, 1];
    the randn is drawn in float32 on the CPU from `generator`. Returns (B, C, H/f, W/f) float32."""
    p = next(vae.parameters())
    mean, logvar = vae.encode_moments(x.to(p.device, p.dtype))        # (B, C, h, w) each
    eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
    z = mean.float() + torch.exp(0.5 * logvar.float()) * eps.to(mean.device)
    return (z - latent.shift) * latent.scale


# ------------------------------------------------------------------------------------------- inpainting (9 ch)

INPAINT_CONCAT = (("mask", 1), ("masked_image", 4))   # LDM LatentInpaintDiffusion concat_keys, in this order
INPAINT_INPUTS = (
    Input("image", "image", "Image to inpaint", required=True, cli="--init-image",
          help="RGB image, used at its own size (width and height must equal it)."),
    Input("mask", "mask", "Mask (white = repaint)", required=True,
          help="Same size as the image; white (>= 50% grey) is repainted, black is kept."),
)
# A1111's options around the model; the app applies them with sd.inpaint's functions, infotext records them.
INPAINT_OPTIONS = (
    Input("mask_blur", "number", "Mask blur", default=4, min=0, max=64,
          help="Gaussian blur radius of the mask in pixels (A1111 'Mask blur')."),
    Input("masked_content", "choice", "Masked content", default="original", choices=MASKED_CONTENT,
          help="What the masked area holds before inpainting: the original pixels, or a fill of the surroundings."),
    Input("inpaint_area", "choice", "Inpaint area", default="whole picture", choices=INPAINT_AREA,
          help="'only masked': crop the mask's box (plus padding) at the output size, then paste it back."),
    Input("masked_padding", "number", "Only masked padding, pixels", default=32, min=0, max=256,
          help="Pixels around the mask's box in 'only masked' mode."),
    Input("paste_back", "bool", "Paste back", default=False,
          help="Keep the original pixels outside the mask (the model's output is kept as is otherwise)."),
)


def inpaint_check(inputs: dict) -> None:
    """Image and mask readable, the same size, the mask not all black (one-line errors saying what to change)."""
    check_mask(load_image(inputs["image"], "image"), load_image(inputs["mask"], "mask"))


def inpaint_concat(parts, spec: ModelSpec, request, generator: torch.Generator) -> Tensor:
    """The 5 concat channels of a 9-channel inpainting UNet: [mask latent (1), masked-image latent (4)].

    m = (mask / 255 >= 0.5) at (H, W); masked image = image * (m < 0.5); its latent is the VAE posterior SAMPLE
    (the family's input-side draw, first from the request's generator); the mask latent is
    F.interpolate(m, (H/f, W/f)) (nearest). Returns (B, 5, h, w), the same in both CFG branches."""
    image = image_to_tensor(load_image(request.inputs["image"], "image"))   # (1, 3, H, W)
    m = mask_to_tensor(load_image(request.inputs["mask"], "mask"))          # (1, 1, H, W) in {0, 1}
    masked = image * (m < 0.5)                                             # (1, 3, H, W)
    z = vae_posterior_sample(parts.vae, masked, spec.latent, generator)     # (1, 4, h, w)
    m_lat = F.interpolate(m, size=z.shape[-2:]).to(z.device)               # (1, 1, h, w)
    return torch.cat([m_lat, z], dim=1).expand(request.batch_size, -1, -1, -1).contiguous()  # (B, 5, h, w)


def with_inpaint(conditioner):
    """A base family's conditioner plus the inpainting concat (identical in cond and uncond). The text side runs
    first; the concat's posterior sample is the first draw from the generator."""

    def condition(parts, spec: ModelSpec, request, generator) -> tuple[dict, dict]:
        cond, uncond = conditioner(parts, spec, request, generator)
        concat = inpaint_concat(parts, spec, request, generator).to(cond["crossattn"].dtype)
        return {**cond, "concat": concat}, {**uncond, "concat": concat}

    return condition


def inpaint_infotext(kw: dict) -> dict[str, str]:
    """A1111's img2img-inpaint fields (`Mask blur`, `Masked content`, `Inpaint area`, `Masked area padding`)."""
    out = {}
    if kw.get("mask_blur") is not None:
        out["Mask blur"] = str(int(kw["mask_blur"]))
    if kw.get("masked_content") is not None:
        out["Masked content"] = str(kw["masked_content"])
    if kw.get("inpaint_area") is not None:
        out["Inpaint area"] = {"only masked": "Only masked", "whole picture": "Whole picture"}.get(
            kw["inpaint_area"], str(kw["inpaint_area"]))
        if kw["inpaint_area"] == "only masked" and kw.get("masked_padding") is not None:
            out["Masked area padding"] = str(int(kw["masked_padding"]))
    return out


# ------------------------------------------------------------------------------------------- the SD 1.x/2.x latent

# LDM kl-f8 first stage as SD 1.x and 2.x were trained on it (Rombach et al. 2022, scale_factor 0.18215).
SD_LATENT = LatentFormat(scale=0.18215, shift=0.0, channels=4, factor=8)
# ComfyUI's least-squares latent -> RGB fit for this latent (`comfy/latent_formats.py`, SD15.latent_rgb_factors).
SD_RGB = (((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177)),
          (0.0, 0.0, 0.0))
