"""The VQ first stage: taming-transformers' `VQModel` (Esser et al. 2021, "Taming Transformers for High-Resolution
Image Synthesis"), which latent diffusion reuses as its VQ-regularised autoencoder (Rombach et al. 2022, "High-
Resolution Image Synthesis with Latent Diffusion Models"; `ldm.models.autoencoder.VQModel` / `VQModelInterface`).

Module attribute names equal the checkpoint keys (standalone files: no prefix; inside an LDM checkpoint:
`first_stage_model.` stripped): `encoder.*`, `decoder.*` (the same Encoder/Decoder as `sd.vae`, single z),
`quant_conv`, `quantize.embedding` (the codebook), `post_quant_conv`. The training-only `loss.*` tensors are not
part of the model (`sd.checkpoint.IGNORE_RULES`).

    encode(x):   quant_conv(encoder(x))                         (B, e, H/f, W/f), NOT quantized (VQModelInterface)
    quantize(h): nearest codebook row by squared distance        (B, e, h, w), indices (B, h, w)
    decode(h):   decoder(post_quant_conv(quantize(h)))           (B, 3, h*f, w*f): LDM's decode_first_stage
    round trip:  decode(encode(x))  = decoder(post_quant_conv(quantize(quant_conv(encoder(x)))))
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sd.config import VAEConfig, VQConfig
from sd.vae import AutoencoderKL, Decoder, Encoder

Tensor = torch.Tensor

# Elements of one (rows, n_embed, e) difference block in `nearest_code`: bounds its memory (64 MiB in float32).
_CHUNK_ELEMENTS = 2 ** 24


def nearest_code(z: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest codebook row for every vector: argmin_j sum_c (z_c - e_jc)^2, ties to the lowest j.

    z: (N, e); codebook: (n_embed, e). Returns (N,) int64. The squared distances are computed directly (not by
    the |z|^2 + |e|^2 - 2 z.e expansion taming uses, which can reorder near ties by rounding), in float32, in
    row chunks so memory stays bounded for 16384-row codebooks; torch.argmin returns the first minimum."""
    z = z.float()
    e = codebook.float().to(z.device)
    rows = max(1, _CHUNK_ELEMENTS // max(1, e.shape[0] * e.shape[1]))
    out = []
    for i in range(0, z.shape[0], rows):
        d = (z[i:i + rows, None, :] - e[None]).pow(2).sum(-1)  # (rows, n_embed)
        out.append(d.argmin(dim=1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=z.device)


class VectorQuantizer(nn.Module):
    """taming's `VectorQuantizer2` at inference: `embedding` (n_embed, e); no remap (no `used` buffer)."""

    def __init__(self, n_embed: int, embed_dim: int, dd: dict):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim, **dd)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """h (B, e, h, w) -> (z_q (B, e, h, w) the nearest codebook rows, indices (B, h, w) int64)."""
        b, e, hh, ww = h.shape
        flat = h.permute(0, 2, 3, 1).reshape(-1, e)                   # (B*h*w, e)
        idx = nearest_code(flat, self.embedding.weight)              # (B*h*w,)
        zq = self.embedding.weight[idx].to(h.dtype)                   # (B*h*w, e)
        return zq.reshape(b, hh, ww, e).permute(0, 3, 1, 2).contiguous(), idx.reshape(b, hh, ww)


class VQModel(nn.Module):
    """encoder, quant_conv (z -> e), quantize (codebook), post_quant_conv (e -> z), decoder."""

    def __init__(self, cfg: VQConfig, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.cfg = cfg
        self.encoder = Encoder(cfg, dd)
        self.decoder = Decoder(cfg, dd)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, dd)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1, **dd)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1, **dd)

    def encode(self, x: Tensor) -> Tensor:
        """x (B, 3, H, W) in [-1, 1] -> pre-quantization latent (B, e, H/f, W/f) (LDM's VQModelInterface.encode)."""
        x = x.to(self.encoder.conv_in.weight.dtype)
        return self.quant_conv(self.encoder(x))

    def encode_codes(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x -> (quantized latent (B, e, h, w), code indices (B, h, w)) (taming's VQModel.encode)."""
        return self.quantize(self.encode(x))

    def decode_code_latent(self, zq: Tensor) -> Tensor:
        """Already quantized (B, e, h, w) -> image (B, 3, h*f, w*f)."""
        return self.decoder(self.post_quant_conv(zq.to(self.post_quant_conv.weight.dtype)))

    def decode(self, h: Tensor) -> Tensor:
        """Latent (B, e, h, w), quantized or not -> image (B, 3, h*f, w*f): quantize to the nearest code first,
        then post_quant_conv and the decoder (LDM's decode_first_stage of a VQ first stage)."""
        zq, _ = self.quantize(h.to(self.post_quant_conv.weight.dtype))
        return self.decode_code_latent(zq)

    def decode_indices(self, idx: Tensor) -> Tensor:
        """Code indices (B, h, w) -> image (B, 3, h*f, w*f)."""
        zq = F.embedding(idx, self.quantize.embedding.weight).permute(0, 3, 1, 2)  # (B, e, h, w)
        return self.decode_code_latent(zq)


def build_first_stage(cfg: VAEConfig, device=None, dtype=None) -> nn.Module:
    """The first-stage module of a config: `VQModel` for a VQConfig, else `sd.vae.AutoencoderKL`."""
    if isinstance(cfg, VQConfig):
        return VQModel(cfg, device=device, dtype=dtype)
    return AutoencoderKL(cfg, device=device, dtype=dtype)
