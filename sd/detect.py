"""State-dict names and shapes -> ModelSpec: which model a file is, and its architecture numbers.

The knowledge lives in the family modules (`sd/families/`): each declares how it is recognised and what it is built
from, and `sd.families.detect` walks their table. This module keeps the names the rest of the engine and the tests
import (`detect`, the shape readers, the prefixes, the not-yet-run parts).
"""
from __future__ import annotations

from .families import decide_prediction, detect, preset_predictions, unsupported_parts
from .families.sdxl import FOURIER_DIM as SDXL_FOURIER
from .families.shapes import UNET, VAE, describe_contents, detect_unet, detect_vae, hf_text, openclip_text

# Parts of the released files this engine loads tensors for but cannot run yet (prefix -> why), from the families.
UNSUPPORTED_PARTS = unsupported_parts()

__all__ = ["detect", "decide_prediction", "preset_predictions", "detect_unet", "detect_vae", "hf_text",
           "openclip_text", "describe_contents", "UNET", "VAE", "SDXL_FOURIER", "UNSUPPORTED_PARTS"]
