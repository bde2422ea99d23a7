"""The LDM / SGM `openaimodel.UNetModel` of SD1, SD2 (and its variants) and SDXL, in plain PyTorch.

Module attribute names equal the checkpoint keys with `model.diffusion_model.` stripped, so
`UNetModel(cfg).load_state_dict(sd, strict=True)` is the format check. Layout (Rombach et al. 2022,
"High-Resolution Image Synthesis with Latent Diffusion Models"; SDXL: Podell et al. 2023):

    time_embed.{0,2}                       sinusoidal(t) -> Linear -> SiLU -> Linear  (mc -> 4mc)
    label_emb                              Embedding (x4 upscaler) or .0.{0,2} Seq(Linear, SiLU, Linear) (adm)
    input_blocks.0.0                       conv_in
    input_blocks.N.{0 ResBlock, 1 SpatialTransformer?} / input_blocks.N.0.op  Downsample
                                           (resblock_updown: input_blocks.N.0 / output_blocks.N.{1|2} are ResBlocks)
                                           (the unconditional LDMs: 1 = AttentionBlock, `cfg.legacy_attention`)
    middle_block.{0 ResBlock, 1 SpatialTransformer, 2 ResBlock}
    output_blocks.N.{0 ResBlock, 1 SpatialTransformer?, 1|2 Upsample}
    out.{0 GroupNorm, 2 conv}

Any latent size works: each Upsample interpolates to the size of the skip connection it is
concatenated with next (as diffusers passes `upsample_size`), so odd sizes round-trip.
Attention runs through `F.scaled_dot_product_attention`; set `USE_XFORMERS = True` to use
xformers' memory-efficient kernel when it is installed (it is imported only then).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sd.config import UNetConfig

Tensor = torch.Tensor

USE_XFORMERS = False  # opt-in; xformers is imported lazily only when this is True and it is installed


# ----------------------------------------------------------------------------------------------------
# functions


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000) -> Tensor:
    """Sinusoidal timestep embedding of LDM / ADM (Vaswani et al. 2017, cos half first).

    t: (B,) float timesteps (may be fractional). Returns (B, dim) float32:
    [cos(t * f_0..f_{half-1}), sin(...)] with f_i = max_period^(-i/half); zero-padded if dim is odd.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Multi-head softmax(q k^T / sqrt(d)) v.  q (B, Tq, H*d), k/v (B, Tk, H*d) -> (B, Tq, H*d)."""
    b, tq, inner = q.shape
    d = inner // heads
    if USE_XFORMERS and q.is_cuda:
        try:
            import xformers.ops as xops  # optional, only when asked for
        except ImportError:
            xops = None
        if xops is not None:
            q, k, v = (x.reshape(b, x.shape[1], heads, d) for x in (q, k, v))  # (B, T, H, d)
            return xops.memory_efficient_attention(q, k, v).reshape(b, tq, inner)
    q, k, v = (x.reshape(b, x.shape[1], heads, d).transpose(1, 2) for x in (q, k, v))  # (B, H, T, d)
    out = F.scaled_dot_product_attention(q, k, v)  # (B, H, Tq, d)
    return out.transpose(1, 2).reshape(b, tq, inner)


# ----------------------------------------------------------------------------------------------------
# layers (names follow ldm/modules/diffusionmodules/openaimodel.py and ldm/modules/attention.py)


class ResBlock(nn.Module):
    """GN-SiLU-conv, + Linear(emb) per channel, GN-SiLU-(dropout)-conv, + skip (1x1 conv if widths differ).

    openaimodel's options (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", sec. 3; LDM churches /
    inpainting_big): `scale_shift` (use_scale_shift_norm): emb_layers give 2 * out channels split into (scale, shift)
    and h = out_norm(h) * (1 + scale) + shift replaces the addition; `updown` "down" / "up" (resblock_updown): the
    block resamples (2x2 average pooling / nearest x2, or to `size`) both h (between in_layers' SiLU and its conv)
    and the skip input x."""

    def __init__(self, ch: int, emb_ch: int, out_ch: int, dd: dict, scale_shift: bool = False,
                 updown: str | None = None):
        super().__init__()
        self.scale_shift, self.updown = scale_shift, updown
        self.in_layers = nn.Sequential(
            nn.GroupNorm(32, ch, **dd), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1, **dd))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, 2 * out_ch if scale_shift else out_ch, **dd))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(32, out_ch, **dd), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_ch, out_ch, 3, padding=1, **dd))
        self.skip_connection = nn.Identity() if ch == out_ch else nn.Conv2d(ch, out_ch, 1, **dd)

    def _resample(self, x: Tensor, size: tuple[int, int] | None) -> Tensor:
        if self.updown == "down":
            return F.avg_pool2d(x, 2)                                   # (B, C, H/2, W/2)
        return F.interpolate(x, size=tuple(size) if size is not None else None,
                             scale_factor=None if size is not None else 2.0, mode="nearest")

    def forward(self, x: Tensor, emb: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if self.updown:
            h = self._resample(self.in_layers[:-1](x), size)
            x = self._resample(x, size)
            h = self.in_layers[-1](h)  # (B, out, H', W')
        else:
            h = self.in_layers(x)  # (B, out, H, W)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]        # (B, out or 2 out, 1, 1)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv, padding 1 (ceil(H/2) x ceil(W/2))."""

    def __init__(self, ch: int, dd: dict):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to `size` (default x2), then a 3x3 conv."""

    def __init__(self, ch: int, dd: dict):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1, **dd)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if size is None:
            size = (x.shape[-2] * 2, x.shape[-1] * 2)
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class CrossAttention(nn.Module):
    """to_q / to_k / to_v (no bias), multi-head attention, to_out.0 Linear (+ to_out.1 Dropout)."""

    def __init__(self, dim: int, context_dim: int, heads: int, dim_head: int, dd: dict):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False, **dd)
        self.to_k = nn.Linear(context_dim, inner, bias=False, **dd)
        self.to_v = nn.Linear(context_dim, inner, bias=False, **dd)
        self.to_out = nn.Sequential(nn.Linear(inner, dim, **dd), nn.Dropout(0.0))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        ctx = x if context is None else context.to(x.dtype)  # (B, Tk, Cc)
        return self.to_out(attention(self.to_q(x), self.to_k(ctx), self.to_v(ctx), self.heads))


class GEGLU(nn.Module):
    """proj: Linear(dim, 2*inner); out = a * gelu(gate) (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, dim: int, inner: int, dd: dict):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2, **dd)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """net = [GEGLU(dim, 4dim), Dropout, Linear(4dim, dim)]."""

    def __init__(self, dim: int, dd: dict):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim, dd), nn.Dropout(0.0), nn.Linear(4 * dim, dim, **dd))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """x += attn1(norm1 x); x += attn2(norm2 x, context); x += ff(norm3 x).

    disable_self_attn (x4 upscaler): attn1 takes its keys/values from the context as well.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, disable_self_attn: bool, dd: dict):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else dim, heads, dim_head, dd)
        self.ff = FeedForward(dim, dd)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dd)
        self.norm1 = nn.LayerNorm(dim, **dd)
        self.norm2 = nn.LayerNorm(dim, **dd)
        self.norm3 = nn.LayerNorm(dim, **dd)

    def forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        x = x + self.attn1(self.norm1(x), context if self.disable_self_attn else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm (eps 1e-6), proj_in (1x1 conv or Linear), `depth` transformer blocks on (B, HW, C), proj_out, + x."""

    def __init__(self, ch: int, heads: int, dim_head: int, depth: int, context_dim: int,
                 disable_self_attn: bool, use_linear: bool, dd: dict):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, ch, eps=1e-6, **dd)
        self.proj_in = nn.Linear(ch, inner, **dd) if use_linear else nn.Conv2d(ch, inner, 1, **dd)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, disable_self_attn, dd) for _ in range(depth))
        self.proj_out = nn.Linear(inner, ch, **dd) if use_linear else nn.Conv2d(inner, ch, 1, **dd)

    def forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        if not self.use_linear:
            y = self.proj_in(y)  # (B, inner, H, W)
        y = y.flatten(2).transpose(1, 2)  # (B, HW, C or inner)
        if self.use_linear:
            y = self.proj_in(y)  # (B, HW, inner)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.use_linear:
            y = self.proj_out(y)  # (B, HW, C)
        y = y.transpose(1, 2).reshape(b, -1, h, w)  # (B, C or inner, H, W)
        if not self.use_linear:
            y = self.proj_out(y)
        return x + y


