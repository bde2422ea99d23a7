"""The family table: one module per family (`sd1.py`, `sd2.py`, `sdxl.py`), each declaring `Family` values; `FAMILIES`
is the ordered table detection walks. Matching never depends on the order: exactly one family may match a file
(more than one is an error naming them; tests/test_families.py checks every released key list).

`detect(shapes, prediction)` -> ModelSpec: the one family whose structure test matches and whose concat layout
fits the UNet's input channels (latent + concat == in_channels), its numbers read from shapes, the vector width
checked against the family's declaration, the prediction type decided (override > marker key > preset > probe).
"""
from __future__ import annotations

from functools import lru_cache

from ..checkpoint import CheckpointError
from ..config import ModelSpec
from . import sd1, sd2, sd3, sdxl
from .family import INPUT_KINDS, Family, Input, Shapes
from . import ldm  # noqa: E402 - the original latent diffusion models (Rombach et al. 2022), issue 11
from .shapes import detect_first_stage
from .shapes import UNET, VAE, count_prefix, describe_contents, detect_mmdit, detect_unet, detect_vae, has

FAMILIES: tuple[Family, ...] = (*sd1.FAMILIES, *sd2.FAMILIES, *sdxl.FAMILIES, *sd3.FAMILIES)
FAMILIES = (*FAMILIES, *ldm.FAMILIES)  # the LDM ("SD v0") families: sd/families/ldm.py

__all__ = ["FAMILIES", "Family", "Input", "INPUT_KINDS", "detect", "get_family", "check_inputs", "unsupported_parts",
           "tab_of", "decide_prediction", "preset_predictions"]


def _table() -> tuple[Family, ...]:
    # read at call time, so a family added to the table (a test's throwaway family) is seen everywhere
    import sd.families as me

    return me.FAMILIES


def get_family(name: str) -> Family:
    """The Family of a ModelSpec.family name. KeyError naming the known ones."""
    for f in _table():
        if f.name == name:
            return f
    raise KeyError(f"unknown family {name!r}; known: {', '.join(f.name for f in _table())}")


def tab_of(name: str | None) -> str | None:
    """The app tab of a family name; None if unknown."""
    try:
        return get_family(name).tab if name else None
    except KeyError:
        return None


def unsupported_parts() -> dict[str, str]:
    """prefix -> why, for every extra checkpoint part some family declares but the engine does not run yet."""
    return {pfx: why for f in _table() for pfx, why in f.parts}


def _fits(f: Family, shapes: Shapes, unet) -> bool:
    return f.latent.channels + f.concat_channels() == unet.in_channels and f.matches(shapes, unet)


def _no_family(shapes: Shapes, unet) -> CheckpointError:
    if not any(k.startswith(("cond_stage_model.", "conditioner.")) for k in shapes):
        return CheckpointError("the file has a UNet but no text encoder (cond_stage_model.* / conditioner.*); "
                               "use a full checkpoint that includes its text encoder")
    clip_keys = ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
                 "cond_stage_model.transformer.embeddings.token_embedding.weight",
                 "cond_stage_model.model.token_embedding.weight")
    if has(shapes, "cond_stage_model.") and not any(k in shapes for k in clip_keys):
        return CheckpointError("unknown text encoder layout under cond_stage_model.* (no known family has it). "
                               f"Found: {describe_contents(shapes)}")
    return CheckpointError(f"no known model family has a UNet with {unet.in_channels} input channels"
                           + (f" and a {unet.adm_in_channels}-wide vector" if unet.adm_in_channels else "")
                           + f" with these text encoders (known: {', '.join(f.name for f in _table())}). "
                           f"Found: {describe_contents(shapes)}")


