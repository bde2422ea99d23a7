"""Noise schedules: pure functions that turn a model's training sigmas into the sigmas a sampler visits.

Every schedule returns a float32 CPU tensor of `steps + 1` sigmas, strictly decreasing, ending in 0 (one
exception, kept as A1111 has it: "KL Optimal" ends at sigma_min). The names are the ones AUTOMATIC1111 and
ComfyUI users know; `SCHEDULE_DISPLAY_NAMES` holds every label A1111 (>= 1.9, `modules/sd_schedulers.py`) writes
in the infotext's "Schedule type" except "Automatic", which is the sampler's own default
(`sd.samplers.resolve_schedule`).

`model_sigmas` is the (T,) increasing tensor of training sigmas of a discrete model
(`sd.denoiser.discrete_sigmas()`, T = 1000); sigma <-> fractional timestep conversions go through
`sd.denoiser.sigma_to_t` / `t_to_sigma` (linear in log-sigma, as k-diffusion's CompVisDenoiser).
Flow-matching models (SD3) use `flow_sigmas` instead.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .denoiser import flow_sigma, t_to_sigma

Tensor = torch.Tensor


def _finish(sigmas: Tensor) -> Tensor:
    """(steps,) decreasing sigmas -> (steps + 1,) float32 CPU tensor with a final 0."""
    sigmas = sigmas.detach().to("cpu", torch.float32).reshape(-1)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _check_steps(steps: int) -> int:
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return int(steps)


def normal_sigmas(model_sigmas: Tensor, steps: int) -> Tensor:
    """"Normal" (A1111 "Uniform"/"Normal", k-diffusion `get_sigmas`): timesteps uniform from T-1 to 0,
    sigma interpolated in log-sigma: `t_to_sigma(linspace(T-1, 0, steps))`, then 0."""
    steps = _check_steps(steps)
    t = torch.linspace(model_sigmas.shape[0] - 1, 0, steps, dtype=torch.float64)  # (steps,)
    return _finish(t_to_sigma(t, model_sigmas))


def sgm_uniform_sigmas(model_sigmas: Tensor, steps: int) -> Tensor:
    """"SGM Uniform" (ComfyUI `sgm_uniform`, the SGM/SDXL discretization): `steps + 1` uniform timesteps
    from T-1 to 0 with the last one dropped, so the final nonzero sigma is above sigma_min; then 0."""
    steps = _check_steps(steps)
    t = torch.linspace(model_sigmas.shape[0] - 1, 0, steps + 1, dtype=torch.float64)[:-1]  # (steps,)
    return _finish(t_to_sigma(t, model_sigmas))


def karras_sigmas(model_sigmas: Tensor, steps: int, rho: float = 7.0) -> Tensor:
    """"Karras": Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models",
    eq. 5), `(smax^(1/rho) + i/(n-1) * (smin^(1/rho) - smax^(1/rho)))^rho`, rho 7, sigma_min/max the model's."""
    steps = _check_steps(steps)
    smin, smax = float(model_sigmas[0]), float(model_sigmas[-1])
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)  # (steps,)
    lo, hi = smin ** (1 / rho), smax ** (1 / rho)
    return _finish((hi + ramp * (lo - hi)) ** rho)


def exponential_sigmas(model_sigmas: Tensor, steps: int) -> Tensor:
    """"Exponential" (k-diffusion `get_sigmas_exponential`): uniform in log-sigma from sigma_max to sigma_min."""
    steps = _check_steps(steps)
    smin, smax = float(model_sigmas[0]), float(model_sigmas[-1])
    return _finish(torch.linspace(math.log(smax), math.log(smin), steps, dtype=torch.float64).exp())


def simple_sigmas(model_sigmas: Tensor, steps: int) -> Tensor:
    """"Simple" (ComfyUI `simple_scheduler`): every (T/steps)-th training sigma from the top,
    `model_sigmas[-(1 + int(i * T / steps))]` for i in 0..steps-1, then 0."""
    steps = _check_steps(steps)
    T = model_sigmas.shape[0]
    if steps > T:
        raise ValueError(f"simple schedule: steps ({steps}) must not exceed the {T} training timesteps")
    idx = [T - 1 - int(i * T / steps) for i in range(steps)]
    return _finish(model_sigmas[idx])


