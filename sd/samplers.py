"""Samplers: pure functions over a denoiser `D(x, sigma) -> denoised`, written in k-diffusion's sigma form.

The data model (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"):
`x = x0 + sigma * noise`, with the probability-flow ODE `dx/dsigma = (x - D(x, sigma)) / sigma`.
Every sampler walks `sigmas` (decreasing, normally ending in 0) and never rescales its input: the caller
builds the first `x` (`noise * sqrt(1 + sigmas[0]**2)`, `noise * sigmas[0]`, or for img2img
`latent + noise * sigma_start`). DDPM and DDIM are written in this form too, so any family runs any
sampler. A rectified-flow model (SD3: `x = (1 - sigma) x0 + sigma * noise`) has the same ODE
`dx/dsigma = (x - D)/sigma`, so the deterministic samplers (euler, heun, dpm_2, lms, dpmpp_2m, uni_pc,
ddim with eta 0) run it unchanged on `flow_sigmas`. The stochastic samplers add noise the
variance-exploding way (`x + sigma_up * z`); `sample(..., flow=True)` runs them on a flow model through
the equivalent variance-exploding form (`_flow_as_ve`).

Common arguments of every `sample_<name>(denoiser, x, sigmas, *, generator, callback, stop, ...)`:
  denoiser   D(x (B,C,H,W) in the caller's dtype, sigma (B,) float32) -> denoised (B,C,H,W)
  x          (B,C,H,W) initial latent; the sampler state is kept in float32, the result is cast back
  sigmas     (n+1,) float32, decreasing; n steps
  generator  torch.Generator on the CPU (or a list of B of them, one per image): per-step noise is
             `torch.randn(x.shape, generator=generator, dtype=float32)` on the CPU, then moved to x's
             device, so a seed gives the same image on CPU and GPU
  callback   called after each step with dict(step, total, sigma, sigma_next, x, denoised)
  stop       a callable returning True, or a threading.Event; checked before each step; when set, the
             sampler returns the denoised estimate of the last finished step (x itself before the first)
"""
from __future__ import annotations

import inspect
import math
from typing import Callable

import numpy as np
import torch

Tensor = torch.Tensor
Denoiser = Callable[[Tensor, Tensor], Tensor]


# ----------------------------------------------------------------------------------------------
# Shared helpers


def _setup(denoiser: Denoiser, x: Tensor, sigmas: Tensor):
    """(x as float32, sigmas as python floats, model(x, sigma: float) -> float32 denoised, caller dtype)."""
    if sigmas.ndim != 1 or sigmas.numel() < 1:
        raise ValueError(f"sigmas must be a 1-D tensor of n+1 noise levels, got shape {tuple(sigmas.shape)}")
    dtype = x.dtype

    def model(x: Tensor, sigma: float) -> Tensor:
        s = torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)  # (B,)
        return denoiser(x.to(dtype), s).float()

    return x.float(), [float(s) for s in sigmas.tolist()], model, dtype


def _stopped(stop) -> bool:
    if stop is None:
        return False
    if hasattr(stop, "is_set"):  # threading.Event
        return bool(stop.is_set())
    return bool(stop())


def _partial(x: Tensor, denoised: Tensor | None, dtype: torch.dtype) -> Tensor:
    """What a stopped sampler returns: the last denoised estimate (x itself before the first step)."""
    return (x if denoised is None else denoised).to(dtype)


def _report(callback, i: int, sig: list[float], x: Tensor, denoised: Tensor) -> None:
    if callback is not None:
        callback(dict(step=i, total=len(sig) - 1, sigma=sig[i], sigma_next=sig[i + 1], x=x, denoised=denoised))


def _noise(x: Tensor, generator) -> Tensor:
    """Standard normal noise like x, drawn in float32 on the CPU (one generator, or one per batch item)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
        z = torch.cat([torch.randn((1, *x.shape[1:]), generator=g, dtype=torch.float32) for g in generator])
    else:
        z = torch.randn(tuple(x.shape), generator=generator, dtype=torch.float32)
    return z.to(x.device, x.dtype)


def _ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step: go deterministically to sigma_down, then add
    sigma_up * z, with sigma_down^2 + sigma_up^2 = sigma_next^2. eta 1 is the DDPM posterior variance
    (Ho et al. 2020), eta 0 the deterministic DDIM step."""
    if not eta or sigma_next == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


def _churn(x: Tensor, sigma: float, n: int, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float,
           generator) -> tuple[Tensor, float]:
    """Karras et al. 2022 Algorithm 2 lines 4-6: raise the noise level to sigma_hat = sigma * (1 + gamma)."""
    gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma <= 0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    return x + _noise(x, generator) * s_noise * math.sqrt(sigma_hat**2 - sigma**2), sigma_hat


