"""First stages on their own: load the autoencoder of any file and measure what it keeps of an image.

The first stage is where the series begins: taming-transformers' VQGAN (Esser et al. 2021, "Taming Transformers for
High-Resolution Image Synthesis") and latent diffusion's VQ / KL autoencoders (Rombach et al. 2022, "High-Resolution
Image Synthesis with Latent Diffusion Models"), reused as the VAE of SD 1.x / 2.x / SDXL / SD3.

`load_first_stage(path or Checkpoint)` takes a standalone first-stage file (keys `encoder.*`, `decoder.*`,
`quantize.*`, `quant_conv.*`, no prefix; the training `loss.*` tensors ignored by their named rule) or the
`first_stage_model.*` part of any checkpoint. Every tensor under the first stage's prefix must load (strict).
`round_trip(first_stage, image)` encodes and decodes one image at its own size, pinned as in the reference code:

    x = uint8 / 127.5 - 1                                               (1, 3, H, W)
    VQ: decoder(post_quant_conv(quantize(quant_conv(encoder(x)))))        nearest code by squared distance
    KL: decoder(post_quant_conv(mean of quant_conv(encoder(x))))          the posterior mode, no sampling

and reports PSNR and SSIM against the input, the grid size and factor, and for VQ the code-index map (drawn as an
image) and how many distinct codes of the codebook it uses; for KL the latent channels drawn as images.
"""
from __future__ import annotations

import colorsys
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .checkpoint import Checkpoint, CheckpointError, ignore_reason, open_checkpoint
from .config import VAEConfig, VQConfig
from .families.shapes import VAE, describe_contents, detect_first_stage
from .vq import build_first_stage

Tensor = torch.Tensor

# The released LDM KL first stages' latent channels per factor (kl-f4: 3, kl-f8: 4, kl-f16: 16, kl-f32: 64);
# another count is named in the kind (SD3's 16-channel f8 VAE: "ldm-kl-f8-16ch").
_KL_CHANNELS = {4: 3, 8: 4, 16: 16, 32: 64}


@dataclass
class FirstStage:
    """A loaded first stage: its module, config, what it is and where it came from."""

    model: nn.Module                    # sd.vq.VQModel or sd.vae.AutoencoderKL, eval, no grad
    cfg: VAEConfig                      # a VQConfig for VQ first stages
    kind: str                           # "vqgan-f16-1024", "vqgan-f4-8192-noattn", "ldm-kl-f8", ...
    path: Path
    prefix: str                         # "" (standalone file) or "first_stage_model."
    device: torch.device
    dtype: torch.dtype

    @property
    def is_vq(self) -> bool:
        return isinstance(self.cfg, VQConfig)

    @property
    def factor(self) -> int:
        return self.cfg.factor

    @property
    def standalone(self) -> bool:
        return self.prefix == ""


def kind_of(cfg: VAEConfig) -> str:
    """The name of a first-stage layout, from its structure and codebook size (never from a width)."""
    if isinstance(cfg, VQConfig):
        return f"vqgan-f{cfg.factor}-{cfg.n_embed}" + ("" if cfg.mid_attn else "-noattn")
    name = f"ldm-kl-f{cfg.factor}"
    return name if _KL_CHANNELS.get(cfg.factor) == cfg.embed_dim else f"{name}-{cfg.embed_dim}ch"


