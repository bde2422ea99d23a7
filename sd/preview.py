"""Cheap latent -> RGB preview: one 4x3 linear map per latent format, no VAE.

The factors are each family's `preview` field (`sd.families`): the least-squares fits ComfyUI ships
(`comfy/latent_formats.py`, `latent_rgb_factors`) for the diffusion-scale latents of SD 1.x/2.x and SDXL:
`rgb = latent . factors + bias`, in [-1, 1] roughly. Applied to the
sampler's current denoised estimate it shows the composition a few steps in, for the cost of one matmul.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

Tensor = torch.Tensor

from .families import get_family
from .families.common import SD_RGB
from .families.sdxl import RGB as SDXL_RGB

# (4 latent channels, 3 RGB) per latent format, and an RGB bias (kept under these names for callers and tests).
SD_FACTORS, SD_BIAS = SD_RGB
SDXL_FACTORS, SDXL_BIAS = SDXL_RGB


def rgb_factors(family: str) -> tuple[Tensor, Tensor]:
    """(factors (C, 3), bias (3,)) for a family's latent format."""
    factors, bias = get_family(family).preview
    return torch.tensor(factors), torch.tensor(bias)


def latent_to_rgb(latent: Tensor, family: str) -> Tensor:
    """(C, h, w) or (B, C, h, w) diffusion-scale latent -> uint8 (h, w, 3) of the first item."""
    if latent.ndim == 4:
        latent = latent[0]
    factors, bias = rgb_factors(family)
    rgb = torch.einsum("chw,cr->hwr", latent.detach().float().cpu(), factors) + bias  # (h, w, 3) in ~[-1, 1]
    return torch.round(((rgb + 1) / 2).clamp(0, 1) * 255).to(torch.uint8)


def preview_image(latent: Tensor, family: str, size: tuple[int, int] | None = None) -> Image.Image:
    """A PIL preview, scaled (nearest) to `size` = (width, height) when given."""
    img = Image.fromarray(np.ascontiguousarray(latent_to_rgb(latent, family).numpy()))
    return img.resize(size, Image.NEAREST) if size else img


def preview_every(total: int, previews: int = 8) -> int:
    """Steps between previews so that a run shows about `previews` of them."""
    return max(1, round(total / previews))
