"""Schedules: shape and order contract, the known formulas, diffusers' sigmas where it has the same schedule."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sd.denoiser import discrete_sigmas, t_to_sigma
from sd.schedules import SCHEDULES, beta_ppf, beta_sigmas, flow_sigmas, get_sigmas

MS = discrete_sigmas()  # (1000,) SD training sigmas


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("steps", [1, 7, 30])
def test_contract(name, steps):
    s = get_sigmas(name, MS, steps)
    assert s.dtype == torch.float32 and s.device.type == "cpu" and s.shape == (steps + 1,)
    assert float(s[-1]) == 0.0
    assert bool((s[1:] < s[:-1]).all()), s
    assert float(s[0]) <= float(MS[-1]) * (1 + 1e-6) and float(s[-2]) >= float(MS[0]) * (1 - 1e-6)


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
