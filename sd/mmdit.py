"""MMDiT, the multimodal diffusion transformer of SD3 / SD3.5, in plain PyTorch.

Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (SD3): image
patches and text tokens keep separate weights (a `x_block` and a `context_block` per layer) but attend jointly,
one softmax over the concatenated sequence; every sub-layer is modulated by adaLN from the timestep + pooled
text vector. SD3.5 (Stability AI's SD3.5 release notes and reference code `mmditx.py`) adds RMS qk-norm in every
attention, and SD3.5 medium's MMDiT-X adds, in its first layers, a second self-attention over the image tokens
alone (`x_block.attn2`, with its own three adaLN chunks: nine instead of six).

Module attribute names equal the checkpoint keys with `model.diffusion_model.` stripped, so
`MMDiT(cfg).load_state_dict(sd, strict=True)` is the format check:

    pos_embed                               (1, max*max, D) buffer, taken from the file (never recomputed)
    x_embedder.proj                         Conv2d(in, D, p, stride p): patches -> tokens
    t_embedder.mlp.{0,2}                    sinusoidal(t, 256) -> Linear -> SiLU -> Linear
    y_embedder.mlp.{0,2}                    pooled text vector (adm) -> Linear -> SiLU -> Linear
    context_embedder                        Linear(context width, D)
    joint_blocks.N.{context_block,x_block}  .attn.{qkv, proj, ln_q, ln_k}  .attn2.* (MMDiT-X)
                                            .mlp.{fc1, fc2}  .adaLN_modulation.1
    final_layer.{adaLN_modulation.1, linear}

The numbers come from tensor shapes, as the reference does (`mmdit_config_for`): patch size from
`x_embedder.proj.weight`, depth = its out channels / 64 (hidden = 64 * depth, heads = depth), pos_embed size,
adm and context widths; qk-norm and the MMDiT-X layers from which keys exist. The last joint block's context
block is "pre-only": it only feeds keys/values into the last joint attention (no proj, no mlp, two adaLN chunks).

forward(x, t, context, y, skip_layers) returns the flow (velocity) prediction; `skip_layers` leaves the listed
joint blocks out (skip-layer guidance, sd/slg.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor

HEAD_DIM = 64  # the reference's "magic": hidden = 64 * depth, heads = depth


# ----------------------------------------------------------------------------------------------------
# config, read from shapes


@dataclass(frozen=True)
class MMDiTConfig:
    """An MMDiT as the file's shapes describe it."""

    depth: int = 24                            # joint blocks; hidden = 64 * depth, heads = depth
    patch_size: int = 2                        # x_embedder.proj kernel = stride
    in_channels: int = 16                      # latent channels
    out_channels: int = 16                     # final_layer.linear out / patch^2
    pos_embed_max_size: int = 192              # pos_embed holds a max x max grid of patches (3.5 medium: 384)
    adm_in_channels: int = 2048                # pooled vector width (CLIP-L 768 + CLIP-G 1280); 0 = no y_embedder
    context_dim: int = 4096                    # context_embedder input width (T5-XXL)
    mlp_hidden: int = 6144                     # mlp.fc1 width (4 * hidden)
    qk_norm: str | None = None                 # "rms" (SD3.5: ln_q / ln_k RMSNorm over each head) or None (SD3)
    x_block_self_attn_layers: tuple[int, ...] = ()  # MMDiT-X: joint blocks with x_block.attn2 (3.5 medium: 0..12)

    @property
    def hidden(self) -> int:
        return HEAD_DIM * self.depth

    @property
    def heads(self) -> int:
        return self.depth