# ----------------------------------------------------------------------------------------------
# First- and second-order ODE solvers (Karras et al. 2022)


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, generator=None, callback=None, stop=None,
                 s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0):
    """Euler: Karras et al. 2022, Algorithm 2 with first-order steps: `x += (x - D)/sigma * (sigma_next - sigma)`.
    s_churn > 0 adds the algorithm's stochastic noise raise (off by default, as in A1111)."""
    x, sig, model, dtype = _setup(denoiser, x, sigmas)
    n, denoised = len(sig) - 1, None
    for i in range(n):
        if _stopped(stop):
            return _partial(x, denoised, dtype)
        x, sigma_hat = _churn(x, sig[i], n, s_churn, s_tmin, s_tmax, s_noise, generator)
        denoised = model(x, sigma_hat)
        d = (x - denoised) / sigma_hat  # (B,C,H,W) dx/dsigma
        x = x + d * (sig[i + 1] - sigma_hat)
        _report(callback, i, sig, x, denoised)
    return x.to(dtype)


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, *, generator=None, callback=None, stop=None,
                           eta: float = 1.0, s_noise: float = 1.0):
    """Euler a: k-diffusion's ancestral sampler. An Euler step (Karras et al. 2022) down to sigma_down, then
    fresh noise sigma_up * z (`_ancestral_step`); with eta 1 it is the DDPM ancestral step of Ho et al. 2020."""
    x, sig, model, dtype = _setup(denoiser, x, sigmas)
    denoised = None
    for i in range(len(sig) - 1):
        if _stopped(stop):
            return _partial(x, denoised, dtype)
        denoised = model(x, sig[i])
        down, up = _ancestral_step(sig[i], sig[i + 1], eta)
        x = x + (x - denoised) / sig[i] * (down - sig[i])
        if up > 0:
            x = x + _noise(x, generator) * s_noise * up
        _report(callback, i, sig, x, denoised)
    return x.to(dtype)


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, generator=None, callback=None, stop=None,
                s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0):
    """Heun: Karras et al. 2022, Algorithm 2 (second-order Heun / trapezoidal steps, an Euler step when
    sigma_next is 0). Two model calls per step."""
    x, sig, model, dtype = _setup(denoiser, x, sigmas)
    n, denoised = len(sig) - 1, None
    for i in range(n):
        if _stopped(stop):
            return _partial(x, denoised, dtype)
        x, sigma_hat = _churn(x, sig[i], n, s_churn, s_tmin, s_tmax, s_noise, generator)
        denoised = model(x, sigma_hat)
        d = (x - denoised) / sigma_hat
        dt = sig[i + 1] - sigma_hat
        if sig[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - model(x_2, sig[i + 1])) / sig[i + 1]
            x = x + (d + d_2) / 2 * dt
        _report(callback, i, sig, x, denoised)
    return x.to(dtype)


@torch.no_grad()
def sample_dpm_2(denoiser, x, sigmas, *, generator=None, callback=None, stop=None,
                 s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0):
    """DPM2: k-diffusion's second-order midpoint sampler, after DPM-Solver-2 (Lu et al. 2022, "DPM-Solver",
    Algorithm 1 with r = 1/2) and Karras et al. 2022 Algorithm 2. The midpoint is the geometric mean of
    sigma and sigma_next; an Euler step when sigma_next is 0."""
    x, sig, model, dtype = _setup(denoiser, x, sigmas)
    n, denoised = len(sig) - 1, None
    for i in range(n):
        if _stopped(stop):
            return _partial(x, denoised, dtype)
        x, sigma_hat = _churn(x, sig[i], n, s_churn, s_tmin, s_tmax, s_noise, generator)
        denoised = model(x, sigma_hat)
        d = (x - denoised) / sigma_hat
        if sig[i + 1] == 0:
            x = x + d * (sig[i + 1] - sigma_hat)
        else:
            mid = math.sqrt(sigma_hat * sig[i + 1])
            x_2 = x + d * (mid - sigma_hat)
            d_2 = (x_2 - model(x_2, mid)) / mid
            x = x + d_2 * (sig[i + 1] - sigma_hat)
        _report(callback, i, sig, x, denoised)
    return x.to(dtype)


