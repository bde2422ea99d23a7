"""MiDaS v3 DPT-Hybrid, the depth estimator SD 2 depth-to-image stores under `depth_model.*`: a ResNet-50 v2
stem + ViT-B/16 ("hybrid" ViT, Dosovitskiy et al. 2021) read out at four depths, reassembled into an image pyramid
and fused into relative inverse depth (Ranftl et al. 2021, "Vision Transformers for Dense Prediction").

Reference: Stability-AI/stablediffusion `ldm/modules/midas/` (api.py MiDaSInference("dpt_hybrid"), midas/dpt_depth.py
DPTDepthModel(backbone="vitb_rn50_384", non_negative=True), midas/vit.py `_make_vit_b_rn50_backbone` + forward_vit /
forward_flex, midas/blocks.py FeatureFusionBlock_custom / ResidualConvUnit_custom) over timm's
`vit_base_resnet50_384` (ResNetV2 layers (3, 4, 9), non pre-activation bottlenecks, StdConv2dSame eps 1e-8, GroupNorm
32, TF "same" padding). Module names are the checkpoint keys below `depth_model.` (`model.pretrained.model.blocks.0.
attn.qkv.weight` ...), so `load_state_dict(strict=True)` is the check; the numbers are read from the shapes.

What the shapes cannot tell, pinned from the reference: heads of 64 channels (ViT-B: 768 / 12), the hooks on the ViT
blocks 8 and 11 (of 12) and on the first two backbone stages, LayerNorm eps 1e-6, the readout "project".
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor

PREFIX = "depth_model."                  # where the SD 2 depth file keeps it
VIT = "model.pretrained.model."          # the timm ViT inside it
HEAD_WIDTH = 64                          # ViT-B/16: 768 channels in 12 heads
HOOKS = (8, 11)                          # _make_pretrained_vitb_rn50_384(hooks=[0, 1, 8, 11]): blocks 8 and 11 feed
                                         # the two coarse levels (0 and 1 are the backbone stages)
NET_MULTIPLE = 32                        # load_midas_transform: ensure_multiple_of=32


@dataclass(frozen=True)
class MidasConfig:
    """DPT-Hybrid numbers, all from the shapes (released: MiDaS dpt_hybrid-midas-501f0c75)."""

    stem: int = 64                                   # stem conv channels
    stages: tuple[tuple[int, int, int], ...] = ((3, 64, 256), (4, 128, 512), (9, 256, 1024))
                                                     # backbone stages: (blocks, bottleneck width, out channels)
    width: int = 768                                 # ViT width
    depth: int = 12                                  # ViT blocks
    mlp: int = 3072                                  # ViT MLP width
    grid: int = 24                                   # pos_embed grid side: the net's trained size is grid * patch
    post: tuple[int, int] = (768, 768)               # act_postprocess3 / 4 output channels
    features: int = 256                              # scratch (fusion) width
    head: int = 32                                   # output_conv.2 channels
    classes: int = 1000                              # the unused ImageNet head of the timm ViT

    @property
    def heads(self) -> int:
        return max(1, self.width // HEAD_WIDTH)

    @property
    def patch(self) -> int:
        """Backbone stride = the ViT's patch: stem conv 2 x max pool 2 x 2 for each stage after the first (16)."""
        return 4 * 2 ** (len(self.stages) - 1)

    @property
    def size(self) -> int:
        """The side the ViT was trained at (384): MiDaS's net_w / net_h."""
        return self.grid * self.patch


def midas_config(shapes: dict[str, tuple[int, ...]], prefix: str = PREFIX) -> MidasConfig | None:
    """The DPT-Hybrid numbers from the shapes under `prefix`, or None when the file has no estimator."""
    p = prefix + VIT
    if p + "patch_embed.backbone.stem.conv.weight" not in shapes:
        return None
    bb = p + "patch_embed.backbone.stages."
    rx = re.compile(re.escape(bb) + r"(\d+)\.blocks\.(\d+)\.")
    blocks: dict[int, set[int]] = {}
    for k in shapes:
        if m := rx.match(k):
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    stages = tuple((len(blocks[i]), shapes[f"{bb}{i}.blocks.0.conv1.weight"][0], shapes[f"{bb}{i}.blocks.0.conv3.weight"][0])
                   for i in sorted(blocks))
    vit = re.compile(re.escape(p + "blocks.") + r"(\d+)\.")
    depth = len({m.group(1) for k in shapes if (m := vit.match(k))})
    width = shapes[p + "cls_token"][-1]
    pp = prefix + "model.pretrained."
    return MidasConfig(
        stem=shapes[p + "patch_embed.backbone.stem.conv.weight"][0], stages=stages, width=width, depth=depth,
        mlp=shapes[p + "blocks.0.mlp.fc1.weight"][0], grid=int(round(math.sqrt(shapes[p + "pos_embed"][1] - 1))),
        post=(shapes[pp + "act_postprocess3.3.weight"][0], shapes[pp + "act_postprocess4.3.weight"][0]),
        features=shapes[prefix + "model.scratch.layer1_rn.weight"][0],
        head=shapes[prefix + "model.scratch.output_conv.2.weight"][0], classes=shapes[p + "head.weight"][0])


