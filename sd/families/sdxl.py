"""SDXL (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis").

- `sdxl-base`: crossattn = cat(CLIP-L penultimate, OpenCLIP bigG penultimate), no final LN -> (B, 77k, 2048);
  vector = [pooled bigG (projected EOT token), Fourier(orig h, orig w, crop top, crop left, target h, target w)]
  (sec. 2.2 micro-conditioning; 256 features each) -> (B, 1280 + 6 * 256).
- `sdxl-inpaint` (sd_xl_base_1.0_inpainting_0.1): the base's text side, 9-channel UNet with the inpainting concat.
- `sdxl-refiner` (sec. 2.5): bigG only -> (B, 77k, 1280); vector = [pooled, Fourier(orig h, w, crop top, left,
  aesthetic score)] -> (B, 1280 + 5 * 256); continues the base's latents for the last steps.
An empty negative prompt gives zeros (crossattn and pooled), as SGM's reference sampling does. A1111's opt-in "Clip
skip SDXL" (GenerateParams.sdxl_clip_l_skip) makes the base's CLIP-L take hidden_states[-clip_skip]; bigG never moves.
Recognised by: SGM `conditioner.embedders.N` towers (base: CLIP-L + bigG; refiner: bigG alone, with a vector).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..config import LatentFormat
from .common import (INPAINT_CONCAT, INPAINT_INPUTS, INPAINT_OPTIONS, batched, fourier, inpaint_check,
                     inpaint_infotext, text_pair, with_inpaint)
from .family import Family
from .shapes import detect_vae, has, hf_text, openclip_text

E0, E1 = "conditioner.embedders.0.", "conditioner.embedders.1."
FOURIER_DIM = 256           # width of each size / crop / aesthetic embedding
EMPTY_NEGATIVE = "zeros"    # SGM: an empty negative prompt is zeros, not the encoded ""
LATENT = LatentFormat(scale=0.13025, shift=0.0, channels=4, factor=8)  # sd_xl_base.yaml scale_factor
# ComfyUI's SDXL latent -> RGB fit (`comfy/latent_formats.py`, SDXL.latent_rgb_factors / latent_rgb_factors_bias).
RGB = (((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188)),
       (0.1084, -0.0175, -0.0011))


@dataclass(frozen=True)
class SDXLSizes:
    """SDXL micro-conditioning, in pixels (h, w) order as the SGM reference stores them."""

    original: tuple[int, int]
    crop: tuple[int, int] = (0, 0)          # (top, left)
    target: tuple[int, int] | None = None   # base only; defaults to the output size
    aesthetic: float = 6.0                  # refiner only
    negative_aesthetic: float = 2.5


def sizes_of(request) -> SDXLSizes:
    """The request's SDXL fields, original and target defaulting to the output size (height, width)."""
    out = (request.height, request.width)
    return SDXLSizes(original=tuple(request.sdxl_original_size or out), crop=tuple(request.sdxl_crop),
                     target=tuple(request.sdxl_target_size or out), aesthetic=request.aesthetic_score,
                     negative_aesthetic=request.negative_aesthetic_score)


def pooled_width(texts) -> int:
    return texts[-1].projection_dim or texts[-1].width


def _vector(pooled: torch.Tensor, emb: torch.Tensor, dtype) -> torch.Tensor:
    return torch.cat([pooled[0].float(), emb])[None].to(dtype)   # (1, pooled + n * 256)


def base_condition(parts, spec, request, generator=None) -> tuple[dict, dict]:
    """crossattn (B, 77k, 2048) and vector (B, 2816) for the base (and the inpainting base)."""
    ctx, pooled, nctx, npooled = text_pair(parts, spec, request, EMPTY_NEGATIVE)
    s = sizes_of(request)
    emb = fourier([*s.original, *s.crop, *s.target], ctx.device)   # (6 * 256,), the same in both branches
    cond = {"crossattn": ctx, "vector": _vector(pooled, emb, ctx.dtype)}
    uncond = {"crossattn": nctx, "vector": _vector(npooled, emb, ctx.dtype)}
    return batched(cond, request.batch_size), batched(uncond, request.batch_size)


def refiner_condition(parts, spec, request, generator=None) -> tuple[dict, dict]:
    """crossattn (B, 77k, 1280) and vector (B, 2560): the aesthetic score differs between the branches."""
    ctx, pooled, nctx, npooled = text_pair(parts, spec, request, EMPTY_NEGATIVE)
    s = sizes_of(request)
    base = [*s.original, *s.crop]
    cond = {"crossattn": ctx, "vector": _vector(pooled, fourier(base + [s.aesthetic], ctx.device), ctx.dtype)}
    uncond = {"crossattn": nctx, "vector": _vector(npooled, fourier(base + [s.negative_aesthetic], ctx.device), ctx.dtype)}
    return batched(cond, request.batch_size), batched(uncond, request.batch_size)


def _size_fields(kw: dict, target: bool) -> dict[str, str]:
    oh, ow = kw.get("sdxl_original_size") or (kw["height"], kw["width"])
    crop = kw.get("sdxl_crop") or (0, 0)
    out = {"SDXL original size": f"{int(ow)}x{int(oh)}", "SDXL crop top": str(int(crop[0])),
           "SDXL crop left": str(int(crop[1]))}
    if target:
        th, tw = kw.get("sdxl_target_size") or (kw["height"], kw["width"])
        out["SDXL target size"] = f"{int(tw)}x{int(th)}"
    return out


