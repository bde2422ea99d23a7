"""The trajectory of one generation (issue 13 part 1): per sampler step the latent x_t the network saw, its predicted
x0 (the denoiser's output), and the predicted noise (velocity for flow models), as filmstrips.

Family-blind and pipeline side: a `Recorder` is a sampler callback (sd.samplers: each step reports
`x` after the step and `denoised` = D(x_t, sigma)); `sd.pipeline.generate` adds `x_in`, the starting latent, to the
first step's report, and the x_t of step i > 0 is the state the previous step left. Recording only reads (copies of
the first image of the batch to the CPU), so a recorded run is bit-identical to one without it.

In k-diffusion's sigma form (Karras et al. 2022) every eps or v model has x = x0 + sigma eps, so the noise a model
predicts is eps = (x - x0) / sigma whatever its output was (eps: x0 = x - sigma eps; v: x0 = x / (sigma^2 + 1)
- sigma v / sqrt(sigma^2 + 1), Salimans & Ho 2022). A rectified-flow model (Esser et al. 2024) has
x = (1 - sigma) x0 + sigma n and predicts the velocity v = n - x0, which is again (x - x0) / sigma (x0 = x - sigma v).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .card import PREDICTION_FORMULAS
from .denoiser import scalings
from .preview import preview_image

Tensor = torch.Tensor

STRIPS = ("x_t", "x0", "noise")
STRIP_LABELS = {"x_t": "x_t (the latent the network saw, times c_in)", "x0": "predicted x0 (the denoiser's output)",
                "noise": "predicted noise eps = (x_t - x0) / sigma"}
FLOW_NOISE_LABEL = "predicted velocity v = (x_t - x0) / sigma"


@dataclass
class Trajectory:
    """What one run's sampler went through, first image of the batch; latents (1, C, h, w) float32 on the CPU."""

    prediction: str                                   # eps | v | flow (ModelSpec.prediction)
    family: str                                       # for the latent -> RGB preview factors (Family.preview)
    sigma: list[float] = field(default_factory=list)  # (n,) the noise level D was evaluated at in step i
    sigma_next: list[float] = field(default_factory=list)  # (n,) where step i went
    x: list[Tensor | None] = field(default_factory=list)   # (n,) x_t at step i (None: not reported, see Recorder)
    x0: list[Tensor] = field(default_factory=list)         # (n,) D(x_t, sigma): the predicted x0
    models: list[str] = field(default_factory=list)        # (n,) which model ran the step ("" or base / refiner)

    def __len__(self) -> int:
        return len(self.x0)

    @property
    def formula(self) -> str:
        return PREDICTION_FORMULAS.get(self.prediction, "")

    def noise(self, i: int) -> Tensor | None:
        """(x_t - x0) / sigma at step i: the predicted noise eps (eps and v models), the velocity (flow)."""
        if self.x[i] is None or self.sigma[i] == 0:
            return None
        return (self.x[i] - self.x0[i]) / self.sigma[i]

    def shown_x(self, i: int) -> Tensor | None:
        """x_t times c_in (sd.denoiser.scalings): the network's input, DDPM's sqrt(abar) x0 + sqrt(1 - abar) eps for
        eps / v models (x / sqrt(sigma^2 + 1)), x itself for flow; of unit scale, so its preview does not saturate."""
        if self.x[i] is None:
            return None
        c_in = scalings(self.prediction, torch.tensor([self.sigma[i]]))[2]
        return self.x[i] * float(c_in)

    def latent(self, strip: str, i: int) -> Tensor | None:
        return {"x_t": self.shown_x, "x0": lambda j: self.x0[j], "noise": self.noise}[strip](i)

    def label(self, strip: str) -> str:
        return FLOW_NOISE_LABEL if strip == "noise" and self.prediction == "flow" else STRIP_LABELS[strip]

    def frame(self, strip: str, i: int, size: tuple[int, int] | None = None) -> Image.Image:
        """The cheap latent -> RGB preview of one frame (grey when the step did not report x_t)."""
        z = self.latent(strip, i)
        if z is None:
            h, w = self.x0[i].shape[-2:]
            return Image.new("RGB", size or (w, h), (128, 128, 128))
        return preview_image(z, self.family, size)

    def strip(self, strip: str, size: tuple[int, int] | None = None) -> list[Image.Image]:
        return [self.frame(strip, i, size) for i in range(len(self))]

    def summary(self) -> dict:
        """The JSON side: prediction type and its formula, and per step sigma -> sigma_next."""
        return {"prediction": self.prediction, "formula": self.formula, "family": self.family,
                "steps": [{"step": i, "sigma": s, "sigma_next": n, **({"model": m} if m else {})}
                          for i, (s, n, m) in enumerate(zip(self.sigma, self.sigma_next, self.models))]}

    def save(self, folder: str | Path, size: tuple[int, int] | None = None) -> dict:
        """One PNG per step per strip (FOLDER/<strip>/step-NNN.png, cheap previews at `size`) and
        FOLDER/trajectory.json (summary() + the file names). Returns the JSON written."""
        folder = Path(folder)
        out = self.summary()
        out["strips"] = {}
        for name in STRIPS:
            (folder / name).mkdir(parents=True, exist_ok=True)
            files = []
            for i in range(len(self)):
                p = folder / name / f"step-{i:03d}.png"
                self.frame(name, i, size).save(p)
                files.append(str(p.relative_to(folder)))
            out["strips"][name] = {"label": self.label(name), "files": files}
        (folder / "trajectory.json").write_text(json.dumps(out, indent=1))
        return out


class Recorder:
    """A sampler callback that records a Trajectory, then calls `callback` (the caller's own) with the same info."""

    def __init__(self, prediction: str, family: str, callback=None):
        self.trajectory = Trajectory(prediction, family)
        self.callback = callback
        self._last: Tensor | None = None   # the state the previous step left: x_t of the next step

    def __call__(self, info: dict) -> None:
        t = self.trajectory
        x_in = info.get("x_in")
        x_t = x_in if x_in is not None else self._last   # the refiner's first step continues the base's state
        t.x.append(None if x_t is None else x_t[:1].detach().float().cpu().clone())
        t.x0.append(info["denoised"][:1].detach().float().cpu().clone())
        t.sigma.append(float(info["sigma"]))
        t.sigma_next.append(float(info["sigma_next"]))
        t.models.append(str(info.get("model", "")))
        self._last = info["x"][:1].detach().float().cpu().clone()
        if self.callback is not None:
            self.callback(info)


__all__ = ["FLOW_NOISE_LABEL", "Recorder", "STRIPS", "STRIP_LABELS", "Trajectory"]
