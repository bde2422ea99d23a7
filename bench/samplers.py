"""Error against steps for every sampler on an analytic problem: a table to choose a sampler from.

The problem (exactly solvable): data x0 ~ N(0, s^2) per element, so the exact denoiser is
`D(x, sigma) = x * s^2 / (s^2 + sigma^2)` and the probability-flow ODE maps the starting latent
`x_T = noise * sqrt(s^2 + sigma_max^2)` to `x_T * s / sqrt(s^2 + sigma_max^2)` at sigma 0.

Deterministic samplers: relative L2 error of the result against that exact ODE solution.
Stochastic samplers (default eta): relative error of the std of the result against s (the data std),
over 4096 samples; the sampling noise of a std estimated from 4096 samples is ~1.1%, so numbers below
about 0.02 mean "right within noise". Schedule: karras (or --schedule), SD 1.x training sigmas.

Run: `python bench/samplers.py [--schedule karras] [--s 1.0] [--steps 5 10 20 50 100]`
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sd.denoiser import discrete_sigmas  # noqa: E402
from sd.samplers import DISPLAY_NAMES, SAMPLERS, STOCHASTIC  # noqa: E402
from sd.schedules import get_sigmas  # noqa: E402


def gaussian_denoiser(s: float):
    """Exact D(x, sigma) for data ~ N(0, s^2), counting its calls."""
    calls = {"n": 0}

    def D(x, sigma):
        calls["n"] += 1
        sig = sigma.view(-1, 1, 1, 1).to(torch.float64)
        return (x.double() * s**2 / (s**2 + sig**2)).to(x.dtype)

    return D, calls


def run(name: str, steps: int, schedule: str, s: float, seed: int = 0) -> tuple[float, float]:
    """(error, model calls per step) of one sampler at `steps` steps."""
    model_sigmas = discrete_sigmas()
    sigmas = get_sigmas(schedule, model_sigmas, steps)
    noise = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    x = noise * math.sqrt(s**2 + float(sigmas[0]) ** 2)
    D, calls = gaussian_denoiser(s)
    out = SAMPLERS[name](D, x, sigmas, generator=torch.Generator().manual_seed(seed + 1))
    if name in STOCHASTIC:
        err = abs(float(out.double().std()) / s - 1)
    else:
        exact = noise.double() * s
        err = float((out.double() - exact).norm() / exact.norm())
    return err, calls["n"] / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedule", default="karras")
    ap.add_argument("--s", type=float, default=1.0, help="data std")
    ap.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    args = ap.parse_args()
    t0 = time.perf_counter()
    head = f"{'sampler':<20}{'A1111 name':<14}{'kind':<6}{'calls/step':>10}" + "".join(f"{n:>10}" for n in args.steps)
    print(f"schedule {args.schedule}, data std {args.s}; ODE: relative error vs exact; SDE: |std/s - 1| "
          "(4096 samples)")
    print(head)
    print("-" * len(head))
    for name in SAMPLERS:
        errs, cps = [], 0.0
        for n in args.steps:
            e, cps = run(name, n, args.schedule, args.s)
            errs.append(e)
        kind = "SDE" if name in STOCHASTIC else "ODE"
        print(f"{name:<20}{DISPLAY_NAMES[name]:<14}{kind:<6}{cps:>10.2f}" + "".join(f"{e:>10.2e}" for e in errs))
    print(f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
