"""Tests of `sd.unet.UNetModel` and `sd.vae.AutoencoderKL`.

1. Layout: built on the meta device, the state-dict names and shapes equal the released checkpoints'
   (`tests/data/checkpoint-keys/*.json`, prefix stripped).
2. Parity: tiny random models, converted with diffusers' single-file converters and loaded strictly into
   diffusers' UNet2DConditionModel / AutoencoderKL, give the same outputs (float32, CPU).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sd.config import UNetConfig, VAEConfig
from sd.unet import UNetModel, timestep_embedding, unet_config_for
from sd.vae import AutoencoderKL, vae_config_for

from .tiny import REFERENCE_DIR as KEYS_DIR

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


# ----------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core box: OpenMP's 2 threads spin against other processes and run
    10-100x slower than one thread. Restored after this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def reference_shapes(json_name: str, prefix: str) -> dict[str, list[int]]:
    """{name without prefix: shape} of one component of a released checkpoint (loss.* dropped)."""
    tensors = json.loads((KEYS_DIR / f"{json_name}.json").read_text())["tensors"]
    return {k[len(prefix):]: list(v) for k, v in tensors.items()
            if k.startswith(prefix) and not k[len(prefix):].startswith("loss.")}


def our_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def assert_same_layout(ours: dict, ref: dict) -> None:
    missing, unexpected = sorted(set(ref) - set(ours)), sorted(set(ours) - set(ref))
    assert not missing and not unexpected, f"missing {missing[:8]} unexpected {unexpected[:8]}"
    wrong = {k: (ours[k], ref[k]) for k in ref if ours[k] != ref[k]}
    assert not wrong, f"shape mismatches (ours, ref): {dict(list(wrong.items())[:8])}"


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial norms and biases (defaults 1/0 would hide swapped or missing ones)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and ("norm" in name or name.startswith("out.0") or ".in_layers.0." in name
                                or ".out_layers.0." in name):
                p.copy_((1.0 + 0.2 * noise) if name.endswith("weight") else 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            elif name.endswith("label_emb.weight"):
                p.copy_(noise)
            else:
                p.add_(0.02 * noise)


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert scale > 1e-3, f"reference output is degenerate (max |ref| = {scale})"
    assert err <= rel * scale, f"max |ours - ref| = {err:.3g} > {rel} * {scale:.3g}"


# ----------------------------------------------------------------------------------------------------
# 1. layout of the released checkpoints

UNET_FAMILIES = [
    ("sd1", "sd1"), ("sd2", "sd2_512_eps"), ("sd2", "sd2_768_v"), ("sd2-inpaint", "sd2_inpaint"),
    ("sd2-depth", "sd2_depth"), ("sd2-x4-upscaler", "sd2_x4_upscaler"), ("sd2-unclip-h", "sd21_unclip_h"),
    ("sdxl-base", "sdxl_base"), ("sdxl-refiner", "sdxl_refiner"),
]


@pytest.mark.parametrize("family,json_name", UNET_FAMILIES)
def test_unet_layout_matches_release(family, json_name):
    model = UNetModel(unet_config_for(family), device="meta")
    assert_same_layout(our_shapes(model), reference_shapes(json_name, UNET_PREFIX))


VAE_KINDS = [
    ("kl-f8", "sd1", VAE_PREFIX), ("kl-f8", "sd2_768_v", VAE_PREFIX), ("kl-f8", "sdxl_base", VAE_PREFIX),
    ("kl-f4", "sd2_x4_upscaler", VAE_PREFIX), ("kl-f8-16ch", "sd3_medium", VAE_PREFIX),
    ("kl-f8", "ldm_kl_f8", ""),  # the standalone LDM training checkpoint (loss.* ignored)
]


@pytest.mark.parametrize("kind,json_name,prefix", VAE_KINDS)
def test_vae_layout_matches_release(kind, json_name, prefix):
    model = AutoencoderKL(vae_config_for(kind), device="meta")
    assert_same_layout(our_shapes(model), reference_shapes(json_name, prefix))


def test_meta_model_has_no_storage_and_real_one_loads_strictly():
    cfg = UNetConfig(model_channels=32, channel_mult=(1, 2), transformer_depth=(1, 1), context_dim=32)
    meta = UNetModel(cfg, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    real = UNetModel(cfg)
    result = meta.load_state_dict(real.state_dict(), strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    with pytest.raises(RuntimeError, match="Unexpected key"):
        real.load_state_dict({**real.state_dict(), "bogus.weight": torch.zeros(1)}, strict=True)


# ----------------------------------------------------------------------------------------------------
# 2. parity with diffusers


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.5, 250.25, 999.0])
    ours = timestep_embedding(t, 64)
    ref = get_timestep_embedding(t, 64, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.allclose(ours, ref, atol=1e-5)
    # cos first: t = 0 gives [1]*32 + [0]*32
    assert ours[0, :32].eq(1).all() and ours[0, 32:].eq(0).all()
    assert math.isclose(ours[2, 1].item(), math.cos(250.25 * 10000 ** (-1 / 32)), rel_tol=1e-5)


def diffusers_unet_config(cfg: UNetConfig) -> dict:
    """The UNet2DConditionModel config with the same numbers as `cfg` (diffusers' `attention_head_dim`
    is the number of heads per level, as in its LDM-yaml conversion)."""
    down = tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in cfg.transformer_depth)
    heads = tuple(cfg.heads(cfg.model_channels * m)[0] for m in cfg.channel_mult)
    conf = dict(
        sample_size=8, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=down, up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
        block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
        attention_head_dim=heads, use_linear_projection=cfg.use_linear_in_transformer,
        transformer_layers_per_block=tuple(max(d, 1) for d in cfg.transformer_depth),
        norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
    )
    assert cfg.transformer_depth_middle == max(cfg.transformer_depth[-1], 1), "diffusers ties mid depth to the last level"
    if cfg.adm_in_channels:
        conf.update(class_embed_type="projection", projection_class_embeddings_input_dim=cfg.adm_in_channels)
    if cfg.num_classes:
        conf.update(num_class_embeds=cfg.num_classes)
    if cfg.disable_self_attn:
        conf.update(only_cross_attention=tuple(cfg.disable_self_attn))
    return conf


TINY_UNETS = {
    # SD1-like: conv proj_in, 8 heads, two res blocks per level, square latent
    "sd1-like": (UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=2, transformer_depth=(1, 1),
                            context_dim=32, num_heads=8), (8, 8)),
    # SD2-inpaint-like: linear proj, channels-per-head, 9 input channels, odd latent 9x7
    "sd2-like": (UNetConfig(in_channels=9, model_channels=64, channel_mult=(1, 2), num_res_blocks=1,
                            transformer_depth=(1, 1), context_dim=48, num_head_channels=32,
                            use_linear_in_transformer=True), (9, 7)),
    # SDXL-like: no transformer at level 0, depth 2 at the last level and the middle, adm vector
    "sdxl-like": (UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, transformer_depth=(0, 1, 2),
                             transformer_depth_middle=2, context_dim=40, num_head_channels=16,
                             use_linear_in_transformer=True, adm_in_channels=72), (8, 12)),
    # x4-upscaler-like: class (noise-level) embedding, attn1 on the context at the disabled levels, odd 5x6
    "x4-like": (UNetConfig(in_channels=7, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                           transformer_depth=(0, 1, 1), context_dim=24, num_heads=4,
                           use_linear_in_transformer=True, num_classes=10,
                           disable_self_attn=(True, True, False)), (5, 6)),
}


@pytest.mark.parametrize("name", list(TINY_UNETS))
def test_unet_matches_diffusers(name):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    cfg, (h, w) = TINY_UNETS[name]
    torch.manual_seed(0)
    ours = UNetModel(cfg).eval()
    randomize_(ours, seed=1)

    conf = diffusers_unet_config(cfg)
    checkpoint = {UNET_PREFIX + k: v for k, v in ours.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(checkpoint, conf)
    ref = UNet2DConditionModel(**conf).eval()
    ref.load_state_dict(converted, strict=True)

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, cfg.in_channels, h, w, generator=g)  # (B, C, h, w)
    t = torch.tensor([3.25, 801.5])
    context = torch.randn(2, 5, cfg.context_dim, generator=g)  # (B, T, ctx)
    y, class_labels = None, None
    if cfg.adm_in_channels:
        y = class_labels = torch.randn(2, cfg.adm_in_channels, generator=g)
    if cfg.num_classes:
        y = class_labels = torch.tensor([3, 7])

    with torch.no_grad():
        out = ours(x, t, context, y)
        expected = ref(x, t, encoder_hidden_states=context, class_labels=class_labels).sample
    assert out.shape == (2, cfg.out_channels, h, w)
    assert_close(out, expected)

    # the conditioning matters: a different context or class changes the output
    with torch.no_grad():
        other = ours(x, t, context.flip(0), y.flip(0) if y is not None else None)
    assert (other - out).abs().max() > 1e-3


def test_unet_rejects_missing_adm_vector():
    cfg = UNetConfig(model_channels=32, channel_mult=(1,), transformer_depth=(1,), context_dim=8, adm_in_channels=6)
    with pytest.raises(AssertionError, match="needs y"):
        UNetModel(cfg)(torch.zeros(1, 4, 4, 4), torch.tensor([1.0]), torch.zeros(1, 2, 8))


TINY_VAES = {
    "f4": (VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1), (16, 20)),
    "f8": (VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=2), (16, 24)),
    "f4-16ch-noquant": (VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16, embed_dim=16,
                                  use_quant_conv=False), (12, 8)),
}


@pytest.mark.parametrize("name", list(TINY_VAES))
def test_vae_matches_diffusers(name):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg, (H, W) = TINY_VAES[name]
    torch.manual_seed(0)
    ours = AutoencoderKL(cfg).eval()
    randomize_(ours, seed=3)

    n = len(cfg.ch_mult)
    conf = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
                layers_per_block=cfg.num_res_blocks, latent_channels=cfg.z_channels, norm_num_groups=32,
                use_quant_conv=cfg.use_quant_conv, use_post_quant_conv=cfg.use_quant_conv)
    checkpoint = {VAE_PREFIX + k: v for k, v in ours.state_dict().items()}
    ref = DiffusersAutoencoderKL(**conf).eval()
    ref.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, conf), strict=True)

    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, H, W, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]
    z = torch.randn(2, cfg.embed_dim, H // cfg.factor, W // cfg.factor, generator=g)
    with torch.no_grad():
        mean, logvar = ours.encode_moments(x)
        dist = ref.encode(x).latent_dist
        assert torch.equal(ours.encode(x), mean)
        assert mean.shape == (2, cfg.embed_dim, H // cfg.factor, W // cfg.factor)
        assert_close(mean, dist.mean)
        assert_close(logvar, dist.logvar)
        assert_close(ours.decode(z), ref.decode(z).sample)


def test_bfloat16_runs_close_to_float32():
    """Half precision keeps norms/softmax in the input dtype; on CPU bfloat16 stands in for CUDA fp16."""
    cfg, (h, w) = TINY_UNETS["sdxl-like"]
    torch.manual_seed(0)
    model = UNetModel(cfg).eval()
    randomize_(model, seed=5)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, cfg.in_channels, h, w, generator=g)
    ctx, y, t = torch.randn(1, 3, cfg.context_dim, generator=g), torch.randn(1, cfg.adm_in_channels, generator=g), torch.tensor([500.0])
    vae = AutoencoderKL(TINY_VAES["f4"][0]).eval()
    randomize_(vae, seed=7)
    img = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        ref, ref_img = model(x, t, ctx, y), vae.decode(vae.encode(img))
        model.to(torch.bfloat16)
        vae.to(torch.bfloat16)
        out = model(x.bfloat16(), t, ctx.bfloat16(), y.bfloat16())
        out_img = vae.decode(vae.encode(img.bfloat16()))
    assert out.dtype == torch.bfloat16 and out_img.dtype == torch.bfloat16
    assert_close(out.float(), ref, rel=5e-2)
    assert_close(out_img.float(), ref_img, rel=5e-2)
