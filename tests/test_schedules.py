"""Schedules: shape and order contract, the known formulas, diffusers' sigmas where it has the same schedule."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sd.denoiser import discrete_sigmas, t_to_sigma
from sd.schedules import (SCHEDULE_DISPLAY_NAMES, SCHEDULES, beta_ppf, beta_sigmas, flow_schedule, flow_sigmas,
                          get_sigmas, polyexponential_sigmas, schedule_key)

MS = discrete_sigmas()  # (1000,) SD training sigmas


OWN_RANGE = ("align_your_steps", "kl_optimal")  # NVIDIA's table / ending in sigma_min: tested on their own below


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("steps", [1, 7, 30])
def test_contract(name, steps):
    s = get_sigmas(name, MS, steps)
    assert s.dtype == torch.float32 and s.device.type == "cpu" and s.shape == (steps + 1,)
    assert bool((s[1:] < s[:-1]).all()), s
    if name in OWN_RANGE:
        return
    assert float(s[-1]) == 0.0
    assert float(s[0]) <= float(MS[-1]) * (1 + 1e-6) and float(s[-2]) >= float(MS[0]) * (1 - 1e-6)


def test_every_a1111_label():
    """The "Schedule type" labels A1111 1.9+ writes (modules/sd_schedulers.py) all name a schedule here."""
    labels = ["Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal", "Align Your Steps",
              "Simple", "Normal", "DDIM", "Beta"]
    assert sorted(SCHEDULE_DISPLAY_NAMES.values()) == sorted(labels)
    assert [schedule_key(x) for x in labels] == ["uniform", "karras", "exponential", "polyexponential", "sgm_uniform",
                                                 "kl_optimal", "align_your_steps", "simple", "normal", "ddim_uniform",
                                                 "beta"]
    assert schedule_key("SGMUniform") == "sgm_uniform" and schedule_key("Automatic") == "automatic"
    assert schedule_key("Karras Exponential") is None
    with pytest.raises(ValueError, match="resolve it for the sampler"):
        get_sigmas("Automatic", MS, 10)


def test_uniform_is_k_diffusion_get_sigmas():
    """A1111 "Uniform" = k-diffusion DiscreteSchedule.get_sigmas: t_to_sigma(linspace(999, 0, n)), then 0."""
    s = get_sigmas("Uniform", MS, 10)
    torch.testing.assert_close(s[:-1], t_to_sigma(torch.linspace(999, 0, 10), MS), rtol=1e-6, atol=0)
    assert torch.equal(s, get_sigmas("normal", MS, 10)) and float(s[-1]) == 0.0


def test_polyexponential_formula():
    """k-diffusion get_sigmas_polyexponential: exp(log smin + (1 - i/(n-1))^rho (log smax - log smin)); A1111's rho 1
    is the exponential schedule."""
    smin, smax = float(MS[0]), float(MS[-1])
    s = get_sigmas("Polyexponential", MS, 5)
    expect = [math.exp(math.log(smin) + (1 - i / 4) * (math.log(smax) - math.log(smin))) for i in range(5)] + [0.0]
    torch.testing.assert_close(s, torch.tensor(expect), rtol=1e-6, atol=0)
    torch.testing.assert_close(s, get_sigmas("exponential", MS, 5), rtol=1e-6, atol=0)
    s2 = polyexponential_sigmas(MS, 5, rho=2.0)
    expect2 = [math.exp(math.log(smin) + (1 - i / 4) ** 2 * (math.log(smax) - math.log(smin))) for i in range(5)]
    torch.testing.assert_close(s2[:-1], torch.tensor(expect2), rtol=1e-6, atol=0)


def test_kl_optimal_formula():
    """A1111 kl_optimal: tan((1 - i/n) atan(smax) + (i/n) atan(smin)) for i = 0..n; the last value is sigma_min."""
    smin, smax = float(MS[0]), float(MS[-1])
    s = get_sigmas("KL Optimal", MS, 4)
    expect = [math.tan((1 - i / 4) * math.atan(smax) + i / 4 * math.atan(smin)) for i in range(5)]
    torch.testing.assert_close(s, torch.tensor(expect), rtol=1e-6, atol=0)
    assert s.shape == (5,) and math.isclose(float(s[0]), smax, rel_tol=1e-6) and math.isclose(float(s[-1]), smin,
                                                                                               rel_tol=1e-6)
    assert math.isclose(float(s[2]), math.tan((math.atan(smax) + math.atan(smin)) / 2), rel_tol=1e-6)  # 1.0787


SD1_AYS = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]   # NVIDIA's published
SDXL_AYS = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]  # 10-step levels


def _loglinear(table: list[float], n: int) -> list[float]:
    """The AYS howto's interpolation written out: position k/(n-1) along the reversed table, linear in log."""
    r = [math.log(v) for v in reversed(table)]
    out = []
    for k in range(n):
        x = k / (n - 1) * (len(table) - 1)
        j = min(int(x), len(table) - 2)
        out.append(math.exp(r[j] + (x - j) * (r[j + 1] - r[j])))
    return out[::-1]


