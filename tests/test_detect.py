"""Detection and layout against the released key lists in ../shared/reference/checkpoint-keys/.

For every SD1/SD2/SDXL layout: the spec detected from the key/shape list alone names the right family, and the
models built from that spec on the meta device have exactly the file's tensors (names and shapes), the documented
ignore rules and the not-yet-supported parts excepted.
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from sd.checkpoint import ignore_reason
from sd.detect import UNSUPPORTED_PARTS, detect
from sd.loader import account_keys, expected_tensors
from sd.unet import unet_config_for

from .tiny import REFERENCE_DIR

CASES = {
    "sd1": ("sd1", "eps"),
    "sd2_512_eps": ("sd2", "probe"),
    "sd2_768_v": ("sd2", "probe"),
    "sd2_inpaint": ("sd2-inpaint", "eps"),
    "sd2_depth": ("sd2-depth", "eps"),
    "sd2_x4_upscaler": ("sd2-x4-upscaler", "v"),
    "sd21_unclip_h": ("sd2-unclip-h", "v"),
    "sdxl_base": ("sdxl-base", "eps"),
    "sdxl_refiner": ("sdxl-refiner", "eps"),
}


def _norm(u):
    """disable_self_attn only means something at levels that have attention."""
    flags = tuple(f and d > 0 for f, d in zip(u.disable_self_attn, u.transformer_depth))
    return replace(u, disable_self_attn=flags if any(flags) else ())


def load_ref(name: str) -> dict:
    return json.loads((REFERENCE_DIR / f"{name}.json").read_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_family_and_layout(name: str) -> None:
    ref = load_ref(name)
    shapes = {k: tuple(v) for k, v in ref["tensors"].items()}
    spec = detect(shapes)
    family, prediction = CASES[name]
    assert spec.family == family
    assert (spec.prediction if spec.prediction_source != "probe" else "probe") == prediction
    assert _norm(spec.unet) == _norm(unet_config_for(family))
    expected = {k: s for comp in expected_tensors(spec).values() for k, s in comp.items()}
    file_keys = {k: s for k, s in shapes.items()
                 if ignore_reason(k) is None and not k.startswith(tuple(UNSUPPORTED_PARTS))}
    assert sorted(set(expected) - set(file_keys)) == []
    assert sorted(set(file_keys) - set(expected)) == []
    assert {k: s for k, s in file_keys.items() if expected[k] != s} == {}
    rep = account_keys(shapes, spec)
    assert rep.missing == [] and rep.unexpected == [] and rep.shape_mismatch == []
    # the optional EMA copies of training files are accounted for by a rule too
    opt = {k: tuple(v) for k, v in ref.get("optional_tensors", {}).items()}
    assert all(ignore_reason(k) for k in opt if k.startswith("model_ema")), "every EMA key has an ignore rule"


def test_text_encoder_choices() -> None:
    sd1 = detect({k: tuple(v) for k, v in load_ref("sd1")["tensors"].items()})
    (clip,) = sd1.text_encoders
    assert (clip.naming, clip.width, clip.layers, clip.heads, clip.mlp, clip.layer, clip.final_ln, clip.pad_token) == \
        ("hf", 768, 12, 12, 3072, "last", True, 49407)
    sd2 = detect({k: tuple(v) for k, v in load_ref("sd2_768_v")["tensors"].items()})
    (h,) = sd2.text_encoders
    assert (h.naming, h.width, h.layers, h.heads, h.act, h.layer, h.final_ln, h.pad_token) == \
        ("openclip", 1024, 24, 16, "gelu", "penultimate", True, 0)
    xl = detect({k: tuple(v) for k, v in load_ref("sdxl_base")["tensors"].items()})
    l, g = xl.text_encoders
    assert (l.layer, l.final_ln, g.layer, g.final_ln, g.output_pooled, g.width, g.layers, g.projection_dim) == \
        ("penultimate", False, "penultimate", False, True, 1280, 32, 1280)
    assert xl.unet.adm_in_channels == 2816 and xl.latent.scale == 0.13025
    ref = detect({k: tuple(v) for k, v in load_ref("sdxl_refiner")["tensors"].items()})
    assert ref.unet.adm_in_channels == 2560 and len(ref.text_encoders) == 1
    up = detect({k: tuple(v) for k, v in load_ref("sd2_x4_upscaler")["tensors"].items()})
    assert up.latent.factor == 4 and up.latent.scale == 0.08333 and up.unsupported == ()   # runs (issue 10)


def test_sdxl_base_without_text_level_and_marker_key() -> None:
    shapes = {k: tuple(v) for k, v in load_ref("sdxl_base")["tensors"].items()}
    shapes["v_pred"] = ()
    spec = detect(shapes)
    assert (spec.prediction, spec.prediction_source) == ("v", "v_pred marker key in the file")
    assert detect(shapes, prediction="eps").prediction_source == "user override"


def test_inpaint_variants_detected_by_input_channels() -> None:
    shapes = {k: tuple(v) for k, v in load_ref("sd1")["tensors"].items()}
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (320, 9, 3, 3)
    assert detect(shapes).family == "sd1-inpaint"
    xl = {k: tuple(v) for k, v in load_ref("sdxl_base")["tensors"].items()}
    xl["model.diffusion_model.input_blocks.0.0.weight"] = (320, 9, 3, 3)
    assert detect(xl).family == "sdxl-inpaint"


def test_old_clip_names_without_text_model_level() -> None:
    """Older SD1 files drop the `text_model.` level of CLIP-L names; they detect and account the same."""
    shapes = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): tuple(v)
              for k, v in load_ref("sd1")["tensors"].items()}
    spec = detect(shapes)
    assert spec.family == "sd1" and spec.text_encoders[0].layers == 12
    rep = account_keys(shapes, spec)
    assert rep.missing == [] and rep.unexpected == [] and rep.shape_mismatch == []
    assert len(rep.loaded["text0"]) == 196  # every CLIP-L weight (position_ids is ignored by rule)