@torch.no_grad()
def sample_dpm_2_ancestral(denoiser, x, sigmas, *, generator=None, callback=None, stop=None,
                           eta: float = 1.0, s_noise: float = 1.0):
    """DPM2 a: the DPM2 midpoint step (Lu et al. 2022) down to sigma_down, then ancestral noise sigma_up * z
    (k-diffusion `sample_dpm_2_ancestral`)."""
    x, sig, model, dtype = _setup(denoiser, x, sigmas)
    denoised = None
    for i in range(len(sig) - 1):
        if _stopped(stop):
            return _partial(x, denoised, dtype)
        denoised = model(x, sig[i])
        down, up = _ancestral_step(sig[i], sig[i + 1], eta)
        d = (x - denoised) / sig[i]
        if down == 0:
            x = x + d * (down - sig[i])
        else:
            mid = math.sqrt(sig[i] * down)
            x_2 = x + d * (mid - sig[i])
            d_2 = (x_2 - model(x_2, mid)) / mid
            x = x + d_2 * (down - sig[i])
        if up > 0:
            x = x + _noise(x, generator) * s_noise * up
        _report(callback, i, sig, x, denoised)
    return x.to(dtype)


def _lms_coeff(order: int, sig: list[float], i: int, j: int) -> float:
    """Integral over [sig[i], sig[i+1]] of the Lagrange basis polynomial of node sig[i-j] among the nodes
    sig[i], ..., sig[i-order+1]; 4-point Gauss-Legendre, exact for these polynomials (degree <= 3)."""
    nodes, weights = np.polynomial.legendre.leggauss(4)
    a, b = sig[i], sig[i + 1]
    tau = (a + b) / 2 + (b - a) / 2 * nodes  # (4,)
    prod = np.ones_like(tau)
    for k in range(order):
        if k != j:
            prod *= (tau - sig[i - k]) / (sig[i - j] - sig[i - k])
    return float((b - a) / 2 * np.sum(weights * prod))


@torch.no_grad()
def sample_lms(denoiser, x, sigmas, *, generator=None, callback=None, stop=None, order: int = 4):
    """LMS: linear multistep (Adams-Bashforth in sigma) over the last `order` derivatives, with the
    coefficients integrated from Lagrange polynomials (k-diffusion `sample_lms`, after Karras et al. 2022
    and the PNDM/LMS line of Liu et al. 2022). Lower order on the first steps."""
    x, sig, model, dtype = _setup(denoiser, x, sigmas)
    ds, denoised = [], None
    for i in range(len(sig) - 1):
        if _stopped(stop):
            return _partial(x, denoised, dtype)
        denoised = model(x, sig[i])
        ds.append((x - denoised) / sig[i])
        if len(ds) > order:
            ds.pop(0)
        cur = min(i + 1, order)
        coeffs = [_lms_coeff(cur, sig, i, j) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        _report(callback, i, sig, x, denoised)
    return x.to(dtype)


# ----------------------------------------------------------------------------------------------
# DPM-Solver++ family (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
# Probabilistic Models"); t = -log(sigma) is the half log-SNR lambda, h = t_next - t.


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, generator=None, callback=None, stop=None):
    """DPM++ 2M: DPM-Solver++(2M), Lu et al. 2022 Algorithm 2 (data prediction, multistep second order):
    `x = (sigma_next/sigma) x - expm1(-h) D'`, D' = (1 + 1/2r) D - (1/2r) D_prev, r = h_prev/h; first order
    on the first step and on the last step to sigma 0."""
    x, sig, model, dtype = _setup(denoiser, x, sigmas)
    old, denoised = None, None
    for i in range(len(sig) - 1):
        if _stopped(stop):
            return _partial(x, denoised, dtype)
        denoised = model(x, sig[i])
        if sig[i + 1] == 0:
            x = denoised
        else:
            h = math.log(sig[i] / sig[i + 1])
            d = denoised
            if old is not None:
                r = math.log(sig[i - 1] / sig[i]) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = (sig[i + 1] / sig[i]) * x - math.expm1(-h) * d
        old = denoised
        _report(callback, i, sig, x, denoised)
    return x.to(dtype)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoiser, x, sigmas, *, generator=None, callback=None, stop=None,
                              eta: float = 1.0, s_noise: float = 1.0):
    """DPM++ 2S a: DPM-Solver++(2S), Lu et al. 2022 Algorithm 1 (single-step second order, r = 1/2), taken
    down to sigma_down, then ancestral noise sigma_up * z (k-diffusion `sample_dpmpp_2s_ancestral`)."""
    x, sig, model, dtype = _setup(denoiser, x, sigmas)
    denoised = None
    for i in range(len(sig) - 1):
        if _stopped(stop):
            return _partial(x, denoised, dtype)
        denoised = model(x, sig[i])
        down, up = _ancestral_step(sig[i], sig[i + 1], eta)
        if down == 0:
            x = denoised
        else:
            h = math.log(sig[i] / down)
            s = sig[i] * math.exp(-h / 2)  # sigma at the half step in lambda
            x_2 = (s / sig[i]) * x - math.expm1(-h / 2) * denoised
            x = (down / sig[i]) * x - math.expm1(-h) * model(x_2, s)
        if up > 0:
            x = x + _noise(x, generator) * s_noise * up
        _report(callback, i, sig, x, denoised)
    return x.to(dtype)