# ------------------------------------------------------------------------------------------- ResNet v2 backbone

def pad_same(x: Tensor, k: int, s: int, value: float = 0.0) -> Tensor:
    """TensorFlow "SAME" padding (timm pad_same): pad = max((ceil(i / s) - 1) s + k - i, 0) per axis, the odd
    pixel on the bottom / right."""
    ih, iw = x.shape[-2:]
    ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
    pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
    if ph or pw:
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2], value=value)
    return x


class StdConv2dSame(nn.Conv2d):
    """Conv2d with weight standardisation (Qiao et al. 2019; BiT, Kolesnikov et al. 2020): each filter minus its
    mean over its inputs, divided by sqrt(var + 1e-8) (biased var), then "SAME" padding; no bias."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1):
        super().__init__(cin, cout, k, stride=stride, padding=0, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        flat = w.reshape(w.shape[0], -1)
        w = ((flat - flat.mean(1, keepdim=True)) / torch.sqrt(flat.var(1, unbiased=False, keepdim=True) + 1e-8)
             ).reshape_as(w)
        return F.conv2d(pad_same(x, self.kernel_size[0], self.stride[0]), w, None, self.stride)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm(32 groups, eps 1e-5), then ReLU unless `act` is False (timm GroupNormAct)."""

    def __init__(self, channels: int, act: bool = True):
        super().__init__(32, channels, eps=1e-5)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        return F.relu(x) if self.act else x


class Downsample(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv = StdConv2dSame(cin, cout, 1, stride)
        self.norm = GroupNormAct(cout, act=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """timm resnetv2.Bottleneck (non pre-activation, "v1.5": the stride on the 3x3):
    relu(norm3(conv3(norm2(conv2(norm1(conv1(x)))))) + shortcut(x))."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int):
        super().__init__()
        self.downsample = Downsample(cin, cout, stride) if (cin != cout or stride != 1) else None
        self.conv1, self.norm1 = StdConv2dSame(cin, mid, 1), GroupNormAct(mid)
        self.conv2, self.norm2 = StdConv2dSame(mid, mid, 3, stride), GroupNormAct(mid)
        self.conv3, self.norm3 = StdConv2dSame(mid, cout, 1), GroupNormAct(cout, act=False)

    def forward(self, x: Tensor) -> Tensor:
        short = self.downsample(x) if self.downsample is not None else x
        y = self.norm1(self.conv1(x))
        y = self.norm2(self.conv2(y))
        y = self.norm3(self.conv3(y))
        return F.relu(y + short)


class Stage(nn.Module):
    def __init__(self, cin: int, blocks: int, mid: int, cout: int, stride: int):
        super().__init__()
        self.blocks = nn.Sequential(*[Bottleneck(cin if i == 0 else cout, mid, cout, stride if i == 0 else 1)
                                      for i in range(blocks)])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


class ResNetV2(nn.Module):
    """The hybrid's CNN: stem (7x7/2 conv, GroupNorm + ReLU, 3x3/2 max pool with "SAME" -inf padding), then the
    stages (stride 1, 2, 2 ...). forward returns every stage's output: (B, out_i, H / 2^(i+2), W / 2^(i+2))."""

    def __init__(self, cfg: MidasConfig):
        super().__init__()
        self.stem = nn.Module()
        self.stem.conv = StdConv2dSame(3, cfg.stem, 7, 2)
        self.stem.norm = GroupNormAct(cfg.stem)
        cins = (cfg.stem, *(c for _, _, c in cfg.stages[:-1]))
        self.stages = nn.ModuleList(Stage(cin, n, mid, cout, 1 if i == 0 else 2)
                                    for i, (cin, (n, mid, cout)) in enumerate(zip(cins, cfg.stages)))

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem.norm(self.stem.conv(x))                            # (B, stem, H/2, W/2)
        x = F.max_pool2d(pad_same(x, 3, 2, value=float("-inf")), 3, 2)  # (B, stem, H/4, W/4)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


# ------------------------------------------------------------------------------------------- ViT

class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, T, d)
        out = F.scaled_dot_product_attention(q, k, v)                                              # (B, h, T, d)
        return self.proj(out.transpose(1, 2).reshape(b, t, c))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (timm vision_transformer.Block): x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: MidasConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = Attention(cfg.width, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = Mlp(cfg.width, cfg.mlp)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class HybridEmbed(nn.Module):
    def __init__(self, cfg: MidasConfig):
        super().__init__()
        self.backbone = ResNetV2(cfg)
        self.proj = nn.Conv2d(cfg.stages[-1][2], cfg.width, 1)


class VisionTransformer(nn.Module):
    """timm's vit_base_resnet50_384 as MiDaS's forward_flex runs it: the position embedding resized (bilinear,
    align_corners False) to the input's grid, the class token first; `norm` and `head` are stored but unused."""

    def __init__(self, cfg: MidasConfig):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid ** 2 + 1, cfg.width))
        self.patch_embed = HybridEmbed(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        self.head = nn.Linear(cfg.width, cfg.classes)

    def pos_embed_for(self, gh: int, gw: int) -> Tensor:
        """(1, 1 + gh gw, C): MiDaS _resize_pos_embed."""
        tok, grid = self.pos_embed[:, :1], self.pos_embed[0, 1:]
        n = int(round(math.sqrt(grid.shape[0])))
        grid = grid.reshape(1, n, n, -1).permute(0, 3, 1, 2)                             # (1, C, n, n)
        grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)  # (1, C, gh, gw)
        return torch.cat([tok, grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)


class ProjectReadout(nn.Module):
    """MiDaS ProjectReadout: each patch token concatenated with the class token, Linear(2C -> C) + GELU."""

    def __init__(self, width: int):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * width, width), nn.GELU())

    def forward(self, x: Tensor) -> Tensor:                       # (B, 1 + T, C) -> (B, T, C)
        return self.project(torch.cat([x[:, 1:], x[:, :1].expand_as(x[:, 1:])], dim=-1))


