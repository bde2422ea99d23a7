"""Error against steps for every sampler on an analytic problem: a table to choose a sampler from.

The problem (exactly solvable): data x0 ~ N(0, s^2) per element, so the exact denoiser is
`D(x, sigma) = x * s^2 / (s^2 + sigma^2)` and the probability-flow ODE maps the starting latent
`x_T = noise * sqrt(s^2 + sigma_max^2)` to `noise * s` at sigma 0.

- ODE (deterministic) samplers: relative L2 error of the result against that exact ODE solution.
- SDE (stochastic, default eta) samplers: |std(result)/s - 1| over 16384 samples (sampling noise ~0.6%),
  i.e. how far the sampled distribution's spread is from the data's. LCM is given the problem's exact
  consistency function (what an LCM model predicts) instead of D.
- Flow table (SD3, `--flow`): rectified flow x = (1 - sigma) x0 + sigma n on `flow_sigmas(steps, 3.0)`,
  run with `sample(..., flow=True)`.

Errors near 4e-4 on the SD schedules are a floor, not the solver: every sampler ends with one denoise
from sigma_min = 0.029 to 0 (x = D), which is off from the exact ODE end point by sigma_min^2 / (2 s^2).

Run: `python bench/samplers.py [--schedule karras normal ...] [--flow] [--s 1.0] [--steps 5 10 20 50 100]`
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
from sd.samplers import DISPLAY_NAMES, SAMPLERS, STOCHASTIC, sample  # noqa: E402
from sd.schedules import flow_sigmas, get_sigmas  # noqa: E402


def counting(fn):
    calls = {"n": 0}

    def D(x, sigma):
        calls["n"] += 1
        return fn(x, sigma.view(-1, 1, 1, 1).to(torch.float64)).to(x.dtype)

    return D, calls


def run(name: str, steps: int, schedule: str, s: float, seed: int = 0) -> tuple[float, float]:
    """(error, model calls per step) of one sampler at `steps` steps."""
    stochastic = name in STOCHASTIC
    shape = (4, 4, 32, 32) if stochastic else (1, 4, 32, 32)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    if schedule == "flow":
        sigmas = flow_sigmas(steps, 3.0)
        x = noise
        if name == "lcm":
            D, calls = counting(lambda x, g: x.double() * s / ((1 - g) ** 2 * s**2 + g**2).sqrt())
        else:
            D, calls = counting(lambda x, g: x.double() * (1 - g) * s**2 / ((1 - g) ** 2 * s**2 + g**2))
    else:
        sigmas = get_sigmas(schedule, discrete_sigmas(), steps)
        x = noise * math.sqrt(s**2 + float(sigmas[0]) ** 2)
        if name == "lcm":
            D, calls = counting(lambda x, g: x.double() * s / (s**2 + g**2).sqrt())
        else:
            D, calls = counting(lambda x, g: x.double() * s**2 / (s**2 + g**2))
    out = sample(name, D, x, sigmas, generator=torch.Generator().manual_seed(seed + 1), flow=schedule == "flow")
    if stochastic:
        err = abs(float(out.double().std()) / s - 1)
    else:
        exact = noise.double() * s
        err = float((out.double() - exact).norm() / exact.norm())
    return err, calls["n"] / steps


def table(schedule: str, s: float, steps: list[int]) -> None:
    names = list(SAMPLERS)
    title = "flow_sigmas(shift 3), rectified flow (SD3)" if schedule == "flow" else f"schedule {schedule!r}"
    print(f"\n{title}, data std {s}.  ODE: relative error vs the exact solution;  SDE: |std/s - 1|")
    head = f"{'sampler':<20}{'A1111 name':<14}{'kind':<6}{'calls/step':>10}" + "".join(f"{n:>10}" for n in steps)
    print(head)
    print("-" * len(head))
    for name in names:
        errs, cps = [], 0.0
        for n in steps:
            e, cps = run(name, n, schedule, s)
            errs.append(e)
        kind = "SDE" if name in STOCHASTIC else "ODE"
        print(f"{name:<20}{DISPLAY_NAMES[name]:<14}{kind:<6}{cps:>10.2f}" + "".join(f"{e:>10.2e}" for e in errs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedule", nargs="+", default=["karras"])
    ap.add_argument("--flow", action="store_true", help="also the SD3 flow table")
    ap.add_argument("--s", type=float, default=1.0, help="data std")
    ap.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    args = ap.parse_args()
    t0 = time.perf_counter()
    for schedule in args.schedule + (["flow"] if args.flow else []):
        table(schedule, args.s, args.steps)
    print(f"\n({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
