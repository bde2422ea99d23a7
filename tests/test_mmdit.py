"""MMDiT: numbers read from shapes, the released layouts rebuilt exactly, pos_embed cropping, skipped blocks."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from sd.checkpoint import ignore_reason
from sd.mmdit import MMDiT, MMDiTConfig, expected_keys, load_mmdit, mmdit_config_for
from sd.sd3_text import (CLIP_L_PREFIX, T5_PREFIX, UNUSED_CLIP_L_PROJECTION, clip_g_sd3_config,
                         clip_l_sd3_config)
from sd.t5 import build_t5, t5_config_for
from sd.text import expected_keys as text_expected_keys
from sd.vae import AutoencoderKL, vae_config_for

from .tiny_sd3 import LAYOUTS, reference, reference_shapes, tiny_mmdit_config, tiny_state_dict

PREFIX = "model.diffusion_model."


@pytest.mark.parametrize("name,depth,qk,dual,pos", [
    ("sd3_medium", 24, None, (), 192),
    ("sd35_large", 38, "rms", (), 192),
    ("sd35_medium", 24, "rms", tuple(range(13)), 384),
])
def test_config_read_from_shapes(name, depth, qk, dual, pos) -> None:
    cfg = mmdit_config_for(reference_shapes(name))
    assert (cfg.depth, cfg.hidden, cfg.heads, cfg.patch_size) == (depth, 64 * depth, depth, 2)
    assert (cfg.in_channels, cfg.out_channels, cfg.adm_in_channels, cfg.context_dim) == (16, 16, 2048, 4096)
    assert (cfg.qk_norm, cfg.x_block_self_attn_layers, cfg.pos_embed_max_size) == (qk, dual, pos)
    assert cfg.mlp_hidden == 4 * cfg.hidden
    hp = reference(name)["model_hparams"]  # what the reference's BaseModel read from the same shapes
    assert (hp["depth"], hp["num_heads"], hp["pos_embed_max_size"], hp["qk_norm"]) == (depth, depth, pos, qk)
    assert tuple(hp["x_block_self_attn_layers"]) == dual


def _ours_on_meta(name: str) -> dict[str, tuple[int, ...]]:
    """Every tensor our modules expect for the file, with the file's prefixes, built on the meta device."""
    shapes = reference_shapes(name)
    out = {PREFIX + k: v for k, v in expected_keys(mmdit_config_for(shapes)).items()}
    vae = AutoencoderKL(vae_config_for("kl-f8-16ch"), device="meta")
    out.update({"first_stage_model." + k: tuple(v.shape) for k, v in vae.state_dict().items()})
    if any(k.startswith("text_encoders.") for k in shapes):
        for cfg in (clip_l_sd3_config(), clip_g_sd3_config()):
            out.update({cfg.prefix + k: v for k, v in text_expected_keys(cfg).items()})
        t5 = build_t5(t5_config_for(shapes, T5_PREFIX), device="meta")
        out.update({T5_PREFIX + k: tuple(v.shape) for k, v in t5.state_dict().items()
                    if k != "encoder.embed_tokens.weight"})  # tied alias of shared.weight, optional in files
    return out


@pytest.mark.parametrize("name", LAYOUTS)
def test_released_layouts_rebuilt_exactly(name: str) -> None:
    ref = reference_shapes(name)
    ignored = {k for k in ref if ignore_reason(k) is not None or re.fullmatch(UNUSED_CLIP_L_PROJECTION, k)}
    want = {k: v for k, v in ref.items() if k not in ignored}
    ours = _ours_on_meta(name)
    assert sorted(set(ours) - set(want)) == []
    assert sorted(set(want) - set(ours)) == []
    assert {k: v for k, v in ours.items() if want[k] != v} == {}
    # the only keys left unloaded: the three logit scales and CLIP-L's unused projection (sd3_medium bundles)
    if name == "sd3_medium":
        assert sorted(ignored) == sorted([CLIP_L_PREFIX + "text_projection.weight", "text_encoders.clip_g.logit_scale",
                                          "text_encoders.clip_l.logit_scale", "text_encoders.t5xxl.logit_scale"])
        assert len(ours) == 1671 - 4
    else:
        assert ignored == set()
    if name == "sd35_medium":  # the MMDiT-X blocks are included
        assert sum(k.endswith("x_block.attn2.qkv.weight") for k in ours) == 13
        assert ours[PREFIX + "joint_blocks.12.x_block.adaLN_modulation.1.weight"] == (9 * 1536, 1536)
        assert ours[PREFIX + "joint_blocks.13.x_block.adaLN_modulation.1.weight"] == (6 * 1536, 1536)