def ddim_uniform_sigmas(model_sigmas: Tensor, steps: int) -> Tensor:
    """"DDIM" uniform (CompVis `make_ddim_timesteps(..., "uniform")`, diffusers DDIM "leading" spacing with
    steps_offset 1): training timesteps `i * (T // steps) + 1` for i in 0..steps-1, highest first, then 0.

    CompVis builds `range(0, T, T // steps)`, which has more than `steps` entries when steps does not
    divide T; here exactly `steps` timesteps are kept (the diffusers convention)."""
    steps = _check_steps(steps)
    T = model_sigmas.shape[0]
    if steps >= T:
        raise ValueError(f"ddim_uniform schedule: steps ({steps}) must be below the {T} training timesteps")
    c = T // steps
    idx = (torch.arange(steps) * c + 1).flip(0)  # (steps,) decreasing timesteps
    return _finish(model_sigmas[idx])


def _beta_cdf_grid(a: float, b: float, n: int = 200_001) -> tuple[np.ndarray, np.ndarray]:
    """Regularized incomplete beta I_x(a, b) on a grid, by the substitution x = sin^2(theta).

    With x = sin^2(theta), x^(a-1) (1-x)^(b-1) dx = 2 sin^(2a-1)(theta) cos^(2b-1)(theta) dtheta, which is
    bounded for a, b >= 1/2 (the integrable end singularities of a, b < 1 disappear); integrated with
    the trapezoid rule in float64. Returns (x grid, cdf grid), both increasing from 0 to 1.
    """
    theta = np.linspace(0.0, np.pi / 2, n)
    with np.errstate(divide="ignore"):
        f = 2 * np.sin(theta) ** (2 * a - 1) * np.cos(theta) ** (2 * b - 1)
    if not np.isfinite(f[0]):
        f[0] = f[1]  # a < 1/2: an integrable spike at 0; its trapezoid share is negligible at this grid size
    if not np.isfinite(f[-1]):
        f[-1] = f[-2]
    cdf = np.concatenate([[0.0], np.cumsum((f[1:] + f[:-1]) / 2 * np.diff(theta))])
    return np.sin(theta) ** 2, cdf / cdf[-1]


def beta_ppf(q: Tensor | np.ndarray | list[float], a: float, b: float) -> np.ndarray:
    """Quantile function (inverse CDF) of the Beta(a, b) distribution, float64, accurate to about 1e-7
    for a, b >= 1/2 (no scipy needed)."""
    x, cdf = _beta_cdf_grid(a, b)
    return np.interp(np.asarray(q, dtype=np.float64), cdf, x)


