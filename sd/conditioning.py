"""Prompt -> conditioning, by the family of a spec: `encode_conditions` (the older call that tests and tools use).

The conditioners themselves live in the family modules (`sd/families/`) and return SGM-named dicts (`crossattn`,
`vector`, `concat`); this wrapper runs a family's conditioner on a prompt/negative pair and names the results the
way the UNet takes them (`context`, `y`, `concat`).
"""
from __future__ import annotations

from types import SimpleNamespace

from .config import ModelSpec
from .families import get_family
from .families.common import fourier
from .families.sdxl import SDXLSizes

UNET_NAMES = {"crossattn": "context", "vector": "y", "concat": "concat"}

__all__ = ["SDXLSizes", "encode_conditions", "fourier", "UNET_NAMES"]


def encode_conditions(encoders, spec: ModelSpec, prompt: str, negative: str, batch: int,
                      sizes: SDXLSizes | None = None, clip_skip: int = 1) -> tuple[dict, dict]:
    """(cond, uncond): dicts of UNet inputs (context, y) with batch dimension `batch`, for text-only families."""
    sizes = sizes or SDXLSizes(original=(0, 0))
    request = SimpleNamespace(prompt=prompt, negative_prompt=negative, batch_size=batch, clip_skip=clip_skip,
                              height=sizes.original[0], width=sizes.original[1], sdxl_original_size=sizes.original,
                              sdxl_crop=sizes.crop, sdxl_target_size=sizes.target, aesthetic_score=sizes.aesthetic,
                              negative_aesthetic_score=sizes.negative_aesthetic, inputs={})
    fam = get_family(spec.family)
    if fam.condition is None:
        raise ValueError(f"{spec.family}: {fam.unsupported}")
    cond, uncond = fam.condition(SimpleNamespace(text_encoders=encoders, vae=None), spec, request, None)
    rename = lambda d: {UNET_NAMES[k]: v for k, v in d.items()}  # noqa: E731
    return rename(cond), rename(uncond)