def _pattern(key: str) -> str:
    return re.sub(r"(joint_blocks|layers|encoder\.block)\.\d+", r"\1.N", key)


@pytest.mark.parametrize("name", LAYOUTS)
def test_tiny_files_keep_the_released_structure(name: str) -> None:
    tiny = tiny_state_dict(name)
    ref = reference_shapes(name)
    assert {_pattern(k) for k in tiny} == {_pattern(k) for k in ref}
    cfg = mmdit_config_for({k: tuple(v.shape) for k, v in tiny.items()})
    assert cfg == tiny_mmdit_config(name)
    assert cfg.x_block_self_attn_layers == {"sd35_medium": (0, 1)}.get(name, ())
    last = f"{PREFIX}joint_blocks.{cfg.depth - 1}.context_block."
    assert tiny[last + "adaLN_modulation.1.weight"].shape[0] == 2 * cfg.hidden  # pre-only
    assert not any(k.startswith(last + "mlp") or k.startswith(last + "attn.proj") for k in tiny)


def _tiny(cfg: MMDiTConfig, seed: int = 0) -> MMDiT:
    torch.manual_seed(seed)
    m = MMDiT(cfg).eval()
    with torch.no_grad():
        m.pos_embed.normal_()
        for mod in m.modules():
            if hasattr(mod, "ln_q"):
                mod.ln_q.weight.uniform_(0.5, 1.5)
    return m


CFG = MMDiTConfig(depth=3, pos_embed_max_size=8, adm_in_channels=24, context_dim=40, mlp_hidden=256,
                  qk_norm="rms", x_block_self_attn_layers=(0,))


def _inputs(h: int = 6, w: int = 10, b: int = 2):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(b, 16, h, w, generator=g), torch.tensor([900.0, 12.5])[:b],
            torch.randn(b, 7, 40, generator=g), torch.randn(b, 24, generator=g))


