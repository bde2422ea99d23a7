"""Shape readers shared by the family modules: UNet, first stage and text tower numbers from `{key: shape}`.

Widths are read, never compared with the released numbers, so tiny test checkpoints are detected like real ones
(the way ComfyUI's `model_detection.py` and the SD3.5 reference code read configs from shapes). No family knowledge
here: which towers and prefixes a family has is said in its own module.
"""
from __future__ import annotations

import re

from ..checkpoint import CheckpointError
from ..config import TextEncoderConfig, UNetConfig, VAEConfig, VQConfig

Shapes = dict[str, tuple[int, ...]]

UNET = "model.diffusion_model."
VAE = "first_stage_model."


def _count(shapes: Shapes, pattern: str) -> int:
    """Number of distinct integers N for which some key matches `pattern` with N in place of {}."""
    rx = re.compile(re.escape(pattern).replace(r"\{\}", r"(\d+)"))
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def detect_unet(shapes: Shapes, prefix: str = UNET) -> UNetConfig:
    """UNet numbers from tensor shapes (walks input_blocks the way ComfyUI's detection does)."""
    p = prefix
    if p + "input_blocks.0.0.weight" not in shapes:
        raise CheckpointError(f"no UNet: {p}input_blocks.0.0.weight is missing")
    mc, in_ch = shapes[p + "input_blocks.0.0.weight"][:2]
    out_ch = shapes[p + "out.2.weight"][0] if p + "out.2.weight" in shapes else 4
    n_in = _count(shapes, p + "input_blocks.{}.")
    levels: list[list[tuple[int, int]]] = [[]]  # per level: (res out channels, transformer depth) per block
    disable_self: list[bool] = []
    linear = False
    legacy = False    # openaimodel's AttentionBlock (`N.1.qkv`) instead of a SpatialTransformer (LDM uncond / SR)
    context_dim = 0
    # resblock_updown (openaimodel; LDM churches / inpainting_big): the up-sampling ResBlock is a second ResBlock in
    # an output block (`output_blocks.N.{1|2}.in_layers`), one per level but the last; with nrb + 1 output blocks per
    # level, the input blocks at multiples of nrb + 1 are the down-sampling ResBlocks
    n_out = _count(shapes, p + "output_blocks.{}.")
    n_up = sum(any(f"{p}output_blocks.{i}.{k}.in_layers.0.weight" in shapes for k in (1, 2)) for i in range(n_out))
    per_level = n_out // (n_up + 1) if n_up else 0
    for i in range(1, n_in):
        b = f"{p}input_blocks.{i}."
        if b + "0.op.weight" in shapes or (per_level and i % per_level == 0):
            levels.append([])
            continue
        if b + "0.out_layers.3.weight" not in shapes:
            raise CheckpointError(f"UNet input_blocks.{i} is incomplete or missing (no ResBlock or Downsample found); "
                                  "the file is damaged or not a Stable Diffusion UNet")
        ch = shapes[b + "0.out_layers.3.weight"][0]
        depth = _count(shapes, b + "1.transformer_blocks.{}.")
        legacy_here = not depth and b + "1.qkv.weight" in shapes
        if depth:
            linear = len(shapes[b + "1.proj_in.weight"]) == 2
            context_dim = shapes[b + "1.transformer_blocks.0.attn2.to_k.weight"][1]
            attn1_k = shapes[b + "1.transformer_blocks.0.attn1.to_k.weight"][1]
            if len(disable_self) < len(levels):
                disable_self.append(attn1_k != ch)
        elif len(disable_self) < len(levels):
            disable_self.append(False)
        if legacy_here:
            depth, legacy = 1, True
        levels[-1].append((ch, depth))
    if not levels[-1]:
        raise CheckpointError("UNet input blocks end with a Downsample; the file is damaged")
    nrb = len(levels[0])
    if any(len(lv) != nrb for lv in levels):
        raise CheckpointError(f"UNet levels have different numbers of ResBlocks {[len(lv) for lv in levels]}; "
                              "a block is missing or the file is not a Stable Diffusion UNet")
    mult = []
    depths = []
    for lv in levels:
        if len({c for c, _ in lv}) != 1 or len({d for _, d in lv}) != 1:
            raise CheckpointError(f"UNet level {len(mult)} mixes widths or attention depths {lv}; a block is damaged")
        mult.append(lv[0][0] // mc)
        depths.append(lv[0][1])
    mid_depth = _count(shapes, p + "middle_block.1.transformer_blocks.{}.")
    if not mid_depth and p + "middle_block.1.qkv.weight" in shapes:
        mid_depth, legacy = 1, True
    if mid_depth and not context_dim and not legacy:
        context_dim = shapes[p + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"][1]
        linear = len(shapes[p + "middle_block.1.proj_in.weight"]) == 2
    adm = shapes[p + "label_emb.0.0.weight"][1] if p + "label_emb.0.0.weight" in shapes else 0
    num_classes = shapes[p + "label_emb.weight"][0] if p + "label_emb.weight" in shapes else 0
    # Heads by each family's rule: conv proj_in (SD1) and the x4 upscaler (class-embedded) use 8 heads;
    # the linear SD2/SDXL UNets use 64 channels per head.
    by_count = not linear or num_classes > 0
    emb1 = shapes.get(p + "input_blocks.1.0.emb_layers.1.weight", (0,))[0]
    scale_shift = emb1 == 2 * shapes.get(p + "input_blocks.1.0.out_layers.3.weight", (-1,))[0]
    return UNetConfig(
        in_channels=in_ch, out_channels=out_ch, model_channels=mc, channel_mult=tuple(mult), num_res_blocks=nrb,
        transformer_depth=tuple(depths), transformer_depth_middle=mid_depth, context_dim=context_dim,
        num_heads=8, num_head_channels=-1 if by_count else 64,
        use_linear_in_transformer=linear, adm_in_channels=adm, num_classes=num_classes,
        disable_self_attn=tuple(disable_self[: len(mult)] + [False] * (len(mult) - len(disable_self)))
        if any(disable_self) else (),
        **({"legacy_attention": True} if legacy else {}),
        **({"use_scale_shift_norm": True} if scale_shift else {}), **({"resblock_updown": True} if n_up else {}),
    )


def detect_vae(shapes: Shapes, prefix: str = VAE) -> VAEConfig | None:
    """AutoencoderKL numbers from shapes; None when the file has no first stage."""
    p = prefix + "encoder."
    if p + "conv_in.weight" not in shapes:
        return None
    if prefix + "quantize.embedding.weight" in shapes:
        raise CheckpointError("the first stage is a VQ autoencoder (latent-diffusion 'SD v0'), not supported yet")
    ch = shapes[p + "conv_in.weight"][0]
    n_levels = _count(shapes, p + "down.{}.")
    mult = tuple(shapes[f"{p}down.{i}.block.0.conv2.weight"][0] // ch for i in range(n_levels))
    nrb = _count(shapes, p + "down.0.block.{}.")
    z2 = shapes[p + "conv_out.weight"][0]
    quant = prefix + "quant_conv.weight" in shapes
    embed = shapes[prefix + "quant_conv.weight"][0] // 2 if quant else z2 // 2
    return VAEConfig(ch=ch, ch_mult=mult, num_res_blocks=nrb, z_channels=z2 // 2, embed_dim=embed,
                     in_channels=shapes[p + "conv_in.weight"][1], out_channels=shapes[prefix + "decoder.conv_out.weight"][0],
                     use_quant_conv=quant, **_attention(shapes, prefix, n_levels))


def _attention(shapes: Shapes, prefix: str, n_levels: int) -> dict:
    """attn_levels / mid_attn of an LDM autoencoder: which levels hold AttnBlocks (`encoder.down.{i}.attn.0.`, the
    config's attn_resolutions), and whether `mid.attn_1` exists (not with attn_type "none"). SD VAEs: (), True."""
    p = prefix + "encoder."
    return dict(attn_levels=tuple(i for i in range(n_levels) if p + f"down.{i}.attn.0.q.weight" in shapes),
                mid_attn=p + "mid.attn_1.q.weight" in shapes)


def detect_vq(shapes: Shapes, prefix: str = VAE) -> VQConfig | None:
    """taming / LDM VQModel numbers from shapes (Esser et al. 2021); None when there is no VQ first stage."""
    p = prefix + "encoder."
    if p + "conv_in.weight" not in shapes or prefix + "quantize.embedding.weight" not in shapes:
        return None
    ch = shapes[p + "conv_in.weight"][0]
    n_levels = _count(shapes, p + "down.{}.")
    mult = tuple(shapes[f"{p}down.{i}.block.0.conv2.weight"][0] // ch for i in range(n_levels))
    n_embed, embed = shapes[prefix + "quantize.embedding.weight"]
    return VQConfig(ch=ch, ch_mult=mult, num_res_blocks=_count(shapes, p + "down.0.block.{}."),
                    z_channels=shapes[p + "conv_out.weight"][0], embed_dim=embed, n_embed=n_embed,
                    in_channels=shapes[p + "conv_in.weight"][1],
                    out_channels=shapes[prefix + "decoder.conv_out.weight"][0], **_attention(shapes, prefix, n_levels))


def detect_first_stage(shapes: Shapes, prefix: str = VAE) -> VAEConfig | None:
    """The first stage under `prefix`, VQ (a VQConfig) or KL (a VAEConfig); None when there is none."""
    return detect_vq(shapes, prefix) or detect_vae(shapes, prefix)


def hf_text(shapes: Shapes, prefix: str, layer: str, final_ln: bool) -> TextEncoderConfig:
    """A transformers-named CLIP text tower (CLIP-L in SD1 and SDXL); with or without the `text_model.` level."""
    base = prefix + ("text_model." if prefix + "text_model.embeddings.token_embedding.weight" in shapes else "")
    vocab, width = shapes[base + "embeddings.token_embedding.weight"]
    return TextEncoderConfig(
        naming="hf", prefix=prefix, width=width, layers=_count(shapes, base + "encoder.layers.{}."),
        heads=max(1, width // 64), mlp=shapes[base + "encoder.layers.0.mlp.fc1.weight"][0], act="quick_gelu",
        vocab_size=vocab, context_length=shapes[base + "embeddings.position_embedding.weight"][0],
        projection_dim=shapes[prefix + "text_projection.weight"][0] if prefix + "text_projection.weight" in shapes else 0,
        pad_token=49407, layer=layer, final_ln=final_ln, output_pooled=False,
    )


def openclip_text(shapes: Shapes, prefix: str, layer: str, final_ln: bool, pooled: bool) -> TextEncoderConfig:
    """An OpenCLIP-named text tower (ViT-H in SD2, bigG in SDXL)."""
    vocab, width = shapes[prefix + "token_embedding.weight"]
    proj = shapes.get(prefix + "text_projection")
    return TextEncoderConfig(
        naming="openclip", prefix=prefix, width=width, layers=_count(shapes, prefix + "transformer.resblocks.{}."),
        heads=max(1, width // 64), mlp=shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0], act="gelu",
        vocab_size=vocab, context_length=shapes[prefix + "positional_embedding"][0],
        projection_dim=proj[1] if proj else 0, pad_token=0, layer=layer, final_ln=final_ln, output_pooled=pooled,
    )


def has(shapes: Shapes, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def describe_contents(shapes: Shapes) -> str:
    """Top-level prefixes with tensor counts, for error messages about unknown files."""
    counts: dict[str, int] = {}
    for k in shapes:
        parts = k.split(".")
        depth = 3 if parts[0] in ("model", "conditioner", "cond_stage_model") else 2
        head = ".".join(parts[: min(depth, len(parts) - 1)]) or k
        counts[head] = counts.get(head, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:8]
    return ", ".join(f"{k} ({n})" for k, n in top) + (" ..." if len(counts) > 8 else "")


def count_prefix(shapes: Shapes, prefix: str) -> int:
    """Number of tensors under `prefix`."""
    return sum(1 for k in shapes if k.startswith(prefix))



def detect_mmdit(shapes: Shapes, prefix: str = UNET):
    """SD3 / SD3.5 MMDiT numbers from shapes (sd.mmdit.mmdit_config_for, as the SD3.5 reference reads them), as a
    one-line CheckpointError when the keys are not a complete MMDiT."""
    from ..mmdit import mmdit_config_for

    try:
        return mmdit_config_for(shapes, prefix)
    except (ValueError, KeyError, IndexError) as e:
        raise CheckpointError(f"the SD3/SD3.5 MMDiT ({prefix}*) is incomplete or damaged: {e}") from None
