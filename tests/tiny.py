"""Tiny random checkpoints in the exact key layout of the released files, for tests and the app's test fixtures.

`tiny_state_dict(name)` takes the spec detected from `tests/data/checkpoint-keys/<name>.json`, keeps its
structure (levels, blocks, depths, layers: so every key name is the released one) and shrinks the widths
(UNet 32/64 channels, text towers 64 wide, VAE 32). Extra tensors the released file carries (schedule buffers,
position_ids, the SGM sigma table) are added too, with the values the released files hold (the family's LDM betas
and what follows from them), so the key set equals the reference list.

Layouts without a released key list are derived from one: `sd1_inpaint` and `sdxl_inpaint` are the SD1 / SDXL
layouts with a 9-channel `input_blocks.0.0.weight` (as sd-v1-5-inpainting and the SDXL inpainting 0.1 files are).
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import torch

from sd.checkpoint import ignore_reason
from sd.config import ModelSpec
from sd.denoiser import discrete_sigmas
from sd.detect import detect
from sd.families import get_family
from sd.loader import expected_tensors

# The released key lists (copied from the reference repository into tests/data: names and shapes only).
REFERENCE_DIR = Path(__file__).resolve().parent / "data" / "checkpoint-keys"
TEXT_WIDTH = 64
MIDAS_OUT_BIAS = "depth_model.model.scratch.output_conv.4.bias"


# derived layouts: name -> (released key list, {key: shape} overrides)
DERIVED = {
    "sd1_inpaint": ("sd1", {"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}),
    "sdxl_inpaint": ("sdxl_base", {"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}),
}


def _unclip_l(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """sd21-unclip-l from the unclip-h list (no released list: its ClipImageEmbedder needs OpenAI's `clip`): the
    embedder is OpenAI's ViT-L/14 (24 blocks of 1024, projection to 768; the same key names as open_clip's), the
    whole CLIP model is kept (its text side, here one block of it, is ignored by rule), the UNet vector is 2 x 768."""
    v, w = "embedder.model.visual.", 1024
    out = {k: s for k, s in shapes.items() if not k.startswith("embedder.")}
    out.update({v + "conv1.weight": (w, 3, 14, 14), v + "class_embedding": (w,), v + "positional_embedding": (257, w),
                v + "ln_pre.weight": (w,), v + "ln_pre.bias": (w,), v + "ln_post.weight": (w,), v + "ln_post.bias": (w,),
                v + "proj": (w, 768), "embedder.model.token_embedding.weight": (49408, 768),
                "embedder.model.positional_embedding": (77, 768), "embedder.model.ln_final.weight": (768,),
                "embedder.model.ln_final.bias": (768,), "embedder.model.text_projection": (768, 768),
                "embedder.model.logit_scale": (), "embedder.model.transformer.resblocks.0.attn.in_proj_weight": (2304, 768),
                "embedder.model.transformer.resblocks.0.ln_1.weight": (768,)})
    for i in range(24):
        b = f"{v}transformer.resblocks.{i}."
        out.update({b + "attn.in_proj_weight": (3 * w, w), b + "attn.in_proj_bias": (3 * w,),
                    b + "attn.out_proj.weight": (w, w), b + "attn.out_proj.bias": (w,), b + "ln_1.weight": (w,),
                    b + "ln_1.bias": (w,), b + "mlp.c_fc.weight": (4 * w, w), b + "mlp.c_fc.bias": (4 * w,),
                    b + "mlp.c_proj.weight": (w, 4 * w), b + "mlp.c_proj.bias": (w,), b + "ln_2.weight": (w,),
                    b + "ln_2.bias": (w,)})
    out["model.diffusion_model.label_emb.0.0.weight"] = (1280, 1536)
    return out


DERIVED_BY = {"sd21_unclip_l": ("sd21_unclip_h", _unclip_l)}   # layouts derived by a function of a released list


def reference_shapes(name: str) -> dict[str, tuple[int, ...]]:
    if name in DERIVED_BY:
        base, fn = DERIVED_BY[name]
        return fn(reference_shapes(base))
    base, over = DERIVED.get(name, (name, {}))
    ref = json.loads((REFERENCE_DIR / f"{base}.json").read_text())
    return {**{k: tuple(v) for k, v in ref["tensors"].items()}, **over}


def tiny_spec(name: str) -> ModelSpec:
    """The released spec of `name` with every width shrunk and the structure kept."""
    spec = detect(reference_shapes(name))
    texts = tuple(replace(t, width=TEXT_WIDTH, heads=1, mlp=2 * TEXT_WIDTH,
                          projection_dim=TEXT_WIDTH if t.projection_dim else 0) for t in spec.text_encoders)
    u = spec.unet
    mc = 32 if u.num_head_channels < 0 else 64
    if any(u.disable_self_attn):  # x4: attn1 keys of the context width must differ from the level width to be read
        mc = 64
    ctx = sum(t.width for t in texts)
    fam = get_family(spec.family)
    unet = replace(u, model_channels=mc, context_dim=ctx)
    adm = fam.vector_width(texts, unet) if fam.vector_width and u.adm_in_channels else 0
    unet = replace(unet, adm_in_channels=adm)
    vae = replace(spec.vae, ch=32) if spec.vae else None
    # the families' own parts (unCLIP's image tower): the same depth, tiny widths, the embedding as wide as the text
    extra = tuple((k, replace(v, width=TEXT_WIDTH, mlp=2 * TEXT_WIDTH, output_dim=adm // 2 or TEXT_WIDTH)
                   if k == "vision" else tiny_midas(v) if k == "midas" else v) for k, v in spec.extra)
    return replace(spec, unet=unet, vae=vae, text_encoders=texts, extra=extra)


def tiny_midas(cfg):
    """The sd2-depth MiDaS DPT-Hybrid (sd.midas.MidasConfig) with its structure (stage and block counts: the released
    key names) and tiny widths: stem 32, bottlenecks 32/32/64 wide (GroupNorm's 32 groups), stage outputs 128/128/256,
    ViT 128 wide in 2 heads of 64, fusion 64; a 4 x 4 position grid, so the net runs at 64 px instead of 384."""
    stages = tuple((n, 32 if i < 2 else 64, 128 if i < 2 else 256) for i, (n, _, _) in enumerate(cfg.stages))
    return replace(cfg, stem=32, stages=stages, width=128, mlp=256, grid=4, post=(128, 128), features=64)


def _random_like(key: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if len(shape) == 1 and any(s in key for s in ("norm", "ln_", "layer_norm")) and key.endswith("weight"):
        return 1 + 0.1 * torch.randn(shape, generator=g)
    if len(shape) <= 1:
        return 0.05 * torch.randn(shape, generator=g)
    if "embedding" in key:
        return 0.5 * torch.randn(shape, generator=g)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=g) / math.sqrt(fan_in)


def tiny_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for the tiny version of reference layout `name`, plus the file's extra buffers."""
    spec = tiny_spec(name)
    buffers = schedule_buffers(*get_family(spec.family).schedule)
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for comp in expected_tensors(spec).values():
        for k, shape in comp.items():
            sd[k] = _random_like(k, shape, g)
    if MIDAS_OUT_BIAS in sd:   # the depth head ends in a ReLU: a positive bias keeps the tiny estimate from being 0
        sd[MIDAS_OUT_BIAS] = torch.ones(1)
    for k, shape in reference_shapes(name).items():
        if k in sd or ignore_reason(k) is None:
            continue
        if k.endswith("position_ids"):
            sd[k] = torch.arange(shape[-1])[None]
        elif k in buffers:
            sd[k] = buffers[k]
        elif k.startswith(tuple(PART_SCHEDULES)) and k.split(".", 1)[1] in buffers:
            prefix = k.split(".", 1)[0] + "."
            sd[k] = PART_SCHEDULES[prefix]()[k[len(prefix):]]
        elif k.startswith("model_ema."):  # EMA copies (LDM files; ignored by their rule): placeholders, since the
            sd[k] = torch.zeros(1)        # released shapes would make a tiny file of a gigabyte
        elif k.startswith("embedder.model."):   # the unCLIP embedder's unused text side (ignored): tiny too
            sd[k] = torch.zeros([min(s, TEXT_WIDTH) for s in shape])
        else:
            sd[k] = torch.zeros(shape)
    return sd


def _squaredcos_buffers(steps: int = 1000) -> dict[str, torch.Tensor]:
    """The unCLIP noise augmentor's buffers: LDM make_beta_schedule("cosine") (= squaredcos_cap_v2, s = 0.008,
    betas clipped at 0.999), stored float32 like register_schedule does."""
    t = torch.arange(steps + 1, dtype=torch.float64) / steps + 0.008
    alphas = torch.cos(t / 1.008 * math.pi / 2) ** 2
    alphas = alphas / alphas[0]
    betas = (1 - alphas[1:] / alphas[:-1]).clamp(0, 0.999)
    abar = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    out = {"betas": betas, "alphas_cumprod": abar, "alphas_cumprod_prev": prev, "sqrt_alphas_cumprod": abar.sqrt(),
           "sqrt_one_minus_alphas_cumprod": (1 - abar).sqrt(), "log_one_minus_alphas_cumprod": (1 - abar).log(),
           "sqrt_recip_alphas_cumprod": (1 / abar).sqrt(), "sqrt_recipm1_alphas_cumprod": (1 / abar - 1).sqrt()}
    return {k: v.float() for k, v in out.items()}


# the noise-augmentation buffers of the released files: x4-upscaling.yaml's low_scale_config (linear 1e-4 .. 2e-2)
# and the unCLIP noise_aug_config (squaredcos_cap_v2)
PART_SCHEDULES = {"low_scale_model.": lambda: schedule_buffers(0.0001, 0.02),
                  "noise_augmentor.": _squaredcos_buffers}


def schedule_buffers(linear_start: float, linear_end: float, steps: int = 1000) -> dict[str, torch.Tensor]:
    """The LDM DDPM buffers of a "linear" schedule (as `ldm.models.diffusion.ddpm.register_schedule` stores them,
    float32) and SGM's `denoiser.sigmas`."""
    betas = torch.linspace(math.sqrt(linear_start), math.sqrt(linear_end), steps, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    out = {"betas": betas, "alphas_cumprod": abar, "alphas_cumprod_prev": prev, "sqrt_alphas_cumprod": abar.sqrt(),
           "sqrt_one_minus_alphas_cumprod": (1 - abar).sqrt(), "log_one_minus_alphas_cumprod": (1 - abar).log(),
           "sqrt_recip_alphas_cumprod": (1 / abar).sqrt(), "sqrt_recipm1_alphas_cumprod": (1 / abar - 1).sqrt()}
    out = {k: v.float() for k, v in out.items()}
    out["denoiser.sigmas"] = discrete_sigmas(linear_start, linear_end, steps)
    return out


def write_tiny(name: str, path: Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint as .safetensors or .ckpt (by the suffix of `path`)."""
    sd = tiny_state_dict(name, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"state_dict": sd, "global_step": 0}, path)
    return path