@torch.no_grad()
def sample_dpmpp_sde(denoiser, x, sigmas, *, generator=None, callback=None, stop=None,
                     eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5):
    """DPM++ SDE: k-diffusion's stochastic DPM-Solver++ (Lu et al. 2022) with a second-order single step
    (SDE-DPM-Solver-2 style, intermediate point at lambda + r h), each half adding ancestral noise.

    The two noises of a step are increments of one Brownian motion W(sigma) over [s, sigma] and
    [sigma_next, sigma] (what k-diffusion's BrownianTreeNoiseSampler gives), built here from two
    generator draws: n1 = z1, n2 = (sqrt(a) z1 + sqrt(b) z2) / sqrt(a + b), a = sigma - s, b = s - sigma_next.
    """
    x, sig, model, dtype = _setup(denoiser, x, sigmas)
    denoised = None
    for i in range(len(sig) - 1):
        if _stopped(stop):
            return _partial(x, denoised, dtype)
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = model(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            s = sigma * math.exp(-r * h)
            fac = 1 / (2 * r)
            z1 = _noise(x, generator) if eta else None
            # step 1: to s
            down, up = _ancestral_step(sigma, s, eta)
            x_2 = (down / sigma) * x + (1 - down / sigma) * denoised
            if up > 0:
                x_2 = x_2 + z1 * s_noise * up
            denoised_2 = model(x_2, s)
            # step 2: to sigma_next with the blended denoised
            down, up = _ancestral_step(sigma, sigma_next, eta)
            d = (1 - fac) * denoised + fac * denoised_2
            x = (down / sigma) * x + (1 - down / sigma) * d
            if up > 0:
                a, b = sigma - s, s - sigma_next
                z2 = (math.sqrt(a) * z1 + math.sqrt(b) * _noise(x, generator)) / math.sqrt(a + b)
                x = x + z2 * s_noise * up
        _report(callback, i, sig, x, denoised)
    return x.to(dtype)


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, generator=None, callback=None, stop=None,
                        eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "midpoint"):
    """DPM++ 2M SDE: SDE-DPM-Solver++(2M), Lu et al. 2022 (section 5 / appendix, the multistep solver of the
    data-prediction SDE), as in k-diffusion `sample_dpmpp_2m_sde`. eta 0 gives DPM++ 2M;
    solver_type "midpoint" (default) or "heun" for the second-order correction."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    x, sig, model, dtype = _setup(denoiser, x, sigmas)
    old, h_last, denoised = None, None, None
    for i in range(len(sig) - 1):
        if _stopped(stop):
            return _partial(x, denoised, dtype)
        denoised = model(x, sig[i])
        if sig[i + 1] == 0:
            x = denoised
        else:
            h = math.log(sig[i] / sig[i + 1])
            eta_h = eta * h
            phi = -math.expm1(-h - eta_h)  # 1 - exp(-(1+eta) h)
            x = (sig[i + 1] / sig[i]) * math.exp(-eta_h) * x + phi * denoised
            if old is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + (phi / (-h - eta_h) + 1) * (1 / r) * (denoised - old)
                else:
                    x = x + 0.5 * phi * (1 / r) * (denoised - old)
            if eta:
                x = x + _noise(x, generator) * sig[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
            h_last = h
        old = denoised
        _report(callback, i, sig, x, denoised)
    return x.to(dtype)


@torch.no_grad()
def sample_dpmpp_3m_sde(denoiser, x, sigmas, *, generator=None, callback=None, stop=None,
                        eta: float = 1.0, s_noise: float = 1.0):
    """DPM++ 3M SDE: third-order multistep SDE-DPM-Solver++ (Lu et al. 2022; k-diffusion
    `sample_dpmpp_3m_sde`), with phi_2 / phi_3 exponential-integrator weights; eta 0 gives DPM-Solver++(3M)."""
    x, sig, model, dtype = _setup(denoiser, x, sigmas)
    den_1 = den_2 = None
    h_1 = h_2 = None
    denoised = None
    for i in range(len(sig) - 1):
        if _stopped(stop):
            return _partial(x, denoised, dtype)
        denoised = model(x, sig[i])
        h = None
        if sig[i + 1] == 0:
            x = denoised
        else:
            h = math.log(sig[i] / sig[i + 1])
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - den_1) / r0
                d1_1 = (den_1 - den_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - den_1) / (h_1 / h)
            if eta:
                x = x + _noise(x, generator) * sig[i + 1] * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
        den_1, den_2 = denoised, den_1
        h_1, h_2 = h, h_1
        _report(callback, i, sig, x, denoised)
    return x.to(dtype)


# ----------------------------------------------------------------------------------------------
# DDPM, DDIM and LCM in sigma form (formats.md section 6)


@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, *, generator=None, callback=None, stop=None):
    """DDPM: ancestral sampling from the posterior q(x_prev | x_t, x0) of Ho et al. 2020 (eq. 6-7, Algorithm 2),
    with the eps-form mean on strided timesteps, written in sigma form.

    In VP space (abar = 1/(1+sigma^2), alpha = abar/abar_prev, eps = (x - D)/sigma, x_vp = x/sqrt(1+sigma^2)):
    `mu = (x_vp - (1-alpha) eps/sqrt(1-abar)) / sqrt(alpha)`, variance `(1-alpha)(1-abar_prev)/(1-abar)`.
    Multiplying by sqrt(1+sigma_prev^2) this is exactly
    `x_prev = D + (sigma_prev^2/sigma^2)(x - D) + sigma_prev sqrt(sigma^2 - sigma_prev^2)/sigma * z`,
    i.e. an Euler step to sigma_down = sigma_prev^2/sigma plus ancestral noise (the Euler a step with eta 1).
    """
    x, sig, model, dtype = _setup(denoiser, x, sigmas)
    denoised = None
    for i in range(len(sig) - 1):
        if _stopped(stop):
            return _partial(x, denoised, dtype)
        sigma, prev = sig[i], sig[i + 1]
        denoised = model(x, sigma)
        x = denoised + (prev**2 / sigma**2) * (x - denoised)
        if prev > 0:
            x = x + _noise(x, generator) * (prev * math.sqrt(sigma**2 - prev**2) / sigma)
        _report(callback, i, sig, x, denoised)
    return x.to(dtype)


@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, *, generator=None, callback=None, stop=None,
                eta: float = 0.0, s_noise: float = 1.0):
    """DDIM: Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12, in sigma form.

    VP form: `x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - s^2) eps + s z`, with
    `s = eta sqrt((1-abar_prev)/(1-abar)) sqrt(1 - abar/abar_prev)`. Dividing by sqrt(abar_prev) gives
    `x_prev = D + sqrt(sigma_prev^2 - s'^2) eps + s' z`, `s' = eta sigma_prev sqrt(sigma^2 - sigma_prev^2)/sigma`.
    eta 0 (default) is deterministic and equals an Euler step; eta 1 equals DDPM.
    """
    x, sig, model, dtype = _setup(denoiser, x, sigmas)
    denoised = None
    for i in range(len(sig) - 1):
        if _stopped(stop):
            return _partial(x, denoised, dtype)
        sigma, prev = sig[i], sig[i + 1]
        denoised = model(x, sigma)
        eps = (x - denoised) / sigma
        s = eta * prev * math.sqrt(max(sigma**2 - prev**2, 0.0)) / sigma
        x = denoised + math.sqrt(max(prev**2 - s**2, 0.0)) * eps
        if s > 0:
            x = x + _noise(x, generator) * s_noise * s
        _report(callback, i, sig, x, denoised)
    return x.to(dtype)


@torch.no_grad()
def sample_lcm(denoiser, x, sigmas, *, generator=None, callback=None, stop=None):
    """LCM: multistep consistency sampling, Luo et al. 2023 ("Latent Consistency Models", Algorithm 1; Song et
    al. 2023 "Consistency Models" Algorithm 1): jump to the denoised estimate, then re-noise to sigma_next
    with fresh noise, `x = D + sigma_next * z`. For LCM-distilled models and LCM LoRAs, at 2-8 steps."""
    x, sig, model, dtype = _setup(denoiser, x, sigmas)
    denoised = None
    for i in range(len(sig) - 1):
        if _stopped(stop):
            return _partial(x, denoised, dtype)
        denoised = model(x, sig[i])
        x = denoised
        if sig[i + 1] > 0:
            x = x + _noise(x, generator) * sig[i + 1]
        _report(callback, i, sig, x, denoised)
    return x.to(dtype)


# ----------------------------------------------------------------------------------------------
# UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
# Models"), data-prediction multistep form with B(h) = h ("bh1") or expm1(h) ("bh2").


def _unipc_update(x: Tensor, ms: list[Tensor], lams: list[float], lam_t: float, order: int, variant: str,
                  model_t: Tensor | None = None) -> Tensor:
    """One UniP (model_t None) or UniC (model_t = D at the predicted point) update from the point of ms[-1].

    x: sample at lams[-1]; ms / lams: past denoised outputs and their lambda = -log sigma, latest last;
    lam_t: lambda of the target. Returns the sample at lam_t (UniP) or the corrected one (UniC).
    """
    lam0, m0 = lams[-1], ms[-1]
    h = lam_t - lam0
    rks, d1s = [], []
    for k in range(1, order):
        rk = (lams[-(k + 1)] - lam0) / h
        rks.append(rk)
        d1s.append((ms[-(k + 1)] - m0) / rk)
    rks.append(1.0)
    hh = -h
    h_phi_1 = math.expm1(hh)  # e^{-h} - 1
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    R, b, fact = [], [], 1
    for j in range(1, order + 1):
        R.append([rk ** (j - 1) for rk in rks])
        b.append(h_phi_k * fact / b_h)
        fact *= j + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    R, b = np.array(R, dtype=np.float64), np.array(b, dtype=np.float64)
    x_base = math.exp(-h) * x - h_phi_1 * m0
    if model_t is None:  # predictor UniP-p
        if order == 1:
            return x_base
        rhos = [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        return x_base - b_h * sum(float(rho) * d for rho, d in zip(rhos, d1s))
    rhos = [0.5] if order == 1 else np.linalg.solve(R, b).tolist()  # corrector UniC-p
    res = sum((float(rho) * d for rho, d in zip(rhos[:-1], d1s)), torch.zeros_like(x))
    return x_base - b_h * (res + rhos[-1] * (model_t - m0))


@torch.no_grad()
def sample_uni_pc(denoiser, x, sigmas, *, generator=None, callback=None, stop=None,
                  order: int = 3, variant: str = "bh1", use_corrector: bool = True):
    """UniPC: Zhao et al. 2023, UniP-p predictor + UniC corrector (Algorithms 1-2, multistep, data prediction),
    order 3 with B(h) = h ("bh1", ComfyUI/A1111 "uni_pc"; "bh2" = expm1(h)). Warm-up with lower orders,
    lower order on the final steps, no corrector after the last step; one model call per step."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    x, sig, model, dtype = _setup(denoiser, x, sigmas)
    n = len(sig) - 1
    ms, lams = [], []
    x_last, order_last, denoised = None, 1, None
    for i in range(n):
        if _stopped(stop):
            return _partial(x, denoised, dtype)
        denoised = model(x, sig[i])
        lam = -math.log(sig[i])
        if use_corrector and x_last is not None:
            x = _unipc_update(x_last, ms, lams, lam, order_last, variant, model_t=denoised)
        ms, lams = (ms + [denoised])[-order:], (lams + [lam])[-order:]
        x_last = x
        if sig[i + 1] == 0:
            x = denoised
        else:
            order_last = min(order, i + 1, n - i)
            x = _unipc_update(x, ms, lams, -math.log(sig[i + 1]), order_last, variant)
        _report(callback, i, sig, x, denoised)
    return x.to(dtype)