def mmdit_config_for(shapes: dict[str, tuple[int, ...]], prefix: str = "model.diffusion_model.") -> MMDiTConfig:
    """MMDiTConfig read from a file's {key: shape} (keys under `prefix`), the way sd3_impls.BaseModel does.

    Raises ValueError naming what is missing or inconsistent."""
    def shape(name: str) -> tuple[int, ...]:
        if prefix + name not in shapes:
            raise ValueError(f"not an MMDiT: {prefix + name} is missing")
        return tuple(shapes[prefix + name])

    hidden, in_ch, p, _ = shape("x_embedder.proj.weight")
    if hidden % HEAD_DIM:
        raise ValueError(f"MMDiT hidden width {hidden} is not a multiple of {HEAD_DIM}")
    depth = hidden // HEAD_DIM
    blocks = {int(k[len(prefix):].split(".")[1]) for k in shapes if k.startswith(prefix + "joint_blocks.")}
    if blocks != set(range(depth)):
        raise ValueError(f"MMDiT of width {hidden} needs joint_blocks 0..{depth - 1}; the file has "
                         f"{len(blocks)} ({min(blocks, default=None)}..{max(blocks, default=None)})")
    n_pos = shape("pos_embed")[1]
    max_size = math.isqrt(n_pos)
    if max_size * max_size != n_pos:
        raise ValueError(f"pos_embed holds {n_pos} positions, not a square grid")
    adm = tuple(shapes[prefix + "y_embedder.mlp.0.weight"])[1] if prefix + "y_embedder.mlp.0.weight" in shapes else 0
    qk = "rms" if prefix + "joint_blocks.0.x_block.attn.ln_q.weight" in shapes else None
    dual = tuple(i for i in range(depth) if prefix + f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes)
    return MMDiTConfig(
        depth=depth, patch_size=p, in_channels=in_ch, out_channels=shape("final_layer.linear.weight")[0] // (p * p),
        pos_embed_max_size=max_size, adm_in_channels=adm, context_dim=shape("context_embedder.weight")[1],
        mlp_hidden=shape("joint_blocks.0.x_block.mlp.fc1.weight")[0], qk_norm=qk, x_block_self_attn_layers=dual)


# ----------------------------------------------------------------------------------------------------
# functions


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000) -> Tensor:
    """DiT's sinusoidal embedding, cos half first: t (B,) float -> (B, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x (B, L, D) * (1 + scale) + shift, with shift/scale (B, D) per sample."""
    return x * (1 + scale[:, None]) + shift[:, None]


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over heads: q/k/v (B, L, H, d) -> (B, L, H*d)."""
    b, lq, h, d = q.shape
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, L, d)
    return out.transpose(1, 2).reshape(b, lq, h * d)


def layer_norm(x: Tensor) -> Tensor:
    """The blocks' parameter-free LayerNorm (eps 1e-6)."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


