"""The unCLIP image embedder: an OpenCLIP / OpenAI CLIP vision tower (Radford et al. 2021, "Learning Transferable
Visual Models From Natural Language Supervision"; ViT: Dosovitskiy et al. 2021) built with open_clip's own
`VisionTransformer` from numbers read from the checkpoint's shapes plus the few the shapes cannot tell (below), and
the preprocessing of the reference embedders.

Reference: Stability-AI/stablediffusion `ldm/modules/encoders/modules.py` FrozenOpenCLIPImageEmbedder (ViT-H/14,
sd21-unclip-h) and ClipImageEmbedder (ViT-L/14, sd21-unclip-l): `kornia.geometry.resize(x, (224, 224),
interpolation="bicubic", align_corners=True, antialias=True)`, then `(x + 1) / 2` and the CLIP mean/std, then
`model.visual(x)` (the projected class token). kornia's antialiasing (kornia/geometry/transform/affwarp.py `resize`):
when shrinking by factor f per axis, a Gaussian blur with sigma = max((f - 1) / 2, 0.001), kernel
int(max(4 sigma, 3)) made odd, reflect padding, before the interpolation. kornia is not a dependency: restated here.

Tensors live under `embedder.model.visual.*` with open_clip's names, so `load_state_dict(strict=True)` is the check.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)   # open_clip OPENAI_DATASET_MEAN (both embedders use it)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 224


@dataclass(frozen=True)
class VisionConfig:
    """open_clip VisionTransformer numbers. From shapes: width, patch, image size, layers, mlp width, output dim.
    Not in shapes: the head width (open_clip model_configs: ViT-H-14 80, ViT-L-14 64) and the activation (OpenAI's
    ViT-L/14 QuickGELU, OpenCLIP's ViT-H/14 GELU): the family says which."""

    width: int = 1280
    patch_size: int = 14
    image_size: int = 224
    layers: int = 32
    mlp: int = 5120
    output_dim: int = 1024
    head_width: int = 80
    quick_gelu: bool = False

    @property
    def heads(self) -> int:
        return max(1, self.width // self.head_width)


def vision_config(shapes: dict[str, tuple[int, ...]], prefix: str, head_width: int, quick_gelu: bool) -> VisionConfig:
    """The vision tower's numbers from the shapes under `prefix` (e.g. "embedder.model.visual.")."""
    width, _, patch, _ = shapes[prefix + "conv1.weight"]
    tokens = shapes[prefix + "positional_embedding"][0]                 # 1 + (image / patch)^2
    rx = re.compile(re.escape(prefix + "transformer.resblocks.") + r"(\d+)\.")
    layers = len({m.group(1) for k in shapes if (m := rx.match(k))})
    return VisionConfig(width=width, patch_size=patch, image_size=int(round(math.sqrt(tokens - 1))) * patch,
                        layers=layers, mlp=shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0],
                        output_dim=shapes[prefix + "proj"][1], head_width=head_width, quick_gelu=quick_gelu)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): OpenAI CLIP's activation."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def build_vision_tower(cfg: VisionConfig, device=None) -> nn.Module:
    """open_clip's VisionTransformer with these numbers (on `device`; "meta" builds without memory)."""
    from open_clip.transformer import LayerNorm, VisionTransformer

    with torch.device(device or "cpu"):
        return VisionTransformer(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.width,
                                 layers=cfg.layers, heads=cfg.heads, mlp_ratio=cfg.mlp / cfg.width,
                                 output_dim=cfg.output_dim, act_layer=QuickGELU if cfg.quick_gelu else nn.GELU,
                                 norm_layer=LayerNorm)


def gaussian_kernel1d(size: int, sigma: float) -> Tensor:
    """kornia get_gaussian_kernel1d (odd size): exp(-x^2 / (2 sigma^2)) over x = -size//2 .. size//2, normalised."""
    x = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-x.pow(2) / (2 * sigma**2))
    return g / g.sum()


def antialiased_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """kornia.geometry.resize(x, size, interpolation="bicubic", align_corners=True, antialias=True).
    x (B, C, H, W) -> (B, C, h, w)."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    factors = (h / size[0], w / size[1])
    if max(factors) > 1:
        sig = (max((factors[0] - 1) / 2, 0.001), max((factors[1] - 1) / 2, 0.001))
        ks = [int(max(4.0 * s, 3)) for s in sig]
        ks = [k if k % 2 else k + 1 for k in ks]
        ky, kx = gaussian_kernel1d(ks[0], sig[0]), gaussian_kernel1d(ks[1], sig[1])
        c = x.shape[1]
        x = F.pad(x, (ks[1] // 2, ks[1] // 2, ks[0] // 2, ks[0] // 2), mode="reflect")
        kernel = (ky[:, None] * kx[None, :]).to(x)[None, None].expand(c, 1, -1, -1)   # (C, 1, ky, kx)
        x = F.conv2d(x, kernel, groups=c)                                               # (B, C, H, W)
    return F.interpolate(x, size=size, mode="bicubic", align_corners=True)


def clip_preprocess(x: Tensor, size: int = CLIP_SIZE) -> Tensor:
    """The embedders' preprocess: x (B, 3, H, W) in [-1, 1] -> antialiased bicubic to size x size, (x + 1) / 2,
    then (x - CLIP_MEAN) / CLIP_STD. Returns (B, 3, size, size)."""
    x = antialiased_resize(x, (size, size))
    x = (x + 1.0) / 2.0
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device)[None, :, None, None]
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device)[None, :, None, None]
    return (x - mean) / std


@torch.no_grad()
def image_embedding(tower: nn.Module, x: Tensor) -> Tensor:
    """x (B, 3, H, W) in [-1, 1] -> the projected image embedding (B, output_dim), float32."""
    p = next(tower.parameters())
    size = tower.image_size[0] if isinstance(tower.image_size, tuple) else tower.image_size
    return tower(clip_preprocess(x.float(), size).to(p.device, p.dtype)).float()