def test_align_your_steps_tables():
    """11 steps: the published values and 0 (A1111 takes the table as is at n == 11); 10 / 20 / 30 steps: the
    log-linear interpolation of the table to n values, then 0; SDXL's table for families that declare it."""
    torch.testing.assert_close(get_sigmas("Align Your Steps", MS, 11), torch.tensor(SD1_AYS + [0.0]), rtol=0, atol=0)
    torch.testing.assert_close(get_sigmas("align_your_steps", MS, 11, ays_table="sdxl"), torch.tensor(SDXL_AYS + [0.0]),
                               rtol=0, atol=0)
    for n in (10, 20, 30):
        for name, table in (("sd1", SD1_AYS), ("sdxl", SDXL_AYS)):
            s = get_sigmas("Align Your Steps", MS, n, ays_table=name)
            torch.testing.assert_close(s, torch.tensor(_loglinear(table, n) + [0.0]), rtol=1e-6, atol=0)
            assert float(s[0]) == pytest.approx(14.615) and float(s[-2]) == pytest.approx(0.029)
    s20 = get_sigmas("Align Your Steps", MS, 20)
    # index 2 of 20 sits at 2/19 * 10 = 1.053 table positions: just past the 2nd level, linear in log
    assert float(s20[2]) == pytest.approx(math.exp(math.log(6.475) + (20 / 19 - 1) * math.log(3.861 / 6.475)), rel=1e-6)
    from sd.families import get_family
    assert get_family("sdxl-base").ays_table == "sdxl" and get_family("sd1").ays_table == "sd1"
    with pytest.raises(ValueError, match="flow model"):
        flow_schedule("Align Your Steps", 10)


def test_unknown_schedule_names_choices():
    with pytest.raises(ValueError, match="karras"):
        get_sigmas("karas", MS, 10)


def test_a1111_labels():
    assert torch.equal(get_sigmas("Karras", MS, 10), get_sigmas("karras", MS, 10))
    assert torch.equal(get_sigmas("SGM Uniform", MS, 10), get_sigmas("sgm_uniform", MS, 10))
    assert torch.equal(get_sigmas("DDIM", MS, 10), get_sigmas("ddim_uniform", MS, 10))


def test_normal_is_uniform_in_timestep():
    s = get_sigmas("normal", MS, 10)  # timesteps 999, 888, ..., 0: integers, so exact training sigmas
    torch.testing.assert_close(s[:-1], MS[list(range(999, -1, -111))], rtol=1e-6, atol=0)  # exp(log) rounding
    s = get_sigmas("normal", MS, 4)  # 999, 666, 333, 0
    torch.testing.assert_close(s[:-1], MS[[999, 666, 333, 0]], rtol=1e-6, atol=0)