# ----------------------------------------------------------------------------------------------------
# layers (names follow the checkpoint: mmditx.py SelfAttention / DismantledBlock / JointBlock / FinalLayer)


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim (eps 1e-6); SD3.5's qk-norm over each head's 64 channels."""

    def __init__(self, dim: int, dd: dict):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, **dd))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight.to(x.dtype)


class Embedder(nn.Module):
    """mlp = Linear(in, D), SiLU, Linear(D, D) (TimestepEmbedder / VectorEmbedder)."""

    def __init__(self, in_dim: int, dim: int, dd: dict):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, dim, **dd), nn.SiLU(), nn.Linear(dim, dim, **dd))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class PatchEmbed(nn.Module):
    """proj: Conv2d(in, D, p, stride p); (B, C, H, W) -> (B, H/p * W/p, D), row-major patches."""

    def __init__(self, in_ch: int, dim: int, patch: int, dd: dict):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, patch, stride=patch, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class SelfAttention(nn.Module):
    """qkv Linear(D, 3D); ln_q / ln_k RMSNorm per head (qk_norm "rms"); proj Linear(D, D) unless pre-only."""

    def __init__(self, dim: int, heads: int, qk_norm: str | None, pre_only: bool, dd: dict):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, **dd)
        if not pre_only:
            self.proj = nn.Linear(dim, dim, **dd)
        if qk_norm == "rms":
            self.ln_q = RMSNorm(dim // heads, dd)
            self.ln_k = RMSNorm(dim // heads, dd)
        elif qk_norm is not None:
            raise ValueError(f"unsupported qk_norm {qk_norm!r}")

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, D) -> q, k, v each (B, L, H, d), q and k normalised per head when the file has qk-norm."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).unbind(2)  # (B, L, H, d) each
        if hasattr(self, "ln_q"):
            q, k = self.ln_q(q), self.ln_k(k)
        return q, k, v


class Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2."""

    def __init__(self, dim: int, hidden: int, dd: dict):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, **dd)
        self.fc2 = nn.Linear(hidden, dim, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DismantledBlock(nn.Module):
    """One stream (image or text) of a joint block: adaLN-modulated attention inputs before the joint attention
    (`pre`), gated residual attention output and MLP after it (`post`).

    adaLN chunks: 6 = shift/scale/gate of attention, then of the MLP; 9 (MMDiT-X) = those + shift/scale/gate of
    the image-only attn2; 2 (pre-only) = shift/scale of attention."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, qk_norm: str | None, pre_only: bool, dual: bool,
                 dd: dict):
        super().__init__()
        assert not (pre_only and dual), "a pre-only block has no second attention"
        self.pre_only, self.dual = pre_only, dual
        self.attn = SelfAttention(dim, heads, qk_norm, pre_only, dd)
        if dual:
            self.attn2 = SelfAttention(dim, heads, qk_norm, False, dd)
        if not pre_only:
            self.mlp = Mlp(dim, mlp_hidden, dd)
        n_mods = 2 if pre_only else 9 if dual else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, n_mods * dim, **dd))

    def pre(self, x: Tensor, c: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, ...]]:
        """x (B, L, D), c (B, D) -> (q, k, v) for the joint attention, and the modulations for `post`."""
        mods = self.adaLN_modulation(c).chunk(2 if self.pre_only else 9 if self.dual else 6, dim=1)  # (B, D) each
        h = layer_norm(x)  # (B, L, D)
        return self.attn.qkv_heads(modulate(h, mods[0], mods[1])), (h,) + mods

    def post(self, x: Tensor, attn_out: Tensor, state: tuple[Tensor, ...]) -> Tensor:
        """x (B, L, D) + gate * proj(joint attention output (B, L, D)) [+ MMDiT-X attn2] + gate * mlp."""
        h, _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = state[:7]
        x = x + gate_msa[:, None] * self.attn.proj(attn_out)
        if self.dual:
            shift2, scale2, gate2 = state[7:10]
            # the second attention sees the block's input (normed, own modulation), image tokens only
            out2 = attention(*self.attn2.qkv_heads(modulate(h, shift2, scale2)))  # (B, L, D)
            x = x + gate2[:, None] * self.attn2.proj(out2)
        return x + gate_mlp[:, None] * self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """context_block + x_block: one attention over [context tokens; image tokens], each stream its own weights."""

    def __init__(self, cfg: MMDiTConfig, index: int, dd: dict):
        super().__init__()
        pre_only = index == cfg.depth - 1
        self.context_block = DismantledBlock(cfg.hidden, cfg.heads, cfg.mlp_hidden, cfg.qk_norm, pre_only, False, dd)
        self.x_block = DismantledBlock(cfg.hidden, cfg.heads, cfg.mlp_hidden, cfg.qk_norm, False,
                                       index in cfg.x_block_self_attn_layers, dd)

    def forward(self, context: Tensor, x: Tensor, c: Tensor) -> tuple[Tensor | None, Tensor]:
        """context (B, Lc, D), x (B, Lx, D), c (B, D) -> (context or None after the pre-only block, x)."""
        cq, c_state = self.context_block.pre(context, c)
        xq, x_state = self.x_block.pre(x, c)
        lc = context.shape[1]
        out = attention(*(torch.cat([a, b], dim=1) for a, b in zip(cq, xq)))  # (B, Lc + Lx, D)
        x = self.x_block.post(x, out[:, lc:], x_state)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.post(context, out[:, :lc], c_state), x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) on a parameter-free LayerNorm, then linear to patch*patch*out channels."""

    def __init__(self, dim: int, out_dim: int, dd: dict):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, **dd))
        self.linear = nn.Linear(dim, out_dim, **dd)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (B, D) each
        return self.linear(modulate(layer_norm(x), shift, scale))  # (B, L, p*p*C)


# ----------------------------------------------------------------------------------------------------
# the model