class AttentionBlock(nn.Module):
    """openaimodel's legacy self-attention (Rombach et al. 2022's unconditional and super-resolution LDMs):
    norm (GroupNorm 32, computed in float32), qkv (1x1 conv1d, C -> 3C), QKVAttentionLegacy, proj_out (1x1 conv1d),
    + x. Legacy head order: qkv (B, 3C, T) is reshaped to (B * heads, 3 * C/heads, T) and split into q, k, v."""

    def __init__(self, ch: int, heads: int, dd: dict):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(32, ch, **dd)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1, **dd)
        self.proj_out = nn.Conv1d(ch, ch, 1, **dd)

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)                                              # (B, C, T)
        qkv = self.qkv(self.norm(x.float()).to(x.dtype))                     # (B, 3C, T)
        d = c // self.heads
        q, k, v = qkv.reshape(b * self.heads, 3 * d, -1).split(d, dim=1)     # each (B*heads, d, T)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B*h, T, d)
        h = self.proj_out(a.transpose(1, 2).reshape(b, c, -1))               # (B, C, T)
        return (x + h).reshape(b, c, *spatial)


def run_block(block: nn.ModuleList, h: Tensor, emb: Tensor, context: Tensor | None,
              up_size: tuple[int, int] | None = None) -> Tensor:
    """Apply one `input_blocks.N` / `middle_block` / `output_blocks.N` list (LDM's TimestepEmbedSequential)."""
    for layer in block:
        if isinstance(layer, ResBlock):
            h = layer(h, emb, up_size if layer.updown == "up" else None)
        elif isinstance(layer, SpatialTransformer):
            h = layer(h, context)
        elif isinstance(layer, Upsample):
            h = layer(h, up_size)
        else:
            h = layer(h)
    return h