def test_pos_embed_is_the_files_table_cropped_centre() -> None:
    m = _tiny(CFG)
    with torch.no_grad():
        m.pos_embed.copy_(torch.arange(64 * m.cfg.hidden, dtype=torch.float32).reshape(1, 64, -1))
    crop = m.cropped_pos_embed(3, 5)  # rows 2..4, cols 1..5 of the 8 x 8 table
    rows = [(8 - 3) // 2 + i for i in range(3)]
    cols = [(8 - 5) // 2 + j for j in range(5)]
    idx = torch.tensor([r * 8 + c for r in rows for c in cols])
    assert torch.equal(crop[0, :, 0], idx.float() * m.cfg.hidden)
    with pytest.raises(ValueError, match="exceeds"):
        m.cropped_pos_embed(9, 2)
    # forward reads exactly the cropped entries: changing the rest changes nothing, changing one inside does
    m = _tiny(CFG)
    x, t, ctx, y = _inputs()  # 6 x 10 latent -> 3 x 5 patches
    with torch.no_grad():
        base = m(x, t, ctx, y)
        keep = torch.zeros(8, 8, dtype=torch.bool)
        keep[2:5, 1:6] = True
        m.pos_embed[0, ~keep.flatten()] += torch.randn(64 - 15, m.cfg.hidden)
        assert torch.equal(m(x, t, ctx, y), base)
        m.pos_embed[0, 2 * 8 + 1] += torch.randn(m.cfg.hidden)  # not a constant: LayerNorm would remove that
        assert (m(x, t, ctx, y) - base).abs().max() > 1e-3


def test_skip_layers_leave_out_exactly_the_listed_blocks() -> None:
    m = _tiny(CFG)
    x, t, ctx, y = _inputs()
    with torch.no_grad():
        plain = m(x, t, ctx, y)
        assert torch.equal(m(x, t, ctx, y, skip_layers=()), plain)
        skip1 = m(x, t, ctx, y, skip_layers=[1])
        skip0 = m(x, t, ctx, y, skip_layers=(0,))
        block = m.joint_blocks[1]
        m.joint_blocks[1] = _Identity()  # block 1 replaced by a pass-through: the same as skipping it
        assert torch.equal(m(x, t, ctx, y), skip1)
        m.joint_blocks[1] = block
    assert (skip1 - plain).abs().max() > 1e-3
    assert (skip1 - skip0).abs().max() > 1e-3


class _Identity(torch.nn.Module):
    def forward(self, context, x, c):
        return context, x


def test_joint_attention_mixes_text_into_image_and_pre_only_context_is_dropped() -> None:
    m = _tiny(CFG)
    x, t, ctx, y = _inputs()
    with torch.no_grad():
        base = m(x, t, ctx, y)
        assert (m(x, t, ctx + 0.5, y) - base).abs().max() > 1e-3   # the context reaches the image tokens
        assert (m(x, t, ctx, y + 0.5) - base).abs().max() > 1e-3   # and so does the pooled vector
        assert (m(x, t + 100, ctx, y) - base).abs().max() > 1e-3
        # the last block's context stream ends with its keys/values: the returned context is None
        c = m.t_embedder.mlp[0].weight.new_zeros(2, m.cfg.hidden)
        out_ctx, out_x = m.joint_blocks[-1](torch.randn(2, 7, m.cfg.hidden), torch.randn(2, 15, m.cfg.hidden), c)
        assert out_ctx is None and out_x.shape == (2, 15, m.cfg.hidden)


def test_odd_latent_sizes_are_padded_and_cropped_back() -> None:
    m = _tiny(CFG)
    x, t, ctx, y = _inputs(h=7, w=9)
    with torch.no_grad():
        out = m(x, t, ctx, y)
        padded = m(torch.nn.functional.pad(x, (0, 1, 0, 1), mode="circular"), t, ctx, y)
    assert out.shape == x.shape
    assert torch.equal(out, padded[:, :, :7, :9])


def test_batch_rows_are_independent_and_dtype_is_an_argument() -> None:
    m = _tiny(CFG)
    x, t, ctx, y = _inputs()
    with torch.no_grad():
        both = m(x, t, ctx, y)
        one = m(x[1:], t[1:], ctx[1:], y[1:])
        assert (both[1:] - one).abs().max() < 1e-5
        half = MMDiT(CFG, dtype=torch.bfloat16)
        half.load_state_dict(m.state_dict())
        out = half(x, t, ctx, y)
    assert out.dtype == x.dtype
    assert ((out - both).abs().max() / both.abs().max()) < 0.05


def test_load_mmdit_reads_config_and_is_strict() -> None:
    sd = {k: v for k, v in tiny_state_dict("sd35_medium").items() if k.startswith(PREFIX)}
    m = load_mmdit(sd, device="cpu", dtype=torch.float32)
    assert m.cfg == tiny_mmdit_config("sd35_medium")
    assert torch.equal(m.pos_embed, sd[PREFIX + "pos_embed"])
    attn2 = m.joint_blocks[0].x_block.attn2.qkv.weight
    assert torch.equal(attn2, sd[PREFIX + "joint_blocks.0.x_block.attn2.qkv.weight"])
    broken = dict(sd)
    del broken[PREFIX + "joint_blocks.1.x_block.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"joint_blocks\.1\.x_block\.mlp\.fc2\.bias"):
        load_mmdit(broken)
    extra = dict(sd, **{PREFIX + "joint_blocks.0.x_block.attn.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected"):
        load_mmdit(extra)
    wrong_depth = {k: v for k, v in sd.items() if ".joint_blocks.3." not in k}
    with pytest.raises(ValueError, match="joint_blocks 0..3"):
        mmdit_config_for({k: tuple(v.shape) for k, v in wrong_depth.items()})
    with pytest.raises(ValueError, match="not an MMDiT"):
        mmdit_config_for({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)})
    assert dataclasses.replace(m.cfg, depth=5).heads == 5