# ----------------------------------------------------------------------------------------------
# Registry, A1111 names, img2img


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "uni_pc": sample_uni_pc,
    "lcm": sample_lcm,
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
}

# Samplers that draw noise (with their default eta); the others are deterministic ODE solvers.
STOCHASTIC = ("euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde",
              "dpmpp_3m_sde", "lcm", "ddpm")

# As AUTOMATIC1111 shows them (its infotext "Sampler:" field); "DPM++ 2M Karras" = dpmpp_2m + karras.
DISPLAY_NAMES: dict[str, str] = {
    "euler": "Euler",
    "euler_ancestral": "Euler a",
    "heun": "Heun",
    "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a",
    "lms": "LMS",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2s_ancestral": "DPM++ 2S a",
    "dpmpp_sde": "DPM++ SDE",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_3m_sde": "DPM++ 3M SDE",
    "uni_pc": "UniPC",
    "lcm": "LCM",
    "ddim": "DDIM",
    "ddpm": "DDPM",
}

# Schedule suffixes of old A1111 sampler names, and its "Schedule type" labels.
_SCHEDULE_SUFFIXES: dict[str, str] = {
    "karras": "karras",
    "exponential": "exponential",
    "polyexponential": "polyexponential",
    "sgm uniform": "sgm_uniform",
    "sgmuniform": "sgm_uniform",
    "kl optimal": "kl_optimal",
    "align your steps": "align_your_steps",
    "simple": "simple",
    "normal": "normal",
    "uniform": "uniform",
    "beta": "beta",
    "ddim": "ddim_uniform",
}