class MMDiT(nn.Module):
    """SD3 / SD3.5 MMDiT. forward(x, t, context, y, skip_layers) -> velocity, same size as x."""

    def __init__(self, cfg: MMDiTConfig, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.cfg = cfg
        d, p = cfg.hidden, cfg.patch_size
        self.register_buffer("pos_embed", torch.zeros(1, cfg.pos_embed_max_size ** 2, d, **dd))  # from the file
        self.x_embedder = PatchEmbed(cfg.in_channels, d, p, dd)
        self.t_embedder = Embedder(256, d, dd)
        if cfg.adm_in_channels:
            self.y_embedder = Embedder(cfg.adm_in_channels, d, dd)
        self.context_embedder = nn.Linear(cfg.context_dim, d, **dd)
        self.joint_blocks = nn.ModuleList(JointBlock(cfg, i, dd) for i in range(cfg.depth))
        self.final_layer = FinalLayer(d, p * p * cfg.out_channels, dd)

    def cropped_pos_embed(self, h: int, w: int) -> Tensor:
        """The file's table cropped to an h x w patch grid, centred: top = (max - h) // 2, left = (max - w) // 2.
        Returns (1, h*w, D)."""
        m = self.cfg.pos_embed_max_size
        if h > m or w > m:
            raise ValueError(f"a {h}x{w} patch grid exceeds this model's position table ({m}x{m} patches)")
        top, left = (m - h) // 2, (m - w) // 2
        grid = self.pos_embed.reshape(1, m, m, -1)[:, top:top + h, left:left + w]  # (1, h, w, D)
        return grid.reshape(1, h * w, -1)

    def forward(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None,
                skip_layers: tuple[int, ...] | list[int] = ()) -> Tensor:
        """x (B, C, H, W) latent; t (B,) or scalar float timestep (1000 * sigma); context (B, T, context_dim);
        y (B, adm) pooled vector; skip_layers: indices of joint blocks to leave out. Returns (B, out, H, W).

        A latent whose sides are not multiples of the patch is padded (circularly, as ComfyUI does) and the
        output cropped back."""
        dtype = self.x_embedder.proj.weight.dtype
        b, _, H, W = x.shape
        p = self.cfg.patch_size
        ph, pw = -H % p, -W % p
        h = x.to(dtype)
        if ph or pw:
            h = F.pad(h, (0, pw, 0, ph), mode="circular")
        gh, gw = (H + ph) // p, (W + pw) // p
        tokens = self.x_embedder(h) + self.cropped_pos_embed(gh, gw).to(dtype)  # (B, N, D)
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t
        c = self.t_embedder(timestep_embedding(t).to(dtype))  # (B, D)
        if self.cfg.adm_in_channels:
            if y is None:
                raise ValueError("this MMDiT needs y (the pooled text vector)")
            c = c + self.y_embedder(y.to(dtype))
        ctx = self.context_embedder(context.to(dtype))  # (B, T, D)
        skip = set(int(i) for i in skip_layers)
        for i, block in enumerate(self.joint_blocks):
            if i in skip:
                continue
            ctx, tokens = block(ctx, tokens, c)
        out = self.final_layer(tokens, c)  # (B, N, p*p*C)
        co = self.cfg.out_channels
        out = out.reshape(b, gh, gw, p, p, co).permute(0, 5, 1, 3, 2, 4).reshape(b, co, gh * p, gw * p)
        return out[:, :, :H, :W].to(x.dtype)


def mmdit_net(model: MMDiT):
    """The MMDiT as net(x_in, t, crossattn, vector, skip_layers) in the SGM conditioner's language (see
    sd.denoiser.make_denoiser): `crossattn` (B, T, D) is the context, `vector` (B, adm) the pooled y."""

    def net(x: Tensor, t: Tensor, crossattn: Tensor, vector: Tensor | None = None,
            skip_layers: tuple[int, ...] = ()) -> Tensor:
        return model(x, t, context=crossattn, y=vector, skip_layers=skip_layers)

    return net


# ----------------------------------------------------------------------------------------------------
# building from a file


def expected_keys(cfg: MMDiTConfig) -> dict[str, tuple[int, ...]]:
    """Tensor names (prefix stripped) -> shapes of this config, computed on the meta device."""
    return {k: tuple(v.shape) for k, v in MMDiT(cfg, device="meta").state_dict().items()}


def load_mmdit(tensors: dict[str, Tensor], prefix: str = "model.diffusion_model.", device=None,
               dtype=None) -> MMDiT:
    """Build the MMDiT the file's shapes describe and load its tensors strictly.

    tensors: the file's tensors (keys with `prefix`; other keys are not looked at). Each tensor is cast to
    `dtype` (default: the file's dtype of x_embedder.proj.weight) and moved to `device`. Raises ValueError
    naming missing, unexpected or mis-shaped keys."""
    own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    cfg = mmdit_config_for({k: tuple(v.shape) for k, v in own.items()}, prefix="")
    dtype = dtype or own["x_embedder.proj.weight"].dtype
    want = expected_keys(cfg)
    missing = sorted(set(want) - set(own))
    unexpected = sorted(set(own) - set(want))
    bad = sorted(f"{k} {tuple(own[k].shape)} != {want[k]}" for k in set(want) & set(own)
                 if tuple(own[k].shape) != want[k])
    if missing or unexpected or bad:
        raise ValueError(f"MMDiT keys under {prefix!r} do not match: missing {missing}, unexpected {unexpected}, "
                         f"wrong shape {bad}")
    model = MMDiT(cfg, device="meta", dtype=dtype)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in own.items()}, strict=True, assign=True)
    return model.eval()
