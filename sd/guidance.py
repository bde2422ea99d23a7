"""Classifier-free guidance as a wrapper denoiser (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance").

`cfg_denoiser(denoise, cond, uncond, scale)` returns `D(x, sigma) -> denoised` for the samplers:
`uncond + scale * (cond - uncond)`, computed with one batched model call (x, sigma and every condition
tensor concatenated as [cond; uncond] along the batch), skipped entirely when the scale is 1 or there is
no unconditional branch. Optional: guidance rescale (Lin et al. 2023) and a sigma interval outside which
guidance is off (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample and
Distribution Quality in Diffusion Models").
"""
from __future__ import annotations

from typing import Callable

import torch

Tensor = torch.Tensor


def _fit_batch(v, batch: int):
    """Expand a batch-1 condition tensor to the batch of x; other values pass through."""
    if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == 1 and batch != 1:
        return v.expand(batch, *v.shape[1:])
    return v


def _can_batch(cond: dict, uncond: dict) -> bool:
    """One call needs the same keys and, for tensors, the same shape after the batch dim (e.g. a long
    prompt's context of 154 tokens against a 77-token negative cannot be stacked)."""
    if cond.keys() != uncond.keys():
        return False
    for k, v in cond.items():
        u = uncond[k]
        if isinstance(v, Tensor) != isinstance(u, Tensor):
            return False
        if isinstance(v, Tensor):
            if v.shape[1:] != u.shape[1:]:
                return False
        elif v is not u and v != u:
            return False
    return True


def rescale_guidance(guided: Tensor, cond: Tensor, phi: float) -> Tensor:
    """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", eq. 15-16 (Algorithm 2):
    rescale the guided prediction to the per-sample std of the conditional one, then blend with phi.
    guided, cond: (B, C, H, W); the std is taken per sample over (C, H, W)."""
    dims = tuple(range(1, guided.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)  # (B,1,1,1)
    std_guided = guided.std(dim=dims, keepdim=True).clamp_min(1e-12)  # a constant prediction stays finite
    rescaled = guided * (std_cond / std_guided)
    return phi * rescaled + (1 - phi) * guided


def cfg_denoiser(denoise: Callable[..., Tensor], cond: dict, uncond: dict | None, scale: float, *,
                 rescale: float = 0.0, sigma_interval: tuple[float, float] | None = None
                 ) -> Callable[[Tensor, Tensor], Tensor]:
    """Wrap `denoise(x, sigma, **cond) -> denoised` into a guided `D(x, sigma)`.

    cond / uncond: dict name -> tensor with the batch dim first (e.g. {"context": (B,77,768), "y": (B,2816)});
      batch-1 tensors are expanded to x's batch; non-tensor values must be equal in both and pass as is.
    scale: the CFG scale; scale == 1 or uncond None -> the conditional branch only (one model call on B).
    rescale: phi of guidance rescale (Lin et al. 2023), applied to the denoised x0 estimate; 0 = off.
    sigma_interval: (lo, hi); for a sample whose sigma is outside [lo, hi], guidance is off (its result is the
      conditional one); when every sample is outside, the unconditional branch is not computed at all.

    cond and uncond go through one batched call [cond; uncond] (2B). When they cannot be stacked (different
    keys, or context lengths that differ, as with a long prompt against a short negative), two separate
    calls are made instead; padding the shorter context would change the result, so it is not done.
    """
    guided_on = uncond is not None and scale != 1.0

    def guided(x: Tensor, sigma: Tensor) -> Tensor:
        B = x.shape[0]
        sigma = sigma.reshape(-1).expand(B)  # (B,)
        c = {k: _fit_batch(v, B) for k, v in cond.items()}
        if not guided_on:
            return denoise(x, sigma, **c)
        inside = None
        if sigma_interval is not None:
            lo, hi = sigma_interval
            inside = (sigma >= lo) & (sigma <= hi)  # (B,) bool
            if not bool(inside.any()):
                return denoise(x, sigma, **c)
        u = {k: _fit_batch(v, B) for k, v in uncond.items()}
        if _can_batch(c, u):
            both = {k: torch.cat([v, u[k]]) if isinstance(v, Tensor) else v for k, v in c.items()}
            out = denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), **both)  # (2B, C, H, W)
            d_cond, d_uncond = out[:B], out[B:]
        else:
            d_cond, d_uncond = denoise(x, sigma, **c), denoise(x, sigma, **u)
        out = d_uncond + scale * (d_cond - d_uncond)
        if rescale:
            out = rescale_guidance(out.float(), d_cond.float(), rescale).to(out.dtype)
        if inside is not None:
            out = torch.where(inside.view(-1, *([1] * (x.ndim - 1))).to(out.device), out, d_cond)
        return out

    return guided
