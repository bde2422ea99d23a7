"""SD 2.x (Stability AI's LDM release, Rombach et al. 2022): the LDM UNet with linear proj_in and 64-channel heads,
cross-attention on OpenCLIP ViT-H/14's penultimate layer (+ final LN), eps (512) or v (768) prediction, kl-f8.

Families: `sd2` (text to image; eps or v settled by the A1111 probe), `sd2-inpaint` (512-inpainting-ema: 9-channel
UNet, concat = mask + masked-image latent), and, detected and loaded but not run yet, `sd2-depth` (5 channels:
MiDaS depth), `sd2-x4-upscaler` (7 channels: latent + low-res RGB, noise-level class label, kl-f4 latent),
`sd2-unclip-h` / `sd2-unclip-l` (CLIP image embedding + noise level as the UNet's vector).
Recognised by: an OpenCLIP text tower under `cond_stage_model.model.` (or SGM's `conditioner.embedders.0.model.`
without a second tower and without a vector input, which would be the SDXL refiner).
"""
from __future__ import annotations

from ..config import LatentFormat
from .common import (INPAINT_CONCAT, INPAINT_INPUTS, INPAINT_OPTIONS, SD_LATENT, SD_RGB, inpaint_check,
                     inpaint_infotext, text_condition, with_inpaint)
from .family import Family
from .shapes import detect_vae, has, openclip_text

LDM_TEXT, SGM_TEXT = "cond_stage_model.model.", "conditioner.embedders.0.model."
X4_LATENT = LatentFormat(scale=0.08333, shift=0.0, channels=4, factor=4)  # x4-upscaling.yaml scale_factor


def text_prefix(shapes, unet) -> str | None:
    if has(shapes, LDM_TEXT):
        return LDM_TEXT
    if has(shapes, SGM_TEXT) and not has(shapes, "conditioner.embedders.1.") and not unet.adm_in_channels:
        return SGM_TEXT
    return None


def build(shapes, unet):
    return detect_vae(shapes), (openclip_text(shapes, text_prefix(shapes, unet), "penultimate", True, False),)


def plain(shapes, unet) -> bool:
    """No vector and no class input: sd2, sd2-inpaint, sd2-depth (told apart by their concat channels)."""
    return text_prefix(shapes, unet) is not None and not unet.adm_in_channels and not unet.num_classes


def upscaler(shapes, unet) -> bool:
    return text_prefix(shapes, unet) is not None and unet.num_classes > 0


def unclip(h: bool):
    def match(shapes, unet) -> bool:
        if text_prefix(shapes, unet) != LDM_TEXT or not unet.adm_in_channels:
            return False
        width = shapes[LDM_TEXT + "token_embedding.weight"][1]
        return (unet.adm_in_channels // 2 == width) == h   # ViT-H image embedding (1024) + its noise level
    return match


SD2 = Family(
    name="sd2", label="SD 2.x", tab="sd2", matches=plain, build=build, latent=SD_LATENT, condition=text_condition,
    default_size=512, v_size=768, preview=SD_RGB, preset="sd2", preset_v="sd2-v",
)

SD2_INPAINT = Family(
    name="sd2-inpaint", label="SD 2 inpainting", tab="inpaint", matches=plain, build=build, latent=SD_LATENT,
    condition=with_inpaint(text_condition), concat=INPAINT_CONCAT, inputs=INPAINT_INPUTS, options=INPAINT_OPTIONS,
    check=inpaint_check, preview=SD_RGB, infotext=inpaint_infotext,
)

SD2_DEPTH = Family(
    name="sd2-depth", label="SD 2 depth-to-image", tab="variants", matches=plain, build=build, latent=SD_LATENT,
    concat=(("depth", 1),), preview=SD_RGB,
    parts=(("depth_model.", "MiDaS depth estimator (depth-to-image conditioning not implemented yet)"),),
    unsupported="depth conditioning (5-channel UNet) not implemented yet",
)

SD2_X4 = Family(
    name="sd2-x4-upscaler", label="SD 2 x4 upscaler", tab="variants", matches=upscaler, build=build,
    latent=X4_LATENT, concat=(("low_res", 3),), schedule=(0.0001, 0.02, 1000), preview=SD_RGB,
    parts=(("low_scale_model.", "x4 upscaler low-res noise schedule (upscaling not implemented yet)"),),
    unsupported="x4 upscaling (7-channel UNet + noise level) not implemented yet",
)

_UNCLIP_PARTS = (("embedder.", "unCLIP image embedder (image variations not implemented yet)"),
                 ("noise_augmentor.", "unCLIP noise augmentation (not implemented yet)"))
SD2_UNCLIP_H = Family(
    name="sd2-unclip-h", label="SD 2.1 unCLIP (ViT-H)", tab="variants", matches=unclip(True), build=build,
    latent=SD_LATENT, vector_width=lambda texts, unet: 2 * texts[0].width, default_size=768, preview=SD_RGB,
    preset="sd2-unclip", parts=_UNCLIP_PARTS, unsupported="unCLIP image embedding conditioning not implemented yet",
)
SD2_UNCLIP_L = Family(
    name="sd2-unclip-l", label="SD 2.1 unCLIP (ViT-L)", tab="variants", matches=unclip(False), build=build,
    latent=SD_LATENT, vector_width=lambda texts, unet: unet.adm_in_channels,  # CLIP-L image width: not in text shapes
    default_size=768, preview=SD_RGB, preset="sd2-unclip", parts=_UNCLIP_PARTS,
    unsupported="unCLIP image embedding conditioning not implemented yet",
)

FAMILIES = (SD2, SD2_INPAINT, SD2_DEPTH, SD2_X4, SD2_UNCLIP_H, SD2_UNCLIP_L)
