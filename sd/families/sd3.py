"""SD3 and SD3.5 (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis"):
an MMDiT (sd.mmdit) on a 16-channel f8 latent (scale 1.5305, shift 0.0609), rectified flow with a timestep shift,
conditioned on CLIP-L + CLIP-G (+ T5-XXL) through `sd.sd3_text.encode_sd3_prompt`:
crossattn = [zero-padded cat(CLIP-L, CLIP-G) penultimate; T5] (B, 77 [+ L_t5], ctx), vector = the two pooled
outputs (B, 2048). The negative prompt is always encoded (also "").

Families (told apart by structure, never by a width):
- `sd3`: SD3 medium, no qk-norm (`joint_blocks.0.x_block.attn.ln_q.weight` absent); `sd3_medium_incl_clips*`
  bundles the text encoders.
- `sd3.5-large`: RMS qk-norm, no MMDiT-X blocks; SD3.5 large turbo has the same layout (pick the
  `sd3.5-large-turbo` preset: 4 steps, CFG 1).
- `sd3.5-medium`: qk-norm and MMDiT-X (`x_block.attn2`) in its first blocks; skip-layer guidance on by default
  (layers 7, 8, 9; sd.slg).
SD3.5 files carry only the MMDiT and the VAE: the text towers come from separate files (sd.text_encoders).

Sampling: D(x, sigma) = x - sigma * MMDiT(x, t = 1000 sigma) (sd.denoiser "flow"); sigmas
`sigma(t) = shift t / (1 + (shift - 1) t)`, schedule "normal" the reference's (sd.schedules.flow_schedule), the
start noise not scaled (sigma 1); decode `latent / 1.5305 + 0.0609`.
"""
from __future__ import annotations

import re

from ..config import LatentFormat
from ..schedules import flow_schedule
from .common import batched
from .family import Family, Input
from .shapes import UNET, detect_vae