def detect(shapes: Shapes, prediction: str | None = None) -> ModelSpec:
    """Which family a `{key: shape}` dict is, and its architecture numbers. Raises CheckpointError (one line)."""
    # the network kind (Family.network): the LDM UNet, or SD3's MMDiT (Esser et al. 2024)
    kind = "mmdit" if any(k.startswith(UNET + "joint_blocks.") for k in shapes) else "unet"
    if kind == "unet" and any(k.startswith("joint_blocks.") for k in shapes):
        raise CheckpointError("it looks like a bare SD3/SD3.5 MMDiT (joint_blocks.* without model.diffusion_model.) "
                              f"or a diffusers-format file; give the original single-file checkpoint. "
                              f"Found: {describe_contents(shapes)}")
    if kind == "unet" and UNET + "input_blocks.0.0.weight" not in shapes:
        if "input_blocks.0.0.weight" in shapes or "conv_in.weight" in shapes:
            hint = "it looks like a bare UNet or a diffusers-format file; give the original single-file checkpoint"
        elif any(k.startswith("encoder.down") or k.startswith("decoder.up") for k in shapes):
            hint = ("it looks like a standalone VAE / first stage (VQGAN or LDM autoencoder): round-trip an image "
                    "with `python -m sd reconstruct` or the first-stage view; to generate, give a full checkpoint")
        elif any(k.startswith(("text_model.", "encoder.block.", "shared.")) for k in shapes):
            hint = ("it looks like a separate text encoder (CLIP-L / CLIP-G / T5-XXL), which MMDiT checkpoints read "
                    "from a text_encoders/ folder; it is not a checkpoint of its own")
        else:
            hint = "it is not a Stable Diffusion checkpoint"
        raise CheckpointError(f"no Stable Diffusion UNet ({UNET}*) found; {hint}. Found: {describe_contents(shapes)}")
    unet = detect_mmdit(shapes) if kind == "mmdit" else detect_unet(shapes)
    detect_first_stage(shapes)  # reads the first stage (KL, or VQ for the LDM families) before any family is tried
    found = [f for f in _table() if f.network == kind and _fits(f, shapes, unet)]
    if not found:
        raise _no_family(shapes, unet)
    if len(found) > 1:
        raise CheckpointError(f"the file matches several families ({', '.join(f.name for f in found)}); "
                              "the family table is ambiguous")
    fam = found[0]
    if fam.unet_config is not None:   # what shapes cannot tell (LDM attention heads), from the family
        unet = fam.unet_config(shapes, unet)
    vae, texts = fam.build(shapes, unet)
    if unet.out_channels != fam.latent.channels:
        raise CheckpointError(f"{fam.name}: the UNet outputs {unet.out_channels} channels but the latent has "
                              f"{fam.latent.channels}; the file mixes parts of different models")
    if vae is not None and (vae.factor != fam.latent.factor or vae.embed_dim != fam.latent.channels):
        raise CheckpointError(f"{fam.name}: the VAE is f{vae.factor} with {vae.embed_dim} latent channels, the family's "
                              f"latent is f{fam.latent.factor} with {fam.latent.channels}; the file mixes different models")
    want = fam.vector_width(texts, unet) if fam.vector_width else 0
    if unet.adm_in_channels != want:
        raise CheckpointError(f"{fam.name}: the UNet vector input is {unet.adm_in_channels} wide but the family's "
                              f"conditioner gives {want}; the file mixes parts of different models")
    unsupported = tuple(f"{pfx}* ({count_prefix(shapes, pfx)} tensors): {why}" for pfx, why in fam.parts
                        if has(shapes, pfx))
    if not fam.runs:
        unsupported += (fam.unsupported or f"{fam.name} is detected but not implemented yet",)
    if vae is None:
        unsupported += ("no VAE in the file (first_stage_model.*): generation needs a separate VAE, not supported yet",)
    pred, source = decide_prediction(fam.name, shapes, prediction)
    return ModelSpec(family=fam.name, unet=unet, vae=vae, text_encoders=texts, latent=fam.latent, prediction=pred,
                     prediction_source=source,
                     extra=fam.extra_config(shapes) if fam.extra_config else (),
                     unsupported=unsupported, network=fam.network)


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
    from ..presets import load_presets

    seen: dict[str, set[str]] = {}
    for preset in load_presets().values():
        for fam in preset["families"]:
            seen.setdefault(fam, set()).add(preset["prediction"])
    return {fam: preds.pop() for fam, preds in seen.items() if len(preds) == 1}


def check_inputs(family: Family, request) -> dict:
    """The request's extra inputs checked against the family's declaration: an unknown name or a missing required
    input is a ValueError naming it; declared defaults are filled in. Pixel inputs (image, mask) must have the
    request's width x height (they are used at their own size). Returns the completed inputs dict."""
    from ..inpaint import load_image

    given = dict(request.inputs or {})
    declared = {i.name: i for i in family.inputs}
    unknown = [k for k in given if k not in declared]
    if unknown:
        takes = ", ".join(declared) or "no extra inputs"
        raise ValueError(f"{family.name} does not take {', '.join(map(repr, unknown))} (it takes: {takes})")
    out = {}
    for name, inp in declared.items():
        v = given.get(name, inp.default)
        if v is None:
            if inp.required:
                raise ValueError(f"{family.name} needs the input {name!r} ({inp.label}; CLI {inp.flag})")
            continue
        if inp.kind == "number":
            v = float(v)
            if (inp.min is not None and v < inp.min) or (inp.max is not None and v > inp.max):
                raise ValueError(f"{name} must be between {inp.min:g} and {inp.max:g}, got {v:g}")
        elif inp.kind == "choice" and v not in inp.choices:
            raise ValueError(f"{name} must be one of {', '.join(inp.choices)}, got {v!r}")
        elif inp.kind == "bool":
            v = bool(v)
        elif inp.kind == "text":
            v = str(v)
        elif inp.kind in ("image", "mask"):
            v = load_image(v, name)
        out[name] = v
    pixels = {n: v for n, v in out.items() if declared[n].kind in ("image", "mask")}
    if family.check is not None:
        family.check(out)
    for name, img in pixels.items():
        k = declared[name].scale
        if declared[name].kind == "image" and k > 1 and (img.width * k, img.height * k) != (request.width,
                                                                                             request.height):
            raise ValueError(f"the {name} is {img.size[0]}x{img.size[1]}, so the output is {img.size[0] * k}x"
                             f"{img.size[1] * k}, but the request is {request.width}x{request.height}: set width and "
                             f"height to {img.size[0] * k}x{img.size[1] * k} (or resize the {name} to "
                             f"{request.width // k}x{request.height // k})")
        if declared[name].kind == "image" and k == 1 and img.size != (request.width, request.height):
            raise ValueError(f"the {name} is {img.size[0]}x{img.size[1]} but the request is {request.width}x"
                             f"{request.height}; pixel inputs are used at their own size: set width and height to "
                             f"{img.size[0]}x{img.size[1]} (or resize the {name})")
    return out