# AUTOMATIC1111's sampler table (>= 1.9, `modules/sd_samplers_kdiffusion.py` samplers_k_diffusion options): the
# schedule its "Automatic" means for each sampler (those without one use the model's own discretization,
# k-diffusion get_sigmas = "uniform"), and the samplers with `discard_next_to_last_sigma`. DDIM is A1111's
# timestep sampler (uniform DDIM timesteps); DDPM is not an A1111 sampler.
A1111_AUTOMATIC: dict[str, str] = {
    "dpmpp_2m": "karras", "dpmpp_sde": "karras", "dpmpp_2s_ancestral": "karras", "dpm_2": "karras",
    "dpm_2_ancestral": "karras", "dpmpp_2m_sde": "exponential", "dpmpp_3m_sde": "exponential",
    "ddim": "ddim_uniform",
}
DISCARD_NEXT_TO_LAST_SIGMA = ("dpm_2", "dpm_2_ancestral", "dpmpp_3m_sde")


def resolve_schedule(schedule: str, sampler: str) -> str:
    """The schedule key a request runs: A1111's "Automatic" becomes the sampler's default (A1111_AUTOMATIC, else
    "uniform"); any other key or A1111 label is normalised (sd.schedules.schedule_key). Raises ValueError naming
    the known labels for one we do not have."""
    from .schedules import AUTOMATIC, SCHEDULE_DISPLAY_NAMES, schedule_key

    key = schedule_key(schedule)
    if key is None:
        raise ValueError(f"unknown schedule type {schedule!r}: expected Automatic or one of "
                         f"{', '.join(SCHEDULE_DISPLAY_NAMES.values())}")
    return A1111_AUTOMATIC.get(sampler, "uniform") if key == AUTOMATIC else key