def first_stage_prefix(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """"" for a standalone first-stage file, "first_stage_model." for a checkpoint that carries one, else None."""
    if "encoder.conv_in.weight" in shapes and "decoder.conv_out.weight" in shapes:
        return ""
    if VAE + "encoder.conv_in.weight" in shapes and VAE + "decoder.conv_out.weight" in shapes:
        return VAE
    return None


def detect_first_stage_file(shapes: dict[str, tuple[int, ...]]) -> tuple[str, VAEConfig]:
    """(prefix, config) of the first stage in `{key: shape}`; CheckpointError (one line) when there is none."""
    prefix = first_stage_prefix(shapes)
    if prefix is None:
        raise CheckpointError("no first stage (encoder.* / decoder.*, or first_stage_model.*) in the file; give a "
                              f"VQGAN / LDM autoencoder or a checkpoint that includes its VAE. Found: "
                              f"{describe_contents(shapes)}")
    return prefix, detect_first_stage(shapes, prefix)


def _check_keys(ckpt: Checkpoint, prefix: str, model: nn.Module) -> None:
    """Strict accounting: the file's tensors under the prefix are exactly the model's (plus ignored ones); for a
    standalone file, every tensor of the file."""
    shapes = ckpt.shapes()
    want = {prefix + k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(k for k in want if k not in shapes)
    wrong = sorted(f"{k} {list(shapes[k])} != {list(s)}" for k, s in want.items() if k in shapes and shapes[k] != s)
    scope = [k for k in shapes if k.startswith(prefix)] if prefix else list(shapes)
    extra = sorted(k for k in scope if k not in want and ignore_reason(k) is None)
    problems = [f"{what} {len(v)} tensors: {', '.join(v[:4])}{' ...' if len(v) > 4 else ''}"
                for what, v in (("missing", missing), ("wrong shapes of", wrong), ("unexpected", extra)) if v]
    if problems:
        raise CheckpointError(f"{ckpt.path.name}: first stage: " + "; ".join(problems)
                              + " (the file is damaged or not a first stage of a known layout)")


def load_first_stage(source: str | os.PathLike | Checkpoint, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> FirstStage:
    """The first stage of a standalone VQ/KL file or of any checkpoint with `first_stage_model.*`, loaded strictly."""
    ckpt = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    prefix, cfg = detect_first_stage_file(ckpt.shapes())
    model = build_first_stage(cfg, device="meta")
    _check_keys(ckpt, prefix, model)
    tensors = {k: v for k, v in ckpt.tensors(prefix).items() if k in model.state_dict()}
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt.path.name}: first stage: {str(e).splitlines()[0][:300]}") from None
    device = torch.device(device)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return FirstStage(model, cfg, kind_of(cfg), Path(ckpt.path), prefix, device, dtype)


# ------------------------------------------------------------------------------------------------ measures


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images (H, W, C), in dB over all channels: 10 log10(255^2 / MSE);
    inf for identical images."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def _gaussian(size: int, sigma: float) -> Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: np.ndarray, b: np.ndarray, window: int = 11, sigma: float = 1.5) -> float:
    """Structural similarity (Wang, Bovik, Sheikh & Simoncelli 2004, "Image Quality Assessment: From Error
    Visibility to Structural Similarity", eq. 13) of two uint8 images (H, W, C): local means, variances and the
    covariance under an 11x11 Gaussian window (sigma 1.5, weights summing to 1), C1 = (0.01 * 255)^2,
    C2 = (0.03 * 255)^2, the SSIM map over the positions where the window fits inside the image ("valid"), averaged
    over positions and channels. A side under 11 pixels uses the largest odd window that fits."""
    x = torch.from_numpy(a.astype(np.float64)).permute(2, 0, 1)[:, None]  # (C, 1, H, W)
    y = torch.from_numpy(b.astype(np.float64)).permute(2, 0, 1)[:, None]
    size = min(window, x.shape[-2], x.shape[-1])
    size -= 1 - size % 2
    g = _gaussian(size, sigma)
    k = (g[:, None] * g[None, :])[None, None]                              # (1, 1, s, s)
    blur = lambda t: F.conv2d(t, k)                                         # noqa: E731 - valid positions only
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    m = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(m.mean())


def code_map_image(idx: np.ndarray, scale: int = 1) -> Image.Image:
    """Code indices (h, w) drawn as colours (index i -> hue frac(i * 0.618...), so neighbouring indices differ),
    each code cell `scale` pixels wide."""
    hues = (idx.astype(np.float64) * 0.6180339887498949) % 1.0
    rgb = np.array([colorsys.hsv_to_rgb(h, 0.65, 0.95) for h in hues.reshape(-1)]).reshape(*idx.shape, 3)
    img = Image.fromarray(np.round(rgb * 255).astype(np.uint8))
    return img.resize((idx.shape[1] * scale, idx.shape[0] * scale), Image.NEAREST)


def channel_images(z: Tensor, scale: int = 1) -> list[Image.Image]:
    """Latent (C, h, w) -> one grey image per channel, each stretched from its own min (black) to max (white)."""
    out = []
    for c in z.float().cpu():
        lo, hi = float(c.min()), float(c.max())
        v = (c - lo) / (hi - lo) if hi > lo else torch.zeros_like(c)
        img = Image.fromarray(np.round(v.numpy() * 255).astype(np.uint8))
        out.append(img.resize((c.shape[1] * scale, c.shape[0] * scale), Image.NEAREST))
    return out


def _to_uint8(x: Tensor) -> np.ndarray:
    """(1, 3, H, W) roughly in [-1, 1] -> (H, W, 3) uint8: round(clamp((x + 1) / 2, 0, 1) * 255)."""
    return torch.round(((x[0].float().cpu() + 1) / 2).clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()


@torch.no_grad()
def round_trip(fs: FirstStage, image: Image.Image | str | os.PathLike) -> dict:
    """Encode and decode `image` at its own size (cropped at the bottom/right to a multiple of the factor).

    Returns a dict: kind, vq, factor, grid (h, w), size (W, H), cropped (bool), psnr, ssim, reconstruction (PIL),
    and for VQ: codes (h, w) int64 array, code_map (PIL), codes_used, codebook_size; for KL: latent_channels
    (list of PIL), latent_range (min, max). Raises ValueError (one line) for an image smaller than the factor."""
    img = (Image.open(image) if not isinstance(image, Image.Image) else image).convert("RGB")
    f = fs.factor
    if img.width < f or img.height < f:
        raise ValueError(f"the image is {img.width}x{img.height} but the {fs.kind} first stage downsamples by {f}: "
                         f"give an image of at least {f}x{f} pixels (better {8 * f}x{8 * f} or more)")
    w, h = img.width // f * f, img.height // f * f
    cropped = (w, h) != img.size
    arr = np.asarray(img.crop((0, 0, w, h)) if cropped else img, dtype=np.uint8)      # (H, W, 3)
    x = torch.from_numpy(arr.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]   # (1, 3, H, W)
    x = x.to(fs.device, fs.dtype)
    out: dict = {"kind": fs.kind, "vq": fs.is_vq, "factor": f, "size": (w, h), "cropped": cropped}
    if fs.is_vq:
        zq, idx = fs.model.encode_codes(x)                       # (1, e, h, w), (1, h, w)
        rec = fs.model.decode_code_latent(zq)                    # (1, 3, H, W)
        codes = idx[0].cpu().numpy()
        out.update(codes=codes, code_map=code_map_image(codes, f), codes_used=int(np.unique(codes).size),
                   codebook_size=fs.cfg.n_embed)
        grid = codes.shape
    else:
        z = fs.model.encode(x)                                   # (1, e, h, w): the posterior mean (mode)
        rec = fs.model.decode(z)
        out.update(latent_channels=channel_images(z[0], f), latent_range=(float(z.min()), float(z.max())))
        grid = tuple(z.shape[-2:])
    rec_u8 = _to_uint8(rec)
    out.update(grid=(int(grid[0]), int(grid[1])), psnr=psnr(arr, rec_u8), ssim=ssim(arr, rec_u8),
               reconstruction=Image.fromarray(rec_u8))
    return out


def summary(result: dict) -> dict:
    """The JSON-able numbers of a round_trip result (no images, no arrays)."""
    keys = ("kind", "vq", "factor", "grid", "size", "cropped", "psnr", "ssim", "codes_used", "codebook_size",
            "latent_range")
    out = {k: result[k] for k in keys if k in result}
    out["psnr"] = round(out["psnr"], 4) if math.isfinite(out["psnr"]) else "inf"
    out["ssim"] = round(out["ssim"], 6)
    out["grid"], out["size"] = list(out["grid"]), list(out["size"])
    return out
