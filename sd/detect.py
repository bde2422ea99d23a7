"""State-dict names and shapes -> ModelSpec: which model a file is, and its architecture numbers.

Detection works on `{key: shape}` alone (a safetensors header is enough), by structure: which prefixes and blocks
exist, conv or linear `proj_in`, how the vector width splits into pooled text + n x 256 Fourier features.
Widths are read, never compared with the released numbers, so tiny test checkpoints are detected like real ones
(the way ComfyUI's `model_detection.py` and the SD3.5 reference code read configs from shapes).
What shapes cannot tell, eps vs v prediction, is decided in `decide_prediction` (override > marker > preset > probe).
"""
from __future__ import annotations

import re
from dataclasses import replace
from functools import lru_cache

from .checkpoint import CheckpointError
from .config import LatentFormat, ModelSpec, TextEncoderConfig, UNetConfig, VAEConfig

Shapes = dict[str, tuple[int, ...]]

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SDXL_FOURIER = 256  # width of each SDXL size/crop/aesthetic embedding

LATENTS = {
    "sd": LatentFormat(0.18215, 0.0, 4, 8),
    "sdxl": LatentFormat(0.13025, 0.0, 4, 8),
    "x4": LatentFormat(0.08333, 0.0, 4, 4),
}
# Parts of the released files this engine loads tensors for but cannot run yet (family -> prefixes).
UNSUPPORTED_PARTS = {
    "depth_model.": "MiDaS depth estimator (depth-to-image conditioning not implemented yet)",
    "embedder.": "unCLIP image embedder (image variations not implemented yet)",
    "noise_augmentor.": "unCLIP noise augmentation (not implemented yet)",
    "low_scale_model.": "x4 upscaler low-res noise schedule (upscaling not implemented yet)",
}
FAMILY_UNSUPPORTED = {
    "sd1-inpaint": "inpainting mask input (9-channel UNet) not implemented yet; text-to-image runs are refused",
    "sd2-inpaint": "inpainting mask input (9-channel UNet) not implemented yet; text-to-image runs are refused",
    "sdxl-inpaint": "inpainting mask input (9-channel UNet) not implemented yet; text-to-image runs are refused",
    "sd2-depth": "depth conditioning (5-channel UNet) not implemented yet",
    "sd2-x4-upscaler": "x4 upscaling (7-channel UNet + noise level) not implemented yet",
    "sd2-unclip-h": "unCLIP image embedding conditioning not implemented yet",
    "sd2-unclip-l": "unCLIP image embedding conditioning not implemented yet",
}


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
    context_dim = 0
    for i in range(1, n_in):
        b = f"{p}input_blocks.{i}."
        if b + "0.op.weight" in shapes:
            levels.append([])
            continue
        if b + "0.out_layers.3.weight" not in shapes:
            raise CheckpointError(f"UNet input_blocks.{i} is incomplete or missing (no ResBlock or Downsample found); "
                                  "the file is damaged or not a Stable Diffusion UNet")
        ch = shapes[b + "0.out_layers.3.weight"][0]
        depth = _count(shapes, b + "1.transformer_blocks.{}.")
        if depth:
            linear = len(shapes[b + "1.proj_in.weight"]) == 2
            context_dim = shapes[b + "1.transformer_blocks.0.attn2.to_k.weight"][1]
            attn1_k = shapes[b + "1.transformer_blocks.0.attn1.to_k.weight"][1]
            if len(disable_self) < len(levels):
                disable_self.append(attn1_k != ch)
        elif len(disable_self) < len(levels):
            disable_self.append(False)
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
    if mid_depth and not context_dim:
        context_dim = shapes[p + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"][1]
        linear = len(shapes[p + "middle_block.1.proj_in.weight"]) == 2
    adm = shapes[p + "label_emb.0.0.weight"][1] if p + "label_emb.0.0.weight" in shapes else 0
    num_classes = shapes[p + "label_emb.weight"][0] if p + "label_emb.weight" in shapes else 0
    # Heads by each family's rule: conv proj_in (SD1) and the x4 upscaler (class-embedded) use 8 heads;
    # the linear SD2/SDXL UNets use 64 channels per head.
    by_count = not linear or num_classes > 0
    return UNetConfig(
        in_channels=in_ch, out_channels=out_ch, model_channels=mc, channel_mult=tuple(mult), num_res_blocks=nrb,
        transformer_depth=tuple(depths), transformer_depth_middle=mid_depth, context_dim=context_dim,
        num_heads=8, num_head_channels=-1 if by_count else 64,
        use_linear_in_transformer=linear, adm_in_channels=adm, num_classes=num_classes,
        disable_self_attn=tuple(disable_self[: len(mult)] + [False] * (len(mult) - len(disable_self)))
        if any(disable_self) else (),
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
                     use_quant_conv=quant)


def _hf_text(shapes: Shapes, prefix: str, layer: str, final_ln: bool) -> TextEncoderConfig:
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


def _openclip_text(shapes: Shapes, prefix: str, layer: str, final_ln: bool, pooled: bool) -> TextEncoderConfig:
    """An OpenCLIP-named text tower (ViT-H in SD2, bigG in SDXL)."""
    vocab, width = shapes[prefix + "token_embedding.weight"]
    proj = shapes.get(prefix + "text_projection")
    return TextEncoderConfig(
        naming="openclip", prefix=prefix, width=width, layers=_count(shapes, prefix + "transformer.resblocks.{}."),
        heads=max(1, width // 64), mlp=shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0], act="gelu",
        vocab_size=vocab, context_length=shapes[prefix + "positional_embedding"][0],
        projection_dim=proj[1] if proj else 0, pad_token=0, layer=layer, final_ln=final_ln, output_pooled=pooled,
    )


def _has(shapes: Shapes, prefix: str) -> bool:
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


def detect(shapes: Shapes, prediction: str | None = None) -> ModelSpec:
    """Detect the family and architecture of a checkpoint from `{key: shape}`.

    `prediction` ("eps"/"v") is a user override; otherwise the family's known type is used, and sd2 (512 eps vs
    768 v share a layout) is left as "probe" for the loader to settle with A1111's test (see `probe_is_v`).
    """
    if any(k.startswith(UNET + "joint_blocks.") or k.startswith("joint_blocks.") for k in shapes):
        raise CheckpointError("this is an SD3/SD3.5 MMDiT checkpoint; SD3 support is not implemented yet")
    if UNET + "input_blocks.0.0.weight" not in shapes:
        if "input_blocks.0.0.weight" in shapes or "conv_in.weight" in shapes:
            hint = "it looks like a bare UNet or a diffusers-format file; give the original single-file checkpoint"
        elif any(k.startswith("encoder.down") or k.startswith("decoder.up") for k in shapes):
            hint = "it looks like a standalone VAE; give a full Stable Diffusion checkpoint"
        else:
            hint = "it is not a Stable Diffusion checkpoint"
        raise CheckpointError(f"no Stable Diffusion UNet ({UNET}*) found; {hint}. Found: {describe_contents(shapes)}")
    unet = detect_unet(shapes)
    vae = detect_vae(shapes)
    texts: tuple[TextEncoderConfig, ...]
    E0, E1 = "conditioner.embedders.0.", "conditioner.embedders.1."
    if _has(shapes, E0 + "transformer.") and _has(shapes, E1 + "model."):
        texts = (_hf_text(shapes, E0 + "transformer.", "penultimate", False),
                 _openclip_text(shapes, E1 + "model.", "penultimate", False, True))
        family = "sdxl-inpaint" if unet.in_channels == 9 else "sdxl-base"
        latent = LATENTS["sdxl"]
    elif _has(shapes, E0 + "model.") and unet.adm_in_channels:
        texts = (_openclip_text(shapes, E0 + "model.", "penultimate", False, True),)
        family, latent = "sdxl-refiner", LATENTS["sdxl"]
    elif _has(shapes, "cond_stage_model.model.") or _has(shapes, E0 + "model."):
        pre = "cond_stage_model.model." if _has(shapes, "cond_stage_model.model.") else E0 + "model."
        texts = (_openclip_text(shapes, pre, "penultimate", True, False),)
        latent = LATENTS["sd"]
        if unet.in_channels == 9:
            family = "sd2-inpaint"
        elif unet.in_channels == 5 or _has(shapes, "depth_model."):
            family = "sd2-depth"
        elif unet.num_classes:
            family, latent = "sd2-x4-upscaler", LATENTS["x4"]
        elif unet.adm_in_channels:
            family = "sd2-unclip-h" if unet.adm_in_channels // 2 == texts[0].width else "sd2-unclip-l"
        else:
            family = "sd2"
    elif _has(shapes, "cond_stage_model.transformer."):
        texts = (_hf_text(shapes, "cond_stage_model.transformer.", "last", True),)
        family = "sd1-inpaint" if unet.in_channels == 9 else "sd1"
        latent = LATENTS["sd"]
    elif _has(shapes, "cond_stage_model."):
        raise CheckpointError("unknown text encoder layout under cond_stage_model.* (latent-diffusion BERT models are "
                              f"not supported). Found: {describe_contents(shapes)}")
    else:
        raise CheckpointError("the file has a UNet but no text encoder (cond_stage_model.* / conditioner.*); "
                              "use a full checkpoint that includes its text encoder")
    if latent.channels != unet.out_channels:
        latent = replace(latent, channels=unet.out_channels)
    if vae is not None and vae.factor != latent.factor:
        latent = replace(latent, factor=vae.factor)
    _check_sdxl_vector(family, unet, texts)
    unsupported = tuple(f"{pfx}* ({_n(shapes, pfx)} tensors): {why}" for pfx, why in UNSUPPORTED_PARTS.items() if _has(shapes, pfx))
    if family in FAMILY_UNSUPPORTED:
        unsupported += (FAMILY_UNSUPPORTED[family],)
    if vae is None:
        unsupported += ("no VAE in the file (first_stage_model.*): generation needs a separate VAE, not supported yet",)
    pred, source = decide_prediction(family, shapes, prediction)
    return ModelSpec(family=family, unet=unet, vae=vae, text_encoders=texts, latent=latent, prediction=pred,
                     prediction_source=source, unsupported=unsupported)


def _n(shapes: Shapes, prefix: str) -> int:
    return sum(1 for k in shapes if k.startswith(prefix))


def _check_sdxl_vector(family: str, unet: UNetConfig, texts: tuple[TextEncoderConfig, ...]) -> None:
    """SDXL's adm vector = pooled bigG + n Fourier features of 256: base n=6 (sizes, crop), refiner n=5 (+ score)."""
    if not family.startswith("sdxl"):
        return
    pooled = texts[-1].projection_dim or texts[-1].width
    n = 6 if family != "sdxl-refiner" else 5
    if unet.adm_in_channels != pooled + n * SDXL_FOURIER:
        raise CheckpointError(f"{family}: the UNet vector input is {unet.adm_in_channels} wide but pooled text "
                              f"({pooled}) + {n} x {SDXL_FOURIER} = {pooled + n * SDXL_FOURIER}; the file mixes parts of different models")


def decide_prediction(family: str, shapes: Shapes, override: str | None) -> tuple[str, str]:
    """(prediction, what decided it). 'probe' means: the loader must run `probe_is_v` on the UNet."""
    if override:
        if override not in ("eps", "v"):
            raise CheckpointError(f"prediction must be eps or v, got {override!r}")
        return override, "user override"
    if "v_pred" in shapes:
        return "v", "v_pred marker key in the file"
    known = preset_predictions()
    if family in known:
        return known[family], f"the {family} preset (all released {family} files use it)"
    return "eps", "probe"


@lru_cache(maxsize=1)
def preset_predictions() -> dict[str, str]:
    """family -> prediction type, for the families whose presets (presets/*.json) all agree on one. SD 2.x has an
    eps preset (512) and a v preset (768) for the same layout, so it is left to the probe."""
    from .presets import load_presets

    seen: dict[str, set[str]] = {}
    for preset in load_presets().values():
        for fam in preset["families"]:
            seen.setdefault(fam, set()).add(preset["prediction"])
    return {fam: preds.pop() for fam, preds in seen.items() if len(preds) == 1}