def sampler_sigmas(build: Callable[[int], Tensor], steps: int, sampler: str) -> Tensor:
    """The (steps + 1,) sigmas a sampler walks, from `build(n)` -> (n + 1,) sigmas of an n-step schedule. For the
    samplers A1111 marks `discard_next_to_last_sigma` (DPM2, DPM2 a, DPM++ 3M SDE) it builds steps + 1 steps and
    drops the next-to-last sigma (A1111 `get_sigmas`: `cat([sigmas[:-2], sigmas[-1:]])`), so the last step goes
    from the third-to-last sigma straight to the end."""
    if sampler not in DISCARD_NEXT_TO_LAST_SIGMA:
        return build(steps)
    sigmas = build(steps + 1)                                        # (steps + 2,)
    return torch.cat([sigmas[:-2], sigmas[-1:]])                     # (steps + 1,)


def sampler_from_display(name: str) -> tuple[str, str | None]:
    """A1111 display name -> (sampler, schedule or None): "DPM++ 2M Karras" -> ("dpmpp_2m", "karras"),
    "Euler a" -> ("euler_ancestral", None). Also accepts the internal names. Case-insensitive."""
    key = " ".join(name.strip().split()).lower()
    by_display = {v.lower(): k for k, v in DISPLAY_NAMES.items()}
    if key in by_display:
        return by_display[key], None
    if key in SAMPLERS:
        return key, None
    for suffix, schedule in sorted(_SCHEDULE_SUFFIXES.items(), key=lambda kv: -len(kv[0])):
        if key.endswith(" " + suffix) and key[: -len(suffix) - 1] in by_display:
            return by_display[key[: -len(suffix) - 1]], schedule
    raise ValueError(f"unknown sampler {name!r}: expected one of {', '.join(DISPLAY_NAMES.values())}, "
                     "optionally followed by a schedule (Karras, Exponential, SGM Uniform, ...)")


FLOW_FIRST_SIGMA = 1 - 1e-4  # where a stochastic sampler starts on a flow model (ComfyUI's offset for sigma 1)