# ----------------------------------------------------------------------------------------------------
# the model


class UNetModel(nn.Module):
    """LDM/SGM UNet. forward(x, timesteps, context, y) -> model output (eps, v, ...), same size as x."""

    def __init__(self, cfg: UNetConfig, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.cfg = cfg
        mc, levels = cfg.model_channels, len(cfg.channel_mult)
        depth = tuple(cfg.transformer_depth) or (0,) * levels
        no_sa = tuple(cfg.disable_self_attn) or (False,) * levels
        assert len(depth) == levels and len(no_sa) == levels, "per-level tuples must match channel_mult"
        emb_ch = 4 * mc
        ss = cfg.use_scale_shift_norm

        def transformer(ch: int, d: int, disable_sa: bool) -> nn.Module:
            heads, dim_head = cfg.heads(ch)
            if cfg.legacy_attention:
                return AttentionBlock(ch, heads, dd)
            return SpatialTransformer(ch, heads, dim_head, d, cfg.context_dim, disable_sa,
                                      cfg.use_linear_in_transformer, dd)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch, **dd), nn.SiLU(), nn.Linear(emb_ch, emb_ch, **dd))
        if cfg.num_classes > 0:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_ch, **dd)
        elif cfg.adm_in_channels > 0:
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(cfg.adm_in_channels, emb_ch, **dd), nn.SiLU(), nn.Linear(emb_ch, emb_ch, **dd)))

        # way down: remember the width of every skip connection
        self.input_blocks = nn.ModuleList([nn.ModuleList([nn.Conv2d(cfg.in_channels, mc, 3, padding=1, **dd)])])
        skips, ch = [mc], mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_ch, mc * mult, dd, ss)]
                ch = mc * mult
                if depth[level] > 0:
                    layers.append(transformer(ch, depth[level], no_sa[level]))
                self.input_blocks.append(nn.ModuleList(layers))
                skips.append(ch)
            if level != levels - 1:
                down = ResBlock(ch, emb_ch, ch, dd, ss, "down") if cfg.resblock_updown else Downsample(ch, dd)
                self.input_blocks.append(nn.ModuleList([down]))
                skips.append(ch)

        middle = [ResBlock(ch, emb_ch, ch, dd, ss)]
        if cfg.transformer_depth_middle > 0:
            middle.append(transformer(ch, cfg.transformer_depth_middle, False))
        middle.append(ResBlock(ch, emb_ch, ch, dd, ss))
        self.middle_block = nn.ModuleList(middle)

        # way up: num_res_blocks + 1 blocks per level, each concatenating one skip
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            out_ch = mc * cfg.channel_mult[level]
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), emb_ch, out_ch, dd, ss)]
                ch = out_ch
                if depth[level] > 0:
                    layers.append(transformer(ch, depth[level], no_sa[level]))
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(ResBlock(ch, emb_ch, ch, dd, ss, "up") if cfg.resblock_updown else Upsample(ch, dd))
                self.output_blocks.append(nn.ModuleList(layers))

        self.out = nn.Sequential(nn.GroupNorm(32, ch, **dd), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1, **dd))

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor | None = None, y: Tensor | None = None) -> Tensor:
        """x (B, in_channels, h, w); timesteps (B,) float; context (B, T, context_dim);
        y (B, adm_in_channels) float for adm models or (B,) long for num_classes models.
        Returns (B, out_channels, h, w)."""
        dtype = self.time_embed[0].weight.dtype
        t = timesteps.reshape(-1).expand(x.shape[0]) if timesteps.numel() == 1 else timesteps
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(dtype))  # (B, 4mc)
        if self.cfg.num_classes > 0:
            assert y is not None, "this UNet needs y (class / noise-level index)"
            emb = emb + self.label_emb(y.long())
        elif self.cfg.adm_in_channels > 0:
            assert y is not None, "this UNet needs y (adm vector)"
            emb = emb + self.label_emb(y.to(dtype))

        h = x.to(dtype)
        hs = []
        for block in self.input_blocks:
            h = run_block(block, h, emb, context)
            hs.append(h)
        h = run_block(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)  # (B, ch + skip, H, W)
            up_size = hs[-1].shape[-2:] if hs else None  # size of the skip the next block concatenates
            h = run_block(block, h, emb, context, up_size)
        return self.out(h).to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# full-size configs of the released families (documentation and tests; real configs come from sd.detect)

