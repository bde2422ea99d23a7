"""The LDM first-stage `AutoencoderKL` (Rombach et al. 2022; KL-regularised autoencoder, Kingma & Welling 2014).

Module attribute names equal the checkpoint keys with `first_stage_model.` stripped
(`encoder.down.0.block.0.norm1.weight`, `quant_conv.weight`, `decoder.mid.attn_1.q.weight`, ...), so
`AutoencoderKL(cfg).load_state_dict(sd, strict=True)` is the format check (`loss.*` keys of training
checkpoints are not part of the model: drop them first). Names follow
`ldm/modules/diffusionmodules/model.py` (Encoder, Decoder, ResnetBlock, AttnBlock).

encode: x (B,3,H,W) in [-1,1] -> latent mean (B, embed_dim, H/f, W/f), unscaled;
decode: unscaled latent -> (B,3,h*f,w*f). Latent scaling (`LatentFormat`) is the caller's job.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sd.config import VAEConfig, VQConfig

Tensor = torch.Tensor


def _norm(ch: int, dd: dict) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=1e-6, **dd)


class ResnetBlock(nn.Module):
    """norm1-swish-conv1, norm2-swish-(dropout)-conv2, + x (nin_shortcut 1x1 conv when widths differ)."""

    def __init__(self, ch: int, out_ch: int, dd: dict):
        super().__init__()
        self.norm1 = _norm(ch, dd)
        self.conv1 = nn.Conv2d(ch, out_ch, 3, padding=1, **dd)
        self.norm2 = _norm(out_ch, dd)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, **dd)
        if ch != out_ch:
            self.nin_shortcut = nn.Conv2d(ch, out_ch, 1, **dd)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions with 1x1-conv q, k, v, proj_out."""

    def __init__(self, ch: int, dd: dict):
        super().__init__()
        self.norm = _norm(ch, dd)
        self.q = nn.Conv2d(ch, ch, 1, **dd)
        self.k = nn.Conv2d(ch, ch, 1, **dd)
        self.v = nn.Conv2d(ch, ch, 1, **dd)
        self.proj_out = nn.Conv2d(ch, ch, 1, **dd)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).reshape(b, 1, c, h * w).transpose(2, 3) for m in (self.q, self.k, self.v))  # (B, 1, HW, C)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), scale C^-1/2
        return x + self.proj_out(y.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Pad right/bottom by one, then a stride-2 3x3 conv without padding (LDM's asymmetric downsample)."""

    def __init__(self, ch: int, dd: dict):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv."""

    def __init__(self, ch: int, dd: dict):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(ch: int, dd: dict, attn: bool = True) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(ch, ch, dd)
    mid.attn_1 = AttnBlock(ch, dd) if attn else nn.Identity()  # LDM attn_type "none": an Identity, no tensors
    mid.block_2 = ResnetBlock(ch, ch, dd)
    return mid


def _level(blocks: list[nn.Module], attns: list[nn.Module] = ()) -> nn.Module:
    lvl = nn.Module()
    lvl.block = nn.ModuleList(blocks)
    lvl.attn = nn.ModuleList(attns)  # SD autoencoders have none; LDM's f16/f32 and VQ f8/f16 have one per block
    return lvl


def _run_level(lvl: nn.Module, h: Tensor) -> Tensor:
    """block[j], each followed by attn[j] when the level has attention (LDM Encoder/Decoder order)."""
    for j, block in enumerate(lvl.block):
        h = block(h)
        if len(lvl.attn):
            h = lvl.attn[j](h)
    return h


class Encoder(nn.Module):
    """conv_in, down[i].block[j] (+ down[i].downsample), mid, norm_out, conv_out -> 2*z_channels (mean, logvar)."""

    def __init__(self, cfg: VAEConfig, dd: dict):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1, **dd)
        self.down = nn.ModuleList()
        ch = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(ch, cfg.ch * mult, dd))
                ch = cfg.ch * mult
            lvl = _level(blocks, [AttnBlock(ch, dd) for _ in blocks] if i in cfg.attn_levels else [])
            if i != len(cfg.ch_mult) - 1:
                lvl.downsample = Downsample(ch, dd)
            self.down.append(lvl)
        self.mid = _mid(ch, dd, cfg.mid_attn)
        self.norm_out = _norm(ch, dd)
        z_out = cfg.z_channels if isinstance(cfg, VQConfig) else 2 * cfg.z_channels  # VQ: no double_z
        self.conv_out = nn.Conv2d(ch, z_out, 3, padding=1, **dd)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for lvl in self.down:
            h = _run_level(lvl, h)
            if hasattr(lvl, "downsample"):
                h = lvl.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2z, H/f, W/f); VQ: (B, z, H/f, W/f)


class Decoder(nn.Module):
    """conv_in, mid, up[i] for i = last..0 (num_res_blocks+1 blocks, + up[i].upsample for i > 0), norm_out, conv_out."""

    def __init__(self, cfg: VAEConfig, dd: dict):
        super().__init__()
        ch = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1, **dd)
        self.mid = _mid(ch, dd, cfg.mid_attn)
        ups = []
        for i in reversed(range(len(cfg.ch_mult))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(ch, cfg.ch * cfg.ch_mult[i], dd))
                ch = cfg.ch * cfg.ch_mult[i]
            lvl = _level(blocks, [AttnBlock(ch, dd) for _ in blocks] if i in cfg.attn_levels else [])
            if i != 0:
                lvl.upsample = Upsample(ch, dd)
            ups.insert(0, lvl)  # stored by level index, as LDM does
        self.up = nn.ModuleList(ups)
        self.norm_out = _norm(ch, dd)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1, **dd)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)  # (B, ch_last, h, w)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for lvl in reversed(self.up):
            h = _run_level(lvl, h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, h*f, w*f)


class AutoencoderKL(nn.Module):
    """encoder, decoder, quant_conv (2e -> 2e), post_quant_conv (e -> z) when cfg.use_quant_conv."""

    def __init__(self, cfg: VAEConfig, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.cfg = cfg
        self.encoder = Encoder(cfg, dd)
        self.decoder = Decoder(cfg, dd)
        if cfg.use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1, **dd)
            self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1, **dd)

    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B,3,H,W) in [-1,1] -> (mean, logvar), each (B, embed_dim, H/f, W/f); logvar clamped to [-30, 20]."""
        dtype = self.encoder.conv_in.weight.dtype
        moments = self.encoder(x.to(dtype))  # (B, 2z, h, w)
        if self.cfg.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: Tensor) -> Tensor:
        """x (B,3,H,W) in [-1,1] -> latent mean (B, embed_dim, H/f, W/f), unscaled."""
        return self.encode_moments(x)[0]

    def decode(self, z: Tensor) -> Tensor:
        """z (B, embed_dim, h, w) unscaled latent -> image (B, 3, h*f, w*f), roughly in [-1, 1]."""
        z = z.to(self.decoder.conv_in.weight.dtype)
        if self.cfg.use_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def vae_config_for(kind: str) -> VAEConfig:
    """VAEConfig of a released first stage: "kl-f8" (SD1/SD2/SDXL), "kl-f4" (x4 upscaler),
    "kl-f8-16ch" (SD3/3.5: 16 latent channels, no quant convs)."""
    table = {
        "kl-f8": VAEConfig(),
        "kl-f4": VAEConfig(ch_mult=(1, 2, 4)),
        "kl-f8-16ch": VAEConfig(z_channels=16, embed_dim=16, use_quant_conv=False),
    }
    if kind not in table:
        raise KeyError(f"unknown VAE kind {kind!r}; known: {sorted(table)}")
    return table[kind]



def _ramp_weights(n: int, starts: list[int], tile: int) -> list[Tensor]:
    """1-D blending weights of each tile along one axis (pixels): 1 inside, a linear ramp over the part shared
    with a neighbour (rising from the previous tile, falling into the next); overlapping weights sum to 1."""
    out = []
    for i, s in enumerate(starts):
        size = min(tile, n - s)
        w = torch.ones(size)
        if i > 0:  # shared with the previous tile over [s, previous end)
            shared = starts[i - 1] + tile - s
            w[:shared] = torch.arange(1, shared + 1) / (shared + 1)
        if i + 1 < len(starts):  # shared with the next tile over [next start, s + size)
            shared = s + size - starts[i + 1]
            w[size - shared:] = torch.minimum(w[size - shared:], torch.arange(shared, 0, -1) / (shared + 1))
        out.append(w)
    return out


def _tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of `tile` covering [0, n), neighbours sharing at least `overlap`; the last ends at n."""
    if n <= tile:
        return [0]
    return list(range(0, n - tile, tile - overlap)) + [n - tile]


def decode_tiled(vae: AutoencoderKL, z: Tensor, tile: int = 64, overlap: int = 16) -> Tensor:
    """`vae.decode(z)` tile by tile (latent tiles of `tile` x `tile`, neighbours sharing `overlap` latent pixels),
    blended linearly across each overlap, as ComfyUI's tiled VAE decode does: the peak memory of one tile instead
    of the whole image. Not exact: pixels near a tile border see less context (the decoder's receptive field and
    its mid-block attention stop at the tile). With one tile covering the latent it is exactly `vae.decode(z)`.
    z (B, C, h, w) unscaled latent -> (B, 3, h*f, w*f) float32."""
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile); got tile {tile}, overlap {overlap}")
    b, _, h, w = z.shape
    ys, xs = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
    if len(ys) == 1 and len(xs) == 1:
        return vae.decode(z).float()
    out = weight = wy = wx = None
    for iy, y0 in enumerate(ys):
        for ix, x0 in enumerate(xs):
            part = vae.decode(z[:, :, y0:y0 + tile, x0:x0 + tile]).float()  # (B, 3, th*f, tw*f)
            if out is None:
                f = part.shape[-1] // min(tile, w - x0)  # pixels per latent pixel
                out = torch.zeros(b, part.shape[1], h * f, w * f, device=part.device)
                weight = torch.zeros(h * f, w * f, device=part.device)
                wy = [v.to(part.device) for v in _ramp_weights(h * f, [y * f for y in ys], tile * f)]
                wx = [v.to(part.device) for v in _ramp_weights(w * f, [x * f for x in xs], tile * f)]
            m = wy[iy][:, None] * wx[ix][None, :]  # (th*f, tw*f)
            ph, pw = part.shape[-2:]
            out[:, :, y0 * f:y0 * f + ph, x0 * f:x0 * f + pw] += part * m
            weight[y0 * f:y0 * f + ph, x0 * f:x0 * f + pw] += m
            del part
    return out / weight