class Pretrained(nn.Module):
    """The encoder: the ViT and the two post-processings of its hooked blocks (indices as MiDaS's nn.Sequential:
    0 readout, 1 transpose, 2 unflatten, 3 1x1 projection, 4 (level 4 only) a 3x3 stride-2 conv)."""

    def __init__(self, cfg: MidasConfig):
        super().__init__()
        self.model = VisionTransformer(cfg)
        self.act_postprocess3 = nn.Sequential(ProjectReadout(cfg.width), nn.Identity(), nn.Identity(),
                                              nn.Conv2d(cfg.width, cfg.post[0], 1))
        self.act_postprocess4 = nn.Sequential(ProjectReadout(cfg.width), nn.Identity(), nn.Identity(),
                                              nn.Conv2d(cfg.width, cfg.post[1], 1),
                                              nn.Conv2d(cfg.post[1], cfg.post[1], 3, stride=2, padding=1))

    def forward(self, x: Tensor) -> list[Tensor]:
        """MiDaS forward_vit for the hybrid: [stage 0, stage 1, block 8 reassembled, block 11 reassembled]."""
        vit = self.model
        feats = vit.patch_embed.backbone(x)                                   # every stage's output
        t = vit.patch_embed.proj(feats[-1])                                   # (B, C, H/16, W/16)
        gh, gw = t.shape[-2:]
        t = t.flatten(2).transpose(1, 2)                                      # (B, T, C)
        t = torch.cat([vit.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + vit.pos_embed_for(gh, gw)
        hooked = {}
        for i, blk in enumerate(vit.blocks):
            t = blk(t)
            if i in HOOKS:
                hooked[i] = t                                                 # (B, 1 + T, C), before the norm
        levels = []
        for post, i in ((self.act_postprocess3, HOOKS[0]), (self.act_postprocess4, HOOKS[1])):
            y = post[0](hooked[i]).transpose(1, 2).reshape(t.shape[0], -1, gh, gw)   # (B, C, gh, gw)
            for m in post[3:]:
                y = m(y)
            levels.append(y)
        return [feats[0], feats[1], *levels]


# ------------------------------------------------------------------------------------------- fusion and head

class ResidualConvUnit(nn.Module):
    """MiDaS ResidualConvUnit_custom (no batch norm): x + conv2(relu(conv1(relu(x))))."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FeatureFusionBlock(nn.Module):
    """MiDaS FeatureFusionBlock_custom: (x [+ rcu1(skip)]) -> rcu2 -> bilinear x2 (align_corners True) -> 1x1 conv.
    refinenet4's resConfUnit1 is stored but unused (it gets no skip)."""

    def __init__(self, c: int):
        super().__init__()
        self.out_conv = nn.Conv2d(c, c, 1)
        self.resConfUnit1 = ResidualConvUnit(c)
        self.resConfUnit2 = ResidualConvUnit(c)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class Scratch(nn.Module):
    def __init__(self, cfg: MidasConfig):
        super().__init__()
        ins = (cfg.stages[0][2], cfg.stages[1][2], *cfg.post)
        f = cfg.features
        for i, c in enumerate(ins, 1):
            setattr(self, f"layer{i}_rn", nn.Conv2d(c, f, 3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(self, f"refinenet{i}", FeatureFusionBlock(f))
        self.output_conv = nn.Sequential(   # DPTDepthModel's head; non_negative=True: the last ReLU
            nn.Conv2d(f, f // 2, 3, padding=1), nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(f // 2, cfg.head, 3, padding=1), nn.ReLU(), nn.Conv2d(cfg.head, 1, 1), nn.ReLU())


class DPT(nn.Module):
    def __init__(self, cfg: MidasConfig):
        super().__init__()
        self.pretrained = Pretrained(cfg)
        self.scratch = Scratch(cfg)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) normalised to [-1, 1], H and W multiples of 32 -> (B, H, W) relative inverse depth >= 0."""
        s = self.scratch
        l1, l2, l3, l4 = self.pretrained(x)            # /4, /8, /16, /32
        p = s.refinenet4(s.layer4_rn(l4))              # (B, f, H/16, W/16)
        p = s.refinenet3(p, s.layer3_rn(l3))           # /8
        p = s.refinenet2(p, s.layer2_rn(l2))           # /4
        p = s.refinenet1(p, s.layer1_rn(l1))           # /2
        return s.output_conv(p).squeeze(1)             # (B, H, W)


class MiDaS(nn.Module):
    """ldm's MiDaSInference: the tensors below `depth_model.` (`model.pretrained...`, `model.scratch...`)."""

    def __init__(self, cfg: MidasConfig):
        super().__init__()
        self.cfg = cfg
        self.model = DPT(cfg)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def build_midas(cfg: MidasConfig, device=None) -> MiDaS:
    with torch.device(device or "cpu"):
        return MiDaS(cfg)


# ------------------------------------------------------------------------------------------- preprocessing

def net_size(width: int, height: int, size: int = 384, multiple: int = NET_MULTIPLE) -> tuple[int, int]:
    """(w, h) the net runs at: MiDaS Resize(size, size, keep_aspect_ratio=True, ensure_multiple_of=32,
    resize_method="minimal"): scale by whichever of size / width, size / height is nearer 1, for both sides, then
    each side rounded to the nearest multiple of 32 (half to even, as np.round), at least 32."""
    sw, sh = size / width, size / height
    s = sw if abs(1 - sw) < abs(1 - sh) else sh
    return tuple(max(multiple, int(round(v * s / multiple)) * multiple) for v in (width, height))


def midas_input(x: Tensor, size: int) -> Tensor:
    """The SD 2 reference's preprocessing (ldm/data/util.py AddMiDaS + ldm/modules/midas/api.py
    load_midas_transform("dpt_hybrid")): the [-1, 1] image (B, 3, H, W) to [0, 1], resized to `net_size` with
    bicubic interpolation (the reference's cv2.INTER_CUBIC: a = -0.75, half-pixel centres, no antialiasing; here
    F.interpolate bicubic, align_corners False), then NormalizeImage(mean 0.5, std 0.5). Returns (B, 3, h, w)."""
    w, h = net_size(x.shape[-1], x.shape[-2], size)
    y = F.interpolate((x.float() + 1) / 2, size=(h, w), mode="bicubic", align_corners=False)
    return (y - 0.5) / 0.5


@torch.no_grad()
def estimate_depth(model: MiDaS, x: Tensor) -> Tensor:
    """Relative inverse depth (B, h, w) at the net size of the [-1, 1] image x (B, 3, H, W), float32 (larger =
    nearer)."""
    p = next(model.parameters())
    inp = midas_input(x, model.cfg.size).to(p.device, p.dtype)
    return model(inp).float().cpu()