_SD2 = dict(context_dim=1024, num_head_channels=64, use_linear_in_transformer=True)


def unet_config_for(family: str) -> UNetConfig:
    """UNetConfig of a released family: sd1, sd2, sd2-inpaint, sd2-depth, sd2-x4-upscaler, sd2-unclip-h,
    sdxl-base, sdxl-refiner (numbers from the public inference yamls)."""
    table = {
        "sd1": dict(),
        "sd2": dict(_SD2),
        "sd2-inpaint": dict(_SD2, in_channels=9),
        "sd2-depth": dict(_SD2, in_channels=5),
        "sd2-unclip-h": dict(_SD2, adm_in_channels=2048),
        "sd2-x4-upscaler": dict(in_channels=7, model_channels=256, channel_mult=(1, 2, 2, 4),
                                transformer_depth=(0, 1, 1, 1), context_dim=1024, num_heads=8,
                                use_linear_in_transformer=True, num_classes=1000,
                                disable_self_attn=(True, True, True, False)),
        "sdxl-base": dict(channel_mult=(1, 2, 4), transformer_depth=(0, 2, 10), transformer_depth_middle=10,
                          context_dim=2048, num_head_channels=64, use_linear_in_transformer=True,
                          adm_in_channels=2816),
        "sdxl-refiner": dict(model_channels=384, channel_mult=(1, 2, 4, 4), transformer_depth=(0, 4, 4, 0),
                             transformer_depth_middle=4, context_dim=1280, num_head_channels=64,
                             use_linear_in_transformer=True, adm_in_channels=2560),
    }
    if family not in table:
        raise KeyError(f"unknown UNet family {family!r}; known: {sorted(table)}")
    return UNetConfig(**table[family])
