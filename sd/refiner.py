"""SDXL base -> refiner hand-off (Podell et al. 2023, "SDXL", sec. 2.5: the refiner denoises the last steps).

One sigma schedule (the SDXL discrete schedule, shared by both models, so the sigmas carry over) is split at
`switch_at`: the base runs the first `round(steps * switch_at)` steps with its own conditioning (CLIP-L + bigG,
size/crop/target vector), then the same latent continues with the refiner's conditioning (bigG, size/crop +
aesthetic score) for the remaining steps, and the refiner's VAE decodes. The per-step noise of ancestral samplers
comes from one generator per image (seed + i + 1) across both stages. `switch_at` 1 is the base alone; 0 is the
refiner alone, which equals `generate(refiner, params)`. Which model may refine which is the refiner family's `refines` field.
"""
from __future__ import annotations

import math
import threading
from typing import Callable

import torch

from .pipeline import (GenerateParams, GenerateResult, LoadedModel, check_params, decode_latents, guided_denoiser,
                       loaded, start_latent, step_generators)
from .samplers import _stopped, sample

Tensor = torch.Tensor


def switch_index(steps: int, switch_at: float) -> int:
    """Number of steps the base runs: round(steps * switch_at), half up, within [0, steps]."""
    if not 0.0 <= switch_at <= 1.0:
        raise ValueError(f"switch_at must be in [0, 1], got {switch_at}")
    return min(steps, max(0, int(math.floor(steps * switch_at + 0.5))))


@torch.no_grad()
def generate_with_refiner(base: LoadedModel, refiner: LoadedModel, p: GenerateParams, switch_at: float = 0.8,
                          callback: Callable[[dict], None] | None = None,
                          stop: Callable[[], bool] | threading.Event | None = None) -> GenerateResult:
    """Text (or image) to images with the base for the first part of the schedule and the refiner for the rest.
    Callback infos carry `step`/`total` over the whole run and `model` ("base" or "refiner")."""
    if base.spec.family not in refiner.family.refines:
        raise ValueError(f"{refiner.spec.family} cannot continue a {base.spec.family} model (the refiner hand-off "
                         f"needs a refiner of it, e.g. an SDXL base and an SDXL refiner)")
    check_params(base.spec, p)
    check_params(refiner.spec, p)
    x, sigmas = start_latent(base, p)  # one schedule for both: they share the SDXL training sigmas
    total = len(sigmas) - 1
    k = switch_index(total, switch_at)
    gen = step_generators(p)   # per-step noise, one generator per image (seed s + i + 1), across both stages
    done = {"n": 0}
    last = base

    for name, model, part, offset in (("base", base, sigmas[: k + 1], 0), ("refiner", refiner, sigmas[k:], k)):
        if len(part) < 2 or done["n"] < offset or _stopped(stop):
            continue

        def on_step(info: dict, offset=offset, name=name) -> None:
            done["n"] = offset + info["step"] + 1
            if callback is not None:   # the first step also reports the starting latent (sd.trajectory's x_t)
                start = {"x_in": x} if offset + info["step"] == 0 else {}
                callback({**info, "step": offset + info["step"], "total": total, "model": name, **start})

        guided = guided_denoiser(model, p)
        with loaded(model.parts.unet):   # low memory: each stage's UNet read for its steps only, after its text
            x = sample(p.sampler, guided, x.to(model.device, model.dtype), part.to(model.device),
                       generator=gen, callback=on_step, stop=stop, eta=p.eta)
        last = model
    images = decode_latents(last, x)
    return GenerateResult(images, x.float().cpu(), p.seed, base.spec, stopped=done["n"] < total,
                          steps_done=done["n"], info={"switch_step": k, "refiner": refiner.name})