def _flow_as_ve(fn: Callable[..., Tensor], denoiser: Denoiser, x: Tensor, sigmas: Tensor, callback, **kw) -> Tensor:
    """Run a sampler written for `x = x0 + sigma n` on a rectified-flow model `x = (1 - sigma) x0 + sigma n`.

    Dividing by (1 - sigma) turns the flow process into the variance-exploding one with the same data and
    noise: `x_ve = x / (1 - sigma)`, `sigma_ve = sigma / (1 - sigma)` (so lambda = -log sigma_ve is the
    half log-SNR log((1 - sigma)/sigma)), `D_ve(x_ve, sigma_ve) = D(x_ve / (1 + sigma_ve), sigma_ve / (1 + sigma_ve))`.
    Sigma 1 (infinite sigma_ve) is moved to FLOW_FIRST_SIGMA, as ComfyUI does for the same samplers.
    The callback sees flow sigmas and flow x; the result (sigma 0) is the same in both forms.
    """
    sig = sigmas.detach().to("cpu", torch.float64).clone()
    sig[0] = min(float(sig[0]), FLOW_FIRST_SIGMA)
    sig_ve = (sig / (1 - sig)).to(torch.float32)  # (n+1,) increasing to large values at the start
    x_ve = x.float() / (1 - float(sig[0]))

    def den(x_ve: Tensor, s_ve: Tensor) -> Tensor:
        s_ve = s_ve.double()
        scale = (1 / (1 + s_ve)).view(-1, *([1] * (x_ve.ndim - 1)))
        return denoiser((x_ve * scale.to(x_ve.device)).to(x.dtype), (s_ve / (1 + s_ve)).float())

    def cb(d: dict) -> None:
        s, s_next = d["sigma"] / (1 + d["sigma"]), d["sigma_next"] / (1 + d["sigma_next"])
        callback(dict(d, sigma=s, sigma_next=s_next, x=d["x"] / (1 + d["sigma_next"])))

    out = fn(den, x_ve, sig_ve, callback=cb if callback is not None else None, **kw)  # float32 state
    return out.to(x.dtype)


def sample(name: str, denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None,
           stop=None, eta: float | None = None, flow: bool = False, **opts) -> Tensor:
    """Run the sampler called `name` (a key of SAMPLERS). eta None keeps the sampler's default; samplers
    without an eta ignore it (as A1111 does). Other options go to the sampler (e.g. s_churn, order).

    flow=True says the denoiser is a rectified-flow model (SD3) and `sigmas` flow sigmas: the ODE samplers
    run on it unchanged (the same ODE; this is what the SD3 reference code does), the ones that draw noise
    run through the equivalent variance-exploding form (`_flow_as_ve`) so their noise is right.
    """
    fn = SAMPLERS.get(name)
    if fn is None:
        raise ValueError(f"unknown sampler {name!r}: expected one of {', '.join(SAMPLERS)} "
                         "(use sampler_from_display for A1111 names)")
    if eta is not None and "eta" in inspect.signature(fn).parameters:
        opts["eta"] = eta
    noisy = name in STOCHASTIC or opts.get("eta") or opts.get("s_churn")
    if flow and noisy:
        return _flow_as_ve(fn, denoiser, x, sigmas, callback, generator=generator, stop=stop, **opts)
    return fn(denoiser, x, sigmas, generator=generator, callback=callback, stop=stop, **opts)


def img2img_steps(steps: int, strength: float, fixed: bool = False) -> tuple[int, int]:
    """(schedule steps, t_enc) as AUTOMATIC1111's `setup_img2img_steps` (modules/sd_samplers_common.py).

    Default: the `steps`-step schedule, `t_enc = int(min(strength, 0.999) * steps)`. fixed=True (A1111's "do
    exactly the amount of steps the slider specifies", and its hires-fix second pass): a schedule of
    `int(steps / min(strength, 0.999))` steps (0 at strength 0) with `t_enc = steps - 1`. Either way t_enc + 1
    steps run, from `sigmas[schedule_steps - t_enc - 1]` (img2img_start)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if fixed:
        return (int(steps / min(strength, 0.999)) if strength > 0 else 0), steps - 1
    return steps, int(min(strength, 0.999) * steps)


def img2img_start(sigmas: Tensor, strength: float) -> Tensor:
    """Truncated schedule for img2img at denoising strength s, AUTOMATIC1111's rule (`setup_img2img_steps` and
    KDiffusionSampler.sample_img2img): of the full `steps`-step schedule, `t_enc = int(min(s, 0.999) * steps)`
    and `t_enc + 1` steps run from `sigmas[steps - t_enc - 1]`.

    sigmas: (steps+1,) from a schedule. Returns sigmas[steps - t_enc - 1:], (t_enc + 2,); the caller starts from
    `x = latent + noise * result[0]`. Strength 0.75 at 20 steps: t_enc 15, 16 steps from sigmas[4]; strength 1
    runs every step from sigma_max; strength 0 still runs the last step (from sigmas[steps - 1]), as A1111 does.
    """
    steps = sigmas.shape[0] - 1
    _, t_enc = img2img_steps(steps, strength)
    return sigmas[steps - t_enc - 1:]