def beta_sigmas(model_sigmas: Tensor, steps: int, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """"Beta": Lee et al. 2024, "Beta Sampling is All You Need" (ComfyUI `beta_scheduler`): timesteps at the
    Beta(alpha, beta) quantiles `(T-1) * ppf(1 - i/steps)`, i in 0..steps-1, alpha = beta = 0.6.

    ComfyUI rounds these timesteps to integers and drops duplicates (so it can return fewer steps at high
    step counts); here the fractional timestep is kept (`t_to_sigma`), which gives exactly `steps`
    distinct sigmas and the same values where the quantile is an integer.
    """
    steps = _check_steps(steps)
    q = 1.0 - np.linspace(0.0, 1.0, steps, endpoint=False)  # (steps,) from 1 down to 1/steps
    t = torch.from_numpy(beta_ppf(q, alpha, beta) * (model_sigmas.shape[0] - 1))
    return _finish(t_to_sigma(t, model_sigmas))


def uniform_sigmas(model_sigmas: Tensor, steps: int) -> Tensor:
    """"Uniform" (A1111 `uniform` = k-diffusion `DiscreteSchedule.get_sigmas`, the schedule of A1111 < 1.9 for
    sampler names without a schedule suffix): `t_to_sigma(linspace(T-1, 0, steps))`, then 0. A1111's "Normal"
    computes the same timesteps as `linspace(sigma_to_t(sigma_max), sigma_to_t(sigma_min), steps)`, which are
    T-1 and 0, so both labels give these sigmas."""
    return normal_sigmas(model_sigmas, steps)


def polyexponential_sigmas(model_sigmas: Tensor, steps: int, rho: float = 1.0) -> Tensor:
    """"Polyexponential" (k-diffusion `get_sigmas_polyexponential`, A1111's default rho 1):
    `exp(log smin + (1 - i/(n-1))^rho (log smax - log smin))`, i in 0..n-1, then 0 (rho 1 = "Exponential")."""
    steps = _check_steps(steps)
    smin, smax = float(model_sigmas[0]), float(model_sigmas[-1])
    ramp = torch.linspace(1, 0, steps, dtype=torch.float64) ** rho  # (steps,)
    return _finish(torch.exp(ramp * (math.log(smax) - math.log(smin)) + math.log(smin)))


def kl_optimal_sigmas(model_sigmas: Tensor, steps: int) -> Tensor:
    """"KL Optimal": Sabour et al. 2024, "Align Your Steps" (sec. 3.3, the KL-optimal schedule of a Gaussian
    data distribution), as A1111 writes it: `tan((1 - i/n) atan(smax) + (i/n) atan(smin))` for i in 0..n.
    A1111 returns these n + 1 values as they are, so the last step ends at sigma_min, not 0 (kept: it is
    what an A1111 infotext with this label ran)."""
    steps = _check_steps(steps)
    smin, smax = float(model_sigmas[0]), float(model_sigmas[-1])
    frac = torch.arange(steps + 1, dtype=torch.float64) / steps  # (steps + 1,)
    out = torch.tan(frac * math.atan(smin) + (1 - frac) * math.atan(smax))
    return out.to(torch.float32)


# NVIDIA's published 10-step Align Your Steps noise levels (Sabour et al. 2024; research.nvidia.com/labs/
# toronto-ai/AlignYourSteps/howto.html), to three decimals as A1111's `get_align_your_steps_sigmas` has them.
AYS_TABLES: dict[str, tuple[float, ...]] = {
    "sd1": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
}


def loglinear_interp(values: tuple[float, ...] | np.ndarray, n: int) -> np.ndarray:
    """n values along a decreasing sequence, interpolated linearly in log(value) over an evenly spaced index
    (the AYS howto's `loglinear_interp`). Returns (n,) float64, decreasing."""
    ys = np.log(np.asarray(values, dtype=np.float64)[::-1])  # increasing
    out = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(values)), ys)
    return np.exp(out)[::-1].copy()


def align_your_steps_sigmas(model_sigmas: Tensor, steps: int, table: str = "sd1") -> Tensor:
    """"Align Your Steps" as A1111 builds it: the family's NVIDIA table (`AYS_TABLES`; A1111: SDXL's for SDXL
    models, SD 1.5's for every other), log-linearly interpolated to `steps` values, then 0. At steps == 11 A1111
    takes the 11 published values as they are and appends 0 (so 11 steps walk the published 10-step levels).
    The model's own sigmas are not used. (steps + 1,) float32."""
    steps = _check_steps(steps)
    if table not in AYS_TABLES:
        raise ValueError(f"no Align Your Steps table {table!r}: expected one of {', '.join(AYS_TABLES)}")
    levels = AYS_TABLES[table]
    vals = np.asarray(levels) if steps == len(levels) else loglinear_interp(levels, steps)
    return _finish(torch.from_numpy(np.ascontiguousarray(vals)))


SCHEDULES: dict[str, Callable[[Tensor, int], Tensor]] = {
    "normal": normal_sigmas,
    "karras": karras_sigmas,
    "exponential": exponential_sigmas,
    "sgm_uniform": sgm_uniform_sigmas,
    "simple": simple_sigmas,
    "ddim_uniform": ddim_uniform_sigmas,
    "beta": beta_sigmas,
    "uniform": uniform_sigmas,
    "polyexponential": polyexponential_sigmas,
    "kl_optimal": kl_optimal_sigmas,
    "align_your_steps": align_your_steps_sigmas,
}

# How A1111 spells them ("Schedule type" field of the infotext, and the suffix of old sampler names).
SCHEDULE_DISPLAY_NAMES: dict[str, str] = {
    "normal": "Normal",
    "karras": "Karras",
    "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform",
    "simple": "Simple",
    "ddim_uniform": "DDIM",
    "beta": "Beta",
    "uniform": "Uniform",
    "polyexponential": "Polyexponential",
    "kl_optimal": "KL Optimal",
    "align_your_steps": "Align Your Steps",
}
AUTOMATIC = "automatic"   # A1111's "Automatic": the sampler's default schedule (sd.samplers.resolve_schedule)


