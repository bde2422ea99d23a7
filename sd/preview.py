"""Cheap latent -> RGB preview: one 4x3 linear map per latent format, no VAE.

The factors are the least-squares fits ComfyUI ships (`comfy/latent_formats.py`, `latent_rgb_factors`) for the
diffusion-scale latents of SD 1.x/2.x and SDXL: `rgb = latent . factors + bias`, in [-1, 1] roughly. Applied to the
sampler's current denoised estimate it shows the composition a few steps in, for the cost of one matmul.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

Tensor = torch.Tensor

# (4 latent channels, 3 RGB) per latent format, and an RGB bias.
SD_FACTORS = ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721),
              (-0.2120, -0.2616, -0.7177))
SD_BIAS = (0.0, 0.0, 0.0)
SDXL_FACTORS = ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362),
                (-0.3165, -0.2492, -0.2188))
SDXL_BIAS = (0.1084, -0.0175, -0.0011)


def rgb_factors(family: str) -> tuple[Tensor, Tensor]:
    """(factors (4, 3), bias (3,)) for a family's latent format."""
    if family.startswith("sdxl"):
        return torch.tensor(SDXL_FACTORS), torch.tensor(SDXL_BIAS)
    return torch.tensor(SD_FACTORS), torch.tensor(SD_BIAS)


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
