"""Discrete-time DDPM sigmas, flow sigmas, and the prediction-type scalings.

The contract every sampler relies on (k-diffusion, Karras et al. 2022 "EDM"): a denoiser is
`D(x, sigma) -> denoised x0`. A network trained for eps, v or flow prediction becomes one through
the SGM formula `D = net(x * c_in, t(sigma), cond) * c_out + x * c_skip`; the prediction type lives
only here.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

Tensor = torch.Tensor


def discrete_sigmas(linear_start: float = 0.00085, linear_end: float = 0.012, steps: int = 1000) -> Tensor:
    """The training sigmas of the LDM "linear" (diffusers: scaled_linear) schedule.

    betas = linspace(sqrt(start), sqrt(end), steps)**2 in float64, abar = cumprod(1 - betas),
    sigma = sqrt((1 - abar) / abar); rounded to float32 at the end. Returns (steps,), increasing.
    """
    betas = torch.linspace(math.sqrt(linear_start), math.sqrt(linear_end), steps, dtype=torch.float64) ** 2
    return sigmas_from_betas(betas)


def sigmas_from_betas(betas: Tensor) -> Tensor:
    """Training sigmas from a beta schedule (T,): abar = cumprod(1 - betas) in float64, sigma = sqrt((1 - abar) /
    abar), rounded to float32 at the end. Returns (T,), increasing."""
    abar = torch.cumprod(1.0 - betas.to(torch.float64), dim=0)
    return ((1 - abar) / abar).sqrt().to(torch.float32)


def sigma_to_t(sigma: Tensor, sigmas: Tensor) -> Tensor:
    """Fractional timestep of `sigma` by linear interpolation in log-sigma (k-diffusion CompVisDenoiser).

    sigma: any shape; sigmas: (T,) increasing training sigmas. Returns t with sigma's shape, in [0, T-1].
    """
    log_sigmas = sigmas.to(sigma.device, torch.float32).log()
    log_sigma = sigma.to(torch.float32).clamp(min=1e-10).log()
    dists = log_sigma[..., None] - log_sigmas  # (..., T)
    low = dists.ge(0).cumsum(dim=-1).argmax(dim=-1).clamp(max=log_sigmas.shape[0] - 2)
    high = low + 1
    lo, hi = log_sigmas[low], log_sigmas[high]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    return ((1 - w) * low + w * high).view(sigma.shape)


def t_to_sigma(t: Tensor, sigmas: Tensor) -> Tensor:
    """Sigma at fractional timestep t, interpolating linearly in log-sigma. t: any shape."""
    t = t.to(torch.float32).clamp(0, sigmas.shape[0] - 1)
    log_sigmas = sigmas.to(t.device, torch.float32).log()
    low = t.floor().long()
    high = t.ceil().long()
    w = t - low
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def flow_sigma(t: Tensor, shift: float = 3.0) -> Tensor:
    """Rectified-flow sigma with SD3's time shift: shift*t / (1 + (shift-1)*t), t in [0, 1]."""
    return shift * t / (1 + (shift - 1) * t)


def scalings(prediction: str, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in) for a prediction type; sigma: (B,) -> each (B,)."""
    if prediction == "eps":
        return torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1).sqrt()
    if prediction == "v":
        return 1 / (sigma**2 + 1), -sigma / (sigma**2 + 1).sqrt(), 1 / (sigma**2 + 1).sqrt()
    if prediction == "flow":
        return torch.ones_like(sigma), -sigma, torch.ones_like(sigma)
    raise ValueError(f"unknown prediction type {prediction!r}: expected eps, v or flow")


Net = Callable[..., Tensor]  # net(x_in (B,C,H,W), t (B,), **cond) -> output (B,C,H,W)


def sgm_net(unet) -> Net:
    """An LDM/SGM UNet as net(x_in, t, crossattn, vector, concat) in the SGM conditioner's language (SGM
    `OpenAIWrapper`): `concat` (B, C, h, w) is appended to the already c_in-scaled latent, unscaled; `vector` (B, A)
    goes in as the UNet's `y`, `crossattn` (B, T, D) as its context."""

    def net(x: Tensor, t: Tensor, crossattn: Tensor | None = None, vector: Tensor | None = None,
            concat: Tensor | None = None) -> Tensor:
        if concat is not None:
            x = torch.cat([x, concat.to(x.device, x.dtype)], dim=1)  # (B, C_latent + C_concat, h, w)
        return unet(x, t, context=crossattn, y=vector)

    return net


def make_denoiser(net: Net, prediction: str, sigmas: Tensor | None) -> Callable[..., Tensor]:
    """Turn a network into D(x, sigma, **cond) -> denoised.

    Discrete models (sigmas given) get t = sigma_to_t(sigma, sigmas) (fractional, as in k-diffusion);
    flow models (sigmas None) get t = 1000 * sigma.
    """

    def denoise(x: Tensor, sigma: Tensor, **cond: Tensor) -> Tensor:
        sigma = sigma.to(x.device, torch.float32).reshape(-1).expand(x.shape[0])  # (B,)
        c_skip, c_out, c_in = (c.view(-1, 1, 1, 1) for c in scalings(prediction, sigma))
        t = sigma_to_t(sigma, sigmas) if sigmas is not None else sigma * 1000
        out = net((x * c_in).to(x.dtype), t, **cond)
        return (out.float() * c_out + x.float() * c_skip).to(x.dtype)

    return denoise


def noised(prediction: str, x0: Tensor, noise: Tensor, sigma: float) -> Tensor:
    """The noisy latent at `sigma` from data x0 and unit noise: rectified flow (SD3, Esser et al. 2024)
    `(1 - sigma) x0 + sigma noise`; eps / v (variance exploding in k-diffusion's form) `x0 + sigma noise`."""
    if prediction == "flow":
        return x0 * (1.0 - float(sigma)) + noise * float(sigma)
    return x0 + noise * float(sigma)


def start_noise(prediction: str, noise: Tensor, sigma: float) -> Tensor:
    """Text to image's start from unit noise at the schedule's first sigma: flow `sigma * noise` (sigma 1: the noise
    itself, not scaled); eps / v the pinned `noise * sqrt(1 + sigma^2)`."""
    if prediction == "flow":
        return noise if float(sigma) == 1.0 else noise * float(sigma)
    return noise * math.sqrt(1.0 + float(sigma) ** 2)