def schedule_key(schedule: str) -> str | None:
    """A key of SCHEDULES (or AUTOMATIC) for a key or an A1111 label in any case ("SGM Uniform", "SGMUniform",
    "karras", "Automatic"); None for a label we do not have."""
    key = " ".join(str(schedule).strip().split()).lower()
    if key in SCHEDULES or key == AUTOMATIC:
        return key
    labels = {v.lower(): k for k, v in SCHEDULE_DISPLAY_NAMES.items()}
    labels.update({"sgmuniform": "sgm_uniform", "ddim uniform": "ddim_uniform"})   # A1111's alias
    return labels.get(key) or (key.replace(" ", "_") if key.replace(" ", "_") in SCHEDULES else None)


def get_sigmas(schedule: str, model_sigmas: Tensor, steps: int, ays_table: str = "sd1") -> Tensor:
    """Sigmas of the named schedule: (steps + 1,) float32 CPU, decreasing, ending in 0 (KL Optimal: in sigma_min).
    `schedule` is a key of SCHEDULES or its A1111 label ("Karras", "SGM Uniform"), any case ("automatic" must be
    resolved by the sampler first: sd.samplers.resolve_schedule). `ays_table`: the family's Align Your Steps table."""
    key = schedule_key(schedule)
    if key is None or key == AUTOMATIC:
        why = " (resolve it for the sampler first)" if key == AUTOMATIC else ""
        raise ValueError(f"unknown schedule {schedule!r}{why}: expected one of {', '.join(SCHEDULES)}")
    ms = model_sigmas.detach().to("cpu", torch.float32)
    if key == "align_your_steps":
        return align_your_steps_sigmas(ms, steps, ays_table)
    return SCHEDULES[key](ms, steps)


def flow_sigmas(steps: int, shift: float = 3.0) -> Tensor:
    """Rectified-flow sigmas for SD3/3.5, as the SD3 reference code (`sd3_infer.py` get_sigmas over
    `ModelSamplingDiscreteFlow`) and ComfyUI's "normal" build them: the training sigmas are
    `flow_sigma(t/1000, shift)` for t = 1..1000; the schedule takes `steps` timesteps uniform from
    1000 * sigma_max to 1000 * sigma_min (sigma turned back into a timestep as sigma * 1000, without
    undoing the shift) and maps them through `flow_sigma` again, then appends 0. The first sigma is 1;
    the last nonzero one is flow_sigma(flow_sigma(0.001)) (0.0089 at shift 3, 0.001 at shift 1)."""
    steps = _check_steps(steps)
    sigma_min = float(flow_sigma(torch.tensor(1.0 / 1000, dtype=torch.float64), shift))
    t = torch.linspace(1.0, sigma_min, steps, dtype=torch.float64)  # (steps,) in (0, 1]
    return _finish(flow_sigma(t, shift))


def flow_training_sigmas(shift: float = 3.0, steps: int = 1000) -> Tensor:
    """The training sigmas of a rectified-flow model with a timestep shift (SD3's `ModelSamplingDiscreteFlow`):
    flow_sigma(t / 1000, shift) for t = 1..1000. Returns (1000,) float32, increasing, ending at 1."""
    t = torch.arange(1, steps + 1, dtype=torch.float64) / steps
    return flow_sigma(t, shift).to(torch.float32)


def flow_schedule(schedule: str, steps: int, shift: float = 3.0) -> Tensor:
    """Sampler sigmas of a flow model (SD3 / 3.5): "normal" is the reference's (`flow_sigmas`); every other
    schedule (karras, exponential, sgm_uniform, simple, ddim_uniform, beta) runs over the shifted flow training
    sigmas, between their sigma_min flow_sigma(0.001) and sigma_max 1. (steps + 1,) float32, ending in 0."""
    key = schedule_key(schedule)
    if key in ("normal", "uniform"):
        return flow_sigmas(steps, shift)
    if key == "align_your_steps":   # the tables are noise levels of the discrete SD1 / SDXL schedule (up to 14.6)
        raise ValueError("Align Your Steps has tables for SD 1.x / SDXL sigmas only; pick another schedule for a "
                         "flow model")
    return get_sigmas(schedule, flow_training_sigmas(shift), steps)
