"""Prompt -> conditioning tensors for each family (the `cond` / `uncond` dicts the UNet denoiser takes).

- SD1: CLIP-L last layer + final LN -> context (B, 77k, 768).
- SD2: OpenCLIP-H penultimate + final LN -> context (B, 77k, 1024).
- SDXL base: cat(CLIP-L penultimate, bigG penultimate) -> context (B, 77k, 2048); vector y = [pooled bigG,
  Fourier(orig h, orig w, crop top, crop left, target h, target w)] (Podell et al. 2023, SDXL, sec. 2.2).
- SDXL refiner: bigG penultimate -> context (B, 77k, 1280); y = [pooled, Fourier(orig h, w, crop top, left,
  aesthetic score)].
An empty negative prompt gives zeros for SDXL (context and pooled), as the SGM reference does; SD1/SD2 encode it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelSpec
from .text import encode_prompt
from .unet import timestep_embedding

Tensor = torch.Tensor
FOURIER_DIM = 256


@dataclass(frozen=True)
class SDXLSizes:
    """SDXL micro-conditioning, in pixels (h, w) order as the SGM reference stores them."""

    original: tuple[int, int]
    crop: tuple[int, int] = (0, 0)          # (top, left)
    target: tuple[int, int] | None = None   # base only; defaults to the output size
    aesthetic: float = 6.0                  # refiner only
    negative_aesthetic: float = 2.5


def fourier(values: list[float], device=None) -> Tensor:
    """Each value -> a 256-dim sinusoidal embedding (cos first), concatenated: (len(values) * 256,)."""
    v = torch.tensor(values, dtype=torch.float32, device=device)
    return timestep_embedding(v, FOURIER_DIM).reshape(-1)


def _encode(encoders, spec: ModelSpec, text: str, clip_skip: int) -> tuple[Tensor, Tensor | None]:
    """Run every text encoder of the family on `text`: (context (1, 77k, D), pooled (1, P) or None)."""
    hiddens, pooled = [], None
    for enc, cfg in zip(encoders, spec.text_encoders):
        h, p = encode_prompt(enc, text, clip_skip=clip_skip)
        hiddens.append(h)
        if cfg.output_pooled:
            pooled = p
    return torch.cat(hiddens, dim=-1), pooled


def encode_conditions(encoders, spec: ModelSpec, prompt: str, negative: str, batch: int,
                      sizes: SDXLSizes | None = None, clip_skip: int = 1) -> tuple[dict, dict]:
    """(cond, uncond): dicts of UNet inputs with batch dimension `batch` (context, and y for SDXL)."""
    ctx, pooled = _encode(encoders, spec, prompt, clip_skip)
    if spec.family.startswith("sdxl") and not negative:
        nctx, npooled = torch.zeros_like(ctx), (torch.zeros_like(pooled) if pooled is not None else None)
    else:
        nctx, npooled = _encode(encoders, spec, negative, clip_skip)
    cond, uncond = {"context": ctx}, {"context": nctx}
    if spec.unet.adm_in_channels and spec.family.startswith("sdxl"):
        if sizes is None:
            raise ValueError("SDXL needs its size conditioning (SDXLSizes)")
        dev = ctx.device
        if spec.family == "sdxl-refiner":
            base = [*sizes.original, *sizes.crop]
            pos, neg = fourier(base + [sizes.aesthetic], dev), fourier(base + [sizes.negative_aesthetic], dev)
        else:
            pos = neg = fourier([*sizes.original, *sizes.crop, *(sizes.target or sizes.original)], dev)
        cond["y"] = torch.cat([pooled[0].float(), pos])[None].to(ctx.dtype)      # (1, adm)
        uncond["y"] = torch.cat([npooled[0].float(), neg])[None].to(ctx.dtype)   # (1, adm)
    elif spec.unet.adm_in_channels:
        raise ValueError(f"{spec.family}: vector conditioning for this family is not implemented yet")
    expand = lambda d: {k: v.expand(batch, *v.shape[1:]).contiguous() for k, v in d.items()}  # noqa: E731
    return expand(cond), expand(uncond)
