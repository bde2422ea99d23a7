"""The checkpoint card: plain-words markdown about one checkpoint, for learners (issue 13 part 4).

`card_text(spec, shapes, ...)` says what the family is and what it adds over the one before (`Family.about`), how
the file was recognised (the network's input key and the keys the family's matcher reads, `Family.evidence`, with
their shapes), the prediction type, its formula and what decided it, the parameters per part, the latent format,
and the conditioning the network receives (`Family.conditioning` in words, with this request's shapes when the
conditioner was run: `conditioning_shapes`). Family-blind: every family fact comes from the family table; the
numbers come from the spec (read from shapes) and the file.
"""
from __future__ import annotations

import math
import string

import torch

from .config import ModelSpec
from .families import get_family
from .families.shapes import UNET

Tensor = torch.Tensor

# x0 from the network's output in k-diffusion's sigma form (sd.denoiser.scalings: D = c_skip x + c_out F).
PREDICTION_FORMULAS = {
    "eps": "x0 = x - sigma eps",
    "v": "x0 = x / (sigma^2 + 1) - sigma v / sqrt(sigma^2 + 1)",
    "flow": "x0 = x - sigma v",
}
PREDICTION_WORDS = {
    "eps": "the network predicts the noise eps that was added (x = x0 + sigma eps)",
    "v": "the network predicts v, a mix of noise and image (Salimans & Ho 2022; x = x0 + sigma eps)",
    "flow": "the network predicts the velocity v = noise - x0 of a straight path (x = (1 - sigma) x0 + sigma noise)",
}
# The key whose shape gives the network's input channels (UNet: the first conv; MMDiT: the patch embedding).
INPUT_KEYS = {"unet": UNET + "input_blocks.0.0.weight", "mmdit": UNET + "x_embedder.proj.weight"}
NETWORK_NAMES = {"unet": "UNet", "mmdit": "MMDiT"}
PART_NAMES = {"unet": "UNet", "mmdit": "MMDiT", "vae": "first stage (autoencoder)"}


def _shape(shape) -> str:
    return str(tuple(int(s) for s in shape))   # (1, 77, 768); a single dimension: (1,)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n:,}"


