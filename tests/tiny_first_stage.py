"""Tiny first-stage files (taming VQGAN, LDM VQ / KL autoencoders) in the exact key layout of the released ones.

`tiny_first_stage_state_dict(name)` detects the config from `tests/data/checkpoint-keys/<name>.json`, keeps the
structure (levels, blocks, attention levels, mid attention, VQ or KL) and shrinks the widths (ch 32, at most 8
latent channels, a 64-row codebook); a few `loss.*` tensors are added as the released training files carry them.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from sd.config import VQConfig
from sd.first_stage import detect_first_stage_file
from sd.vq import build_first_stage

from .tiny import _random_like, reference_shapes

TINY_CODES = 64


def tiny_first_stage_config(name: str):
    """The released config of `name` with widths shrunk (structure kept)."""
    _, cfg = detect_first_stage_file(reference_shapes(name))
    z = min(cfg.z_channels, 8)
    if isinstance(cfg, VQConfig):
        return replace(cfg, ch=32, z_channels=z, embed_dim=min(cfg.embed_dim, 8), n_embed=TINY_CODES)
    return replace(cfg, ch=32, z_channels=z, embed_dim=min(cfg.embed_dim, 8))


def tiny_first_stage_state_dict(name: str, seed: int = 0, prefix: str = "", loss: bool = True) -> dict:
    cfg = tiny_first_stage_config(name)
    g = torch.Generator().manual_seed(seed)
    sd = {prefix + k: _random_like(k, tuple(v.shape), g)
          for k, v in build_first_stage(cfg, device="meta").state_dict().items()}
    if loss:  # training-only tensors of the released files (LPIPS / discriminator / logvar)
        sd[prefix + "loss.logvar"] = torch.zeros(())
        sd[prefix + "loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4, generator=g)
    return sd


def write_tiny_first_stage(name: str, path: Path, seed: int = 0) -> Path:
    sd = tiny_first_stage_state_dict(name, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"state_dict": sd}, path)
    return path


def sample_image(size: tuple[int, int] = (64, 48), seed: int = 0):
    """A smooth colour test image (gradients plus a disc), uint8 RGB."""
    import numpy as np
    from PIL import Image

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 255 * xx / max(1, w - 1)
    g = 255 * yy / max(1, h - 1)
    b = 255 * ((xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (min(w, h) / 3) ** 2)
    rng = np.random.default_rng(seed)
    arr = np.stack([r, g, b], -1) + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
