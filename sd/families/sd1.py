"""SD 1.x (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"): the LDM UNet with
cross-attention on CLIP ViT-L/14's last layer (+ final LN), eps prediction, kl-f8 latent scaled by 0.18215.

Families: `sd1` (4-channel UNet, text to image) and `sd1-inpaint` (sd-v1-5-inpainting: 9-channel UNet, the latent
followed by the mask and the masked-image latent as concat conditioning).
Recognised by: CLIP-L in transformers naming under `cond_stage_model.transformer.`.
"""
from __future__ import annotations

from .common import (INPAINT_CONCAT, INPAINT_INPUTS, INPAINT_OPTIONS, SD_LATENT, SD_RGB, inpaint_check,
                     inpaint_infotext, text_condition, with_inpaint)
from .family import Family
from .shapes import detect_vae, hf_text

TEXT = "cond_stage_model.transformer."


def recognise(shapes, unet) -> bool:
    """CLIP-L (with or without the `text_model.` level), no vector, no class input."""
    clip = (TEXT + "text_model.embeddings.token_embedding.weight" in shapes
            or TEXT + "embeddings.token_embedding.weight" in shapes)
    return clip and not unet.adm_in_channels and not unet.num_classes


def build(shapes, unet):
    return detect_vae(shapes), (hf_text(shapes, TEXT, "last", True),)


# The checkpoint card's words (sd.card).
EVIDENCE = (TEXT, "!model.diffusion_model.label_emb.0.0.weight")
CONDITIONING = (("crossattn", "CLIP ViT-L/14's last layer ({w0} wide, + final layer norm), 77 tokens per 75-token "
                              "chunk"),)


SD1 = Family(
    name="sd1", label="SD 1.x", tab="sd1", matches=recognise, build=build, latent=SD_LATENT,
    condition=text_condition, preview=SD_RGB, evidence=EVIDENCE, conditioning=CONDITIONING,
    about="text-to-image latent diffusion; adds over the LDM models the CLIP ViT-L/14 text encoder read through "
          "cross-attention, eps prediction and classifier-free guidance, on a 4-channel f8 latent (scale 0.18215)",
)

SD1_INPAINT = Family(
    name="sd1-inpaint", label="SD 1.x inpainting", tab="inpaint", matches=recognise, build=build, latent=SD_LATENT,
    condition=with_inpaint(text_condition), concat=INPAINT_CONCAT, inputs=INPAINT_INPUTS, options=INPAINT_OPTIONS,
    check=inpaint_check, preview=SD_RGB, infotext=inpaint_infotext, evidence=EVIDENCE,
    conditioning=(*CONDITIONING, ("concat", "the mask (1 channel) and the masked image's latent (4), after the "
                                            "noisy latent: a 9-channel UNet input")),
    about="SD 1.x retrained for inpainting: adds the mask and the masked image's latent as 5 extra input channels",
)

FAMILIES = (SD1, SD1_INPAINT)