# ComfyUI's SD3 latent format (`comfy/latent_formats.py`, SD3): scale / shift and the latent -> RGB fit.
LATENT = LatentFormat(scale=1.5305, shift=0.0609, channels=16, factor=8)
RGB = (((-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458), (0.0856, 0.0339, 0.0902),
        (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309), (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358),
        (-0.0194, 0.0020, 0.0669), (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
        (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293),
        (-0.1448, -0.1463, -0.1189)),
       (0.2394, 0.2135, 0.1925))
SHIFT = 3.0                       # every SD3 / 3.5 scheduler config (and ComfyUI); the reference script: 1 for SD3 medium
MEDIUM_SLG_LAYERS = (7, 8, 9)     # sd3_infer.py's defaults for 3.5 medium
QK_NORM = UNET + "joint_blocks.0.x_block.attn.ln_q.weight"

INPUTS = (
    Input("shift", "number", "Shift", default=SHIFT, min=0.1, max=10,
          help="Timestep shift of the flow sigmas, sigma(t) = shift t / (1 + (shift - 1) t); 3 for SD3 and 3.5."),
    Input("slg_layers", "text", "Skip-layer guidance layers", default="",
          help="Joint blocks the extra SLG pass leaves out, e.g. 7,8,9; empty: the model's own (3.5 medium: "
               "7,8,9, others none); none: off."),
    Input("slg_scale", "number", "Skip-layer guidance scale", default=2.5, min=0, max=10,
          help="out += (positive - positive without the layers) * scale; 0 is plain CFG."),
    Input("slg_start", "number", "Skip-layer guidance start", default=0.01, min=0, max=1,
          help="SLG runs while start * steps < step < end * steps."),
    Input("slg_end", "number", "Skip-layer guidance end", default=0.2, min=0, max=1,
          help="SLG runs while start * steps < step < end * steps."),
    Input("use_t5", "bool", "Use T5-XXL", default=True, cli="--no-t5",
          help="Without T5 the prompt goes through CLIP-L/G alone (less memory, prompts followed less closely)."),
)


def parse_layers(text, default: tuple[int, ...]) -> tuple[int, ...]:
    """'7,8,9' / '7 8 9' / '[7, 8, 9]' -> (7, 8, 9); '' -> `default`; 'none' / 'off' -> ()."""
    t = str(text or "").strip().lower()
    if not t:
        return default
    if t in ("none", "off", "0 layers"):
        return ()
    parts = [p for p in re.split(r"[\s,;\[\]()]+", t) if p]
    if not all(p.isdigit() for p in parts):
        raise ValueError(f"slg_layers must be block numbers like 7,8,9 (or none), got {str(text)[:40]!r}")
    return tuple(int(p) for p in parts)


def check(inputs: dict) -> None:
    parse_layers(inputs.get("slg_layers"), ())
    if inputs["slg_start"] >= inputs["slg_end"]:
        raise ValueError(f"slg_start ({inputs['slg_start']:g}) must be below slg_end ({inputs['slg_end']:g})")


# ----------------------------------------------------------------------------------------------- recognition


def _dual(shapes) -> bool:
    return any(k.startswith(UNET + "joint_blocks.") and ".x_block.attn2." in k for k in shapes)


def sd3_medium(shapes, net) -> bool:
    return QK_NORM not in shapes


def sd35_large(shapes, net) -> bool:
    return QK_NORM in shapes and not _dual(shapes)


def sd35_medium(shapes, net) -> bool:
    return QK_NORM in shapes and _dual(shapes)


def build(shapes, net):
    from ..text_encoders import bundled_configs

    return detect_vae(shapes), bundled_configs(shapes)


def vector_width(texts, net) -> int:
    """CLIP-L pooled (unprojected) + CLIP-G pooled (projected); the MMDiT's own width when the file has no towers."""
    return texts[0].width + texts[1].projection_dim if len(texts) == 2 else net.adm_in_channels


def text_tensors(shapes) -> dict[str, dict[str, tuple[int, ...]]]:
    """A bundled T5's keys (the CLIP towers are accounted as spec.text_encoders)."""
    from ..text_encoders import t5_tensors

    keys = t5_tensors(shapes)
    return {"t5xxl": keys} if keys else {}


def text_parts(ckpt, spec, sources, device, dtype):
    from ..text_encoders import load_sd3_text

    return load_sd3_text(ckpt, spec.unet.context_dim, spec.unet.adm_in_channels, sources, device, dtype)


# ----------------------------------------------------------------------------------------------- conditioning


def _t5(parts, request):
    from ..text_encoders import T5Tower

    t5 = next((m for m in parts.text_encoders[2:] if isinstance(m, T5Tower)), None)
    return t5 if t5 is not None and (request.inputs or {}).get("use_t5", True) else None


def condition(parts, spec, request, generator=None) -> tuple[dict, dict]:
    """{crossattn (B, 77 [+ L_t5], ctx), vector (B, 2048)} of the prompt and of the negative (always encoded). The
    towers are loaded one at a time for it and dropped after (sd.text_encoders.Resident): none stays in memory
    while the MMDiT samples, unless kept."""
    from ..sd3_text import encode_sd3_prompts
    from ..text_encoders import load_tower

    clip_l, clip_g = parts.text_encoders[:2]
    pos, neg = encode_sd3_prompts([request.prompt, request.negative_prompt], clip_l, clip_g, spec.unet.context_dim,
                                  _t5(parts, request), use=load_tower)
    return batched(pos, request.batch_size), batched(neg, request.batch_size)


def request_notes(parts, spec, request) -> tuple[str, ...]:
    from ..text_encoders import T5Tower

    has_t5 = any(isinstance(m, T5Tower) for m in parts.text_encoders)
    if has_t5 and not (request.inputs or {}).get("use_t5", True):
        return ("T5-XXL off for this request: the prompt went through CLIP-L/G alone",)
    return ()


def sigmas_for(schedule: str, steps: int, inputs: dict):
    return flow_schedule(schedule, steps, float(inputs.get("shift", SHIFT)))


def guidance_for(default_layers: tuple[int, ...]):
    """CFG, plus skip-layer guidance (sd.slg) when the request's layers (or the family's own) and scale ask for it."""

    def guide(denoise, cond, uncond, request, sigmas, spec):
        from ..guidance import cfg_denoiser
        from ..slg import SkipLayerGuidance, slg_cfg_denoiser

        inp = request.inputs or {}
        layers = parse_layers(inp.get("slg_layers"), default_layers)
        bad = [i for i in layers if i >= spec.unet.depth]
        if bad:
            raise ValueError(f"slg_layers {bad} do not exist: this MMDiT has joint blocks 0..{spec.unet.depth - 1}")
        scale = float(inp.get("slg_scale", 2.5))
        if not layers or scale == 0:
            return cfg_denoiser(denoise, cond, uncond, request.cfg, rescale=request.guidance_rescale)
        slg = SkipLayerGuidance(layers, scale, float(inp.get("slg_start", 0.01)), float(inp.get("slg_end", 0.2)))
        return slg_cfg_denoiser(denoise, cond, uncond, request.cfg, sigmas, slg)

    return guide


def _num(v) -> str:
    v = float(v)
    return str(int(v)) if v.is_integer() else f"{v:g}"


def infotext_for(default_layers: tuple[int, ...]):
    """`Shift`, `Skip layer guidance layers/scale/start/end` (when SLG runs), `T5: off` - from the request's inputs
    given to build_parameters (nothing for the ones it was not given)."""

    def fields(kw: dict) -> dict[str, str]:
        out = {}
        if kw.get("shift") is not None:
            out["Shift"] = _num(kw["shift"])
        if "slg_layers" in kw or "slg_scale" in kw:
            layers = parse_layers(kw.get("slg_layers"), default_layers)
            scale = float(kw["slg_scale"]) if kw.get("slg_scale") is not None else 2.5
            if layers and scale:
                out["Skip layer guidance layers"] = ",".join(map(str, layers))
                out["Skip layer guidance scale"] = _num(scale)
                out["Skip layer guidance start"] = _num(kw["slg_start"] if kw.get("slg_start") is not None else 0.01)
                out["Skip layer guidance end"] = _num(kw["slg_end"] if kw.get("slg_end") is not None else 0.2)
        if kw.get("use_t5") is False:
            out["T5"] = "off"
        return out

    return fields


# The checkpoint card's words (sd.card).
CONDITIONING = (("crossattn", "CLIP-L and CLIP-G penultimate layers side by side (77 tokens, zero-padded to the "
                              "MMDiT's width), then T5-XXL's tokens when T5 is used"),
                ("vector", "CLIP-L's pooled output ({w0}) + CLIP-G's projected pooled output ({p1})"))


def _family(name: str, label: str, matches, slg: tuple[int, ...], notes: tuple[str, ...], about: str,
            evidence: tuple[str, ...]) -> Family:
    return Family(
        name=name, label=label, tab="sd3", matches=matches, build=build, latent=LATENT, condition=condition,
        network="mmdit", vector_width=vector_width, inputs=INPUTS, check=check, default_size=1024, preview=RGB,
        infotext=infotext_for(slg), text_parts=text_parts, text_tensors=text_tensors, sigmas_for=sigmas_for,
        guidance=guidance_for(slg), request_notes=request_notes, notes=notes, about=about, evidence=evidence,
        conditioning=CONDITIONING,
    )


SD3 = _family("sd3", "SD3 medium", sd3_medium, (),
              ("bundled CLIP-L/G (+ T5) in sd3_medium_incl_clips*; otherwise separate text-encoder files",),
              "replaces SDXL's UNet with an MMDiT (text and image tokens in one joint attention), rectified flow "
              "with a sigma shift, three text encoders (CLIP-L, CLIP-G, T5-XXL) and a 16-channel latent",
              (UNET + "joint_blocks.", "!" + QK_NORM))
SD35_LARGE = _family("sd3.5-large", "SD3.5 large", sd35_large, (),
                     ("SD3.5 large turbo has the same layout: pick the sd3.5-large-turbo preset",),
                     "SD3 scaled up, with RMS normalisation of queries and keys (qk-norm) in every attention",
                     (UNET + "joint_blocks.", QK_NORM))
SD35_MEDIUM = _family("sd3.5-medium", "SD3.5 medium (MMDiT-X)", sd35_medium, MEDIUM_SLG_LAYERS,
                      ("skip-layer guidance on layers 7, 8, 9 by default",),
                      "SD3.5 at medium size: qk-norm plus MMDiT-X blocks (a second self-attention on the image "
                      "tokens) in its first layers; skip-layer guidance on by default",
                      (UNET + "joint_blocks.", QK_NORM, UNET + "joint_blocks.0.x_block.attn2."))

FAMILIES = (SD3, SD35_LARGE, SD35_MEDIUM)