def test_karras_formula():
    s = get_sigmas("karras", MS, 5)
    smin, smax = float(MS[0]), float(MS[-1])
    expect = [(smax ** (1 / 7) + i / 4 * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7 for i in range(5)] + [0.0]
    torch.testing.assert_close(s, torch.tensor(expect), rtol=1e-6, atol=0)
    assert math.isclose(float(s[0]), 14.6146, rel_tol=1e-4) and math.isclose(float(s[-2]), 0.029167, rel_tol=1e-3)


def test_exponential_is_uniform_in_log_sigma():
    s = get_sigmas("exponential", MS, 6)[:-1].double().log()
    d = s[1:] - s[:-1]
    torch.testing.assert_close(d, d.mean().expand(5), rtol=1e-5, atol=0)
    assert math.isclose(float(s[0].exp()), float(MS[-1]), rel_tol=1e-6)


def test_sgm_uniform_drops_the_last_timestep():
    s = get_sigmas("sgm_uniform", MS, 10)  # timesteps linspace(999, 0, 11)[:-1] = 999, 899.1, ..., 99.9
    t = torch.linspace(999, 0, 11)[:-1]
    torch.testing.assert_close(s[:-1], t_to_sigma(t, MS), rtol=1e-6, atol=0)
    assert float(s[-2]) > float(MS[99])


def test_simple_takes_every_kth_training_sigma():
    s = get_sigmas("simple", MS, 4)
    torch.testing.assert_close(s[:-1], MS[[999, 749, 499, 249]], rtol=0, atol=0)


def test_ddim_uniform_timesteps():
    s = get_sigmas("ddim_uniform", MS, 10)
    torch.testing.assert_close(s[:-1], MS[list(range(901, 0, -100))], rtol=0, atol=0)
    assert get_sigmas("ddim_uniform", MS, 7).shape == (8,)  # exactly `steps`, though 7 does not divide 1000


def test_beta_ppf_against_closed_forms():
    q = np.linspace(0, 1, 101)
    np.testing.assert_allclose(beta_ppf(q, 1.0, 1.0), q, atol=1e-9)                      # uniform
    np.testing.assert_allclose(beta_ppf(q, 2.0, 1.0), np.sqrt(q), atol=1e-6)             # CDF x^2
    np.testing.assert_allclose(beta_ppf(q, 0.5, 0.5), np.sin(np.pi * q / 2) ** 2, atol=1e-9)  # arcsine
    p = beta_ppf(q, 0.6, 0.6)
    np.testing.assert_allclose(p + p[::-1], 1.0, atol=1e-7)  # symmetric
    assert abs(beta_ppf([0.5], 0.6, 0.6)[0] - 0.5) < 1e-8


def test_beta_schedule():
    # Beta(1, 1) quantiles are uniform: the schedule is then exactly sgm_uniform
    torch.testing.assert_close(beta_sigmas(MS, 10, 1.0, 1.0), get_sigmas("sgm_uniform", MS, 10), rtol=1e-5, atol=0)
    s = get_sigmas("beta", MS, 20)
    assert math.isclose(float(s[0]), float(MS[-1]), rel_tol=1e-6)
    # the U-shaped Beta(0.6, 0.6) puts more steps at both ends than in the middle
    t = torch.linspace(999, 0, 21)[:-1]
    gaps = (s[:-2].log() - s[1:-1].log())
    assert float(gaps[0]) < float((t_to_sigma(t[:1], MS).log() - t_to_sigma(t[1:2], MS).log())[0])


def test_flow_sigmas():
    """The SD3 reference schedule: t uniform from 1 to sigma_min = flow_sigma(0.001), through flow_sigma."""
    s = flow_sigmas(4, shift=3.0)
    smin = 3 * 0.001 / (1 + 2 * 0.001)
    t = torch.tensor([1.0, 1 - (1 - smin) / 3, 1 - 2 * (1 - smin) / 3, smin], dtype=torch.float64)
    expect = [3 * v / (1 + 2 * v) for v in t.tolist()] + [0.0]
    torch.testing.assert_close(s, torch.tensor(expect, dtype=torch.float32), rtol=1e-6, atol=0)
    assert float(s[0]) == 1.0 and float(s[-1]) == 0.0 and s.dtype == torch.float32
    assert math.isclose(float(s[-2]), 0.008923, rel_tol=1e-3)
    torch.testing.assert_close(flow_sigmas(4, shift=1.0)[:-1], torch.tensor([1.0, 0.667, 0.334, 0.001]),
                               rtol=1e-6, atol=0)  # no shift: linear in t
    assert float(flow_sigmas(10, 3.0)[5]) > float(flow_sigmas(10, 1.0)[5])  # shift > 1 keeps more noise