def evidence_lines(spec: ModelSpec, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """How the file was recognised: the network's input key (in_channels = latent + concat), then each key or
    prefix (ending in ".") of Family.evidence with its shape or tensor count; "!KEY" counts by being absent."""
    fam = get_family(spec.family)
    out = []
    key = INPUT_KEYS.get(spec.network)
    if key in shapes:
        extra = " + ".join(f"{c} {n}" for n, c in fam.concat)
        out.append(f"`{key}` {_shape(shapes[key])}: the {NETWORK_NAMES.get(spec.network, spec.network)} takes "
                   f"{spec.unet.in_channels} input channels = {fam.latent.channels} latent"
                   + (f" + {extra}" if extra else ""))
    for item in fam.evidence:
        absent = item.startswith("!")
        name = item.lstrip("!")
        if name.endswith("."):
            n = sum(1 for k in shapes if k.startswith(name))
            found = f"{n} tensors under `{name}*`" if n else f"no tensor under `{name}*`"
        else:
            found = f"`{name}` {_shape(shapes[name])}" if name in shapes else f"no `{name}`"
        out.append(found + (" (its absence counts)" if absent else ""))
    return out


def parameter_counts(spec: ModelSpec, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """part -> number of parameters the file holds for it: the network (model.diffusion_model.*), the first stage
    (first_stage_model.*), each text tower (its prefix); any other part by its first two key levels
    ("embedder.model.*"); tensors the loader ignores by rule (position ids, schedule buffers:
    sd.checkpoint.ignore_reason) left out."""
    from .checkpoint import ignore_reason

    parts = {spec.network: UNET, "vae": "first_stage_model."}
    parts.update({f"text{i}": t.prefix for i, t in enumerate(spec.text_encoders)})
    order = sorted(parts.items(), key=lambda kv: -len(kv[1]))   # the longest prefix first
    out: dict[str, int] = {}
    for k, shape in shapes.items():
        if ignore_reason(k):
            continue
        comp = next((c for c, pfx in order if k.startswith(pfx)), ".".join(k.split(".")[:2]) + ".*")
        out[comp] = out.get(comp, 0) + math.prod(shape)
    return out


def _part_name(comp: str, spec: ModelSpec) -> str:
    if comp.startswith("text") and comp[4:].isdigit() and int(comp[4:]) < len(spec.text_encoders):
        t = spec.text_encoders[int(comp[4:])]
        return f"text encoder {int(comp[4:]) + 1} ({t.naming}, {t.width} wide, {t.layers} layers)"
    return PART_NAMES.get(comp, comp)


class _Numbers(dict):
    def __missing__(self, key):   # a placeholder the spec cannot fill (no text towers in the file) shows as "?"
        return "?"


def spec_numbers(spec: ModelSpec) -> dict[str, int]:
    """The numbers Family.conditioning's words may name: w0, w1, ... (text tower widths), p0, p1, ... (pooled:
    projection width, else the width), pooled (the last tower's), context, vector, concat."""
    nums = _Numbers(context=spec.unet.context_dim, vector=spec.unet.adm_in_channels,
                    concat=get_family(spec.family).concat_channels())
    for i, t in enumerate(spec.text_encoders):
        nums[f"w{i}"], nums[f"p{i}"] = t.width, t.projection_dim or t.width
    if spec.text_encoders:
        nums["pooled"] = nums[f"p{len(spec.text_encoders) - 1}"]
    return nums


def conditioning_shapes(model, params) -> dict[str, tuple[int, ...]]:
    """{crossattn / vector / concat: shape} of the cond branch the family's conditioner gives for this request
    (a LoadedModel and a GenerateParams; runs the text towers once, draws from the request's own generator)."""
    from dataclasses import replace

    from .pipeline import request_inputs, seed_generator

    fam = model.family
    req = replace(params, inputs=request_inputs(model.spec, params))
    with torch.no_grad():
        cond, _ = fam.condition(model.parts, model.spec, req, seed_generator(params.seed))
    return {k: tuple(v.shape) for k, v in cond.items() if isinstance(v, Tensor)}


def card_text(spec: ModelSpec, shapes: dict[str, tuple[int, ...]] | None = None, *, name: str = "",
              cond_shapes: dict[str, tuple[int, ...]] | None = None, size: tuple[int, int] | None = None,
              batch: int = 1) -> str:
    """The card as markdown. `shapes`: the file's {key: shape} (recognition and parameter counts; left out
    without it); `cond_shapes`: this request's conditioning (`conditioning_shapes`); else the shapes follow from
    the spec for `size` (width, height) and `batch`, one 77-token chunk."""
    fam = get_family(spec.family)
    lat = spec.latent
    lines = [f"### {fam.label}" + (f": `{name}`" if name else ""),
             f"**What it is.** {fam.about[0].upper() + fam.about[1:] if fam.about else fam.label}."]
    if shapes is not None:
        lines += ["", "**How it was recognised** (family `" + spec.family + "`, the only family whose structure "
                  "test matches):"]
        lines += [f"- {e}" for e in evidence_lines(spec, shapes)]
    pred = spec.prediction if spec.prediction_source != "probe" else None
    lines += ["", "**Prediction type** " + (f"`{pred}`: {PREDICTION_WORDS.get(pred, pred)}; "
                                             f"`{PREDICTION_FORMULAS.get(pred, '')}`." if pred else
                                             "`eps` or `v`: not in the file's shapes.")]
    lines.append("Decided by: " + ("A1111's probe on the UNet when the model loads (its output at t = 999 on a "
                                   "constant input)" if pred is None else spec.prediction_source) + ".")
    if shapes is not None:
        counts = parameter_counts(spec, shapes)
        total = sum(counts.values())
        lines += ["", f"**Parameters** {_count(total)} in all:"]
        lines += [f"- {_part_name(c, spec)}: {_count(n)} ({n:,})" for c, n in counts.items()]
    scaled = f"(z - {lat.shift:g}) x {lat.scale:g}" if lat.shift else f"z x {lat.scale:g}"
    lines += ["", f"**Latent** {lat.channels} channels at 1/{lat.factor} of the image side; the diffusion runs on "
              f"{scaled}, z the first stage's latent."]
    lines += ["", "**Conditioning** (what the network receives besides the noisy latent and the noise level):"]
    w, h = size or (fam.default_size, fam.default_size)
    hl, wl = h // lat.factor, w // lat.factor
    guess = {}
    if spec.unet.context_dim:   # one 77-token chunk of a prompt; a family without a prompt: one (class) token
        guess["crossattn"] = (batch, 77 if fam.text else 1, spec.unet.context_dim)
    if spec.unet.adm_in_channels:
        guess["vector"] = (batch, spec.unet.adm_in_channels)
    elif getattr(spec.unet, "num_classes", 0):   # a class label per image (the x4 upscaler's noise level)
        guess["vector"] = (batch,)
    if fam.concat:
        guess["concat"] = (batch, fam.concat_channels(), hl, wl)
    got = cond_shapes if cond_shapes is not None else guess
    nums = spec_numbers(spec)
    words = dict(fam.conditioning)
    for key in ("crossattn", "vector", "concat"):
        if key not in got and key not in words:
            continue
        text = string.Formatter().vformat(words.get(key, ""), (), nums)
        shape = _shape(got[key]) if key in got else "not used by this request"
        if key == "concat" and fam.concat and key in got:
            text += " (" + ", ".join(f"{n} {c}" for n, c in fam.concat) + ")"
        lines.append(f"- `{key}` {shape}" + (f": {text}" if text else ""))
    if not got and not words:
        lines.append("- none: the model is unconditional")
    lines.append("" if cond_shapes is not None else
                 f"*Shapes for a batch of {batch} at {w}x{h}" + (" with one 77-token chunk" if fam.text else "")
                 + "; an inspected run shows its own.*")
    return "\n".join(lines).rstrip()


__all__ = ["PREDICTION_FORMULAS", "card_text", "conditioning_shapes", "evidence_lines", "parameter_counts",
           "spec_numbers"]
