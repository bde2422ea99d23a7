"""Skip-layer guidance (SLG) on top of classifier-free guidance, family-blind.

Introduced with SD3.5 medium (Stability AI's SD3.5 release and reference code `sd3_infer.py`,
`SkipLayerCFGDenoiser`; the model itself: Esser et al. 2024, "Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis"): in a window of steps, one extra pass runs the
conditional branch with some transformer blocks left out, and the guided result is pushed away from it:

    out = cfg(x) + (pos - skip) * scale        while  start * steps < step < end * steps

where `pos` is the conditional denoised output of the CFG pass and `skip` the conditional output with the blocks
`layers` skipped. Defaults are the reference's for 3.5 medium: layers 7, 8, 9, scale 2.5, start 0.01, end 0.2.
The guidance is linear in the denoised x0 (D = x - sigma * v for flow models), so applying it to x0 is the same
as applying it to the velocity, as diffusers does.

The wrapped `denoise(x, sigma, **cond)` must accept `skip_layers=` among its keyword arguments (the MMDiT's
`sd.mmdit.mmdit_net` does). The step index is the position of the current sigma in the schedule `sigmas`
(one model evaluation per step, as the reference counts its calls with Euler / DPM++ 2M).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from sd.guidance import cfg_denoiser

Tensor = torch.Tensor


@dataclass(frozen=True)
class SkipLayerGuidance:
    """Which blocks to skip, how strongly, and over which fraction of the steps."""

    layers: tuple[int, ...] = (7, 8, 9)   # joint blocks left out of the extra pass
    scale: float = 2.5                    # 0 = off
    start: float = 0.01                   # active while start * steps < step < end * steps
    end: float = 0.2

    def active(self, step: int, steps: int) -> bool:
        return bool(self.layers) and self.scale != 0 and self.start * steps < step < self.end * steps


def step_index(sigma: Tensor, sigmas: Tensor) -> int:
    """Index of the schedule entry nearest to `sigma` (a scalar or (B,) of equal values)."""
    s = float(sigma.reshape(-1)[0])
    return int((sigmas.to(torch.float64) - s).abs().argmin())


def _fit(v, batch: int):
    if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == 1 and batch != 1:
        return v.expand(batch, *v.shape[1:])
    return v


def slg_cfg_denoiser(denoise: Callable[..., Tensor], cond: dict, uncond: dict | None, cfg_scale: float,
                     sigmas: Tensor, slg: SkipLayerGuidance = SkipLayerGuidance()
                     ) -> Callable[[Tensor, Tensor], Tensor]:
    """CFG (`sd.guidance.cfg_denoiser`) plus skip-layer guidance in its window of steps.

    denoise(x, sigma, **cond) -> denoised; cond / uncond as for cfg_denoiser; sigmas: the (steps + 1,) schedule
    the sampler walks. Outside the window (or with scale 0, or no layers) the result is exactly cfg_denoiser's.
    Inside it: one batched [cond; uncond] call (two calls when they cannot be stacked), then the skip pass
    `denoise(x, sigma, **cond, skip_layers=layers)`."""
    plain = cfg_denoiser(denoise, cond, uncond, cfg_scale)
    steps = sigmas.numel() - 1

    def guided(x: Tensor, sigma: Tensor) -> Tensor:
        if not slg.active(step_index(sigma, sigmas), steps):
            return plain(x, sigma)
        b = x.shape[0]
        sigma = sigma.reshape(-1).expand(b)  # (B,)
        c = {k: _fit(v, b) for k, v in cond.items()}
        if uncond is None or cfg_scale == 1.0:
            d_cond = out = denoise(x, sigma, **c)
        else:
            u = {k: _fit(v, b) for k, v in uncond.items()}
            stackable = c.keys() == u.keys() and all(
                isinstance(v, Tensor) and isinstance(u[k], Tensor) and v.shape[1:] == u[k].shape[1:]
                for k, v in c.items())
            if stackable:
                both = denoise(torch.cat([x, x]), torch.cat([sigma, sigma]),
                               **{k: torch.cat([v, u[k]]) for k, v in c.items()})  # (2B, C, H, W)
                d_cond, d_uncond = both[:b], both[b:]
            else:
                d_cond, d_uncond = denoise(x, sigma, **c), denoise(x, sigma, **u)
            out = d_uncond + cfg_scale * (d_cond - d_uncond)
        d_skip = denoise(x, sigma, **c, skip_layers=tuple(slg.layers))  # (B, C, H, W)
        return out + (d_cond - d_skip) * slg.scale

    return guided