def _num(v) -> str:
    v = float(v)
    return str(int(v)) if v.is_integer() else f"{v:g}"


def base_infotext(kw: dict) -> dict[str, str]:
    return _size_fields(kw, target=True)


def refiner_infotext(kw: dict) -> dict[str, str]:
    a, n = kw.get("aesthetic_score"), kw.get("negative_aesthetic_score")
    return {**_size_fields(kw, target=False), "Aesthetic score": _num(6.0 if a is None else a),
            "Negative aesthetic score": _num(2.5 if n is None else n)}


def two_towers(shapes, unet) -> bool:
    return has(shapes, E0 + "transformer.") and has(shapes, E1 + "model.")


def build_base(shapes, unet):
    """CLIP-L (penultimate, no LN; clip skip moves it only on the request's opt-in, A1111's "Clip skip SDXL",
    `FrozenCLIPEmbedderForSDXLWithCustomWords`) and bigG (penultimate, no LN, pooled; never moved)."""
    clip_l = replace(hf_text(shapes, E0 + "transformer.", "penultimate", False), clip_skip_opt_in=True)
    return detect_vae(shapes), (clip_l, openclip_text(shapes, E1 + "model.", "penultimate", False, True))


def bigg_alone(shapes, unet) -> bool:
    return has(shapes, E0 + "model.") and not has(shapes, E1) and unet.adm_in_channels > 0


def build_refiner(shapes, unet):
    return detect_vae(shapes), (openclip_text(shapes, E0 + "model.", "penultimate", False, True),)


# The checkpoint card's words (sd.card).
BASE_EVIDENCE = (E0 + "transformer.", E1 + "model.", "model.diffusion_model.label_emb.0.0.weight")
BASE_WORDS = (("crossattn", "CLIP ViT-L/14 ({w0}) and OpenCLIP bigG ({w1}) penultimate layers side by side "
                            "per token, 77 tokens per 75-token chunk"),
              ("vector", "bigG's pooled text ({pooled}) + 6 x 256 Fourier features of the original size (h, w), the "
                         "crop (top, left) and the target size (h, w)"))
INPAINT_WORDS = ("concat", "the mask (1 channel) and the masked image's latent (4), after the noisy latent")

SDXL_BASE = Family(
    name="sdxl-base", label="SDXL base", tab="sdxl", matches=two_towers, build=build_base, latent=LATENT,
    condition=base_condition, vector_width=lambda texts, unet: pooled_width(texts) + 6 * FOURIER_DIM,
    empty_negative=EMPTY_NEGATIVE, default_size=1024, preview=RGB, infotext=base_infotext,
    ays_table="sdxl",
    evidence=BASE_EVIDENCE, conditioning=BASE_WORDS,
    about="adds over SD 2 a 3x larger UNet, a second text encoder (OpenCLIP bigG next to CLIP-L), and a vector "
          "of the pooled text with size and crop micro-conditioning; latent scale 0.13025",
)

SDXL_INPAINT = Family(
    name="sdxl-inpaint", label="SDXL inpainting", tab="inpaint", matches=two_towers, build=build_base, latent=LATENT,
    condition=with_inpaint(base_condition), concat=INPAINT_CONCAT, inputs=INPAINT_INPUTS, options=INPAINT_OPTIONS,
    check=inpaint_check, vector_width=lambda texts, unet: pooled_width(texts) + 6 * FOURIER_DIM,
    empty_negative=EMPTY_NEGATIVE, default_size=1024, preview=RGB,
    infotext=lambda kw: {**base_infotext(kw), **inpaint_infotext(kw)},
    ays_table="sdxl",
    evidence=BASE_EVIDENCE, conditioning=(*BASE_WORDS, INPAINT_WORDS),
    about="the SDXL base retrained for inpainting: adds the mask and the masked image's latent as 5 input channels",
)

SDXL_REFINER = Family(
    name="sdxl-refiner", label="SDXL refiner", tab="sdxl", matches=bigg_alone, build=build_refiner, latent=LATENT,
    condition=refiner_condition, vector_width=lambda texts, unet: pooled_width(texts) + 5 * FOURIER_DIM,
    empty_negative=EMPTY_NEGATIVE, default_size=1024, refines=("sdxl-base",), preview=RGB, infotext=refiner_infotext,
    ays_table="sdxl",
    evidence=(E0 + "model.", "!" + E1, "model.diffusion_model.label_emb.0.0.weight"),
    conditioning=(("crossattn", "OpenCLIP bigG's penultimate layer ({w0}), 77 tokens per 75-token chunk"),
                  ("vector", "bigG's pooled text ({pooled}) + 5 x 256 Fourier features of the original size (h, w), "
                             "the crop (top, left) and the aesthetic score")),
    about="SDXL's second stage: bigG alone, an aesthetic-score vector, trained on the low-noise steps to continue "
          "the base's latents",
)

FAMILIES = (SDXL_BASE, SDXL_INPAINT, SDXL_REFINER)
