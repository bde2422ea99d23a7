"""Our samplers against diffusers' schedulers, run the way a diffusers pipeline runs them.

One toy eps-prediction "network" `net(x_in, t)` (nonlinear in x_in, and depending on t through the
training sigma at t) drives both sides:
  - ours:      D = sd.denoiser.make_denoiser(net, "eps", train_sigmas), the sampler over D;
  - diffusers: the usual loop `eps = net(scheduler.scale_model_input(x, t), t); x = scheduler.step(eps, t, x)`.
Both start from the same latent (diffusers' VP-space schedulers DDIM/DDPM/DPMSolver get x / sqrt(1 + sigma0^2)),
use the same training sigmas (diffusers' own alphas_cumprod) and the same sigmas (asserted first), and the
stochastic ones the same CPU generator seed. The final samples agree within 1e-4.
"""
from __future__ import annotations

import math

import diffusers
import pytest
import torch

from sd.denoiser import discrete_sigmas, make_denoiser, sigma_to_t, t_to_sigma
from sd.samplers import (sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_euler, sample_euler_ancestral,
                         sample_heun, sample_lms, sample_uni_pc)
from sd.schedules import get_sigmas


BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
TOL = 1e-4


def train_sigmas_of(scheduler) -> torch.Tensor:
    """(1000,) increasing training sigmas from a diffusers scheduler's alphas_cumprod."""
    ac = scheduler.alphas_cumprod.to(torch.float64)
    return ((1 - ac) / ac).sqrt().to(torch.float32)


def make_net(train_sigmas: torch.Tensor):
    """Toy eps-prediction network: the exact eps of unit-variance Gaussian data plus a nonlinear term."""

    def net(x_in: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
        sig = t_to_sigma(t, train_sigmas).view(-1, 1, 1, 1)  # (B or 1, 1, 1, 1)
        x = x_in * (1 + sig**2).sqrt()
        t = t.view(-1, 1, 1, 1)
        return x * sig / (1 + sig**2) + 0.2 * torch.tanh(2 * x_in) * sig / (1 + sig) + 0.02 * torch.sin(t / 4)

    return net


def start_noise(seed: int = 0) -> torch.Tensor:
    return torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def run_diffusers(scheduler, net, x: torch.Tensor, **step_kwargs) -> torch.Tensor:
    """The diffusers pipeline loop."""
    for t in scheduler.timesteps:
        eps = net(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    return x


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def test_training_sigmas_match_diffusers():
    """Ours are computed in float64 then rounded; diffusers' in float32 (1 - abar cancels most at t = 0)."""
    s = train_sigmas_of(diffusers.EulerDiscreteScheduler(**BETAS))
    torch.testing.assert_close(discrete_sigmas(), s, rtol=2e-5, atol=0)


@pytest.mark.parametrize("schedule", ["karras", "beta"])
def test_euler_matches_euler_discrete(schedule):
    """EulerDiscreteScheduler given our sigmas directly (`set_timesteps(sigmas=...)`, fractional timesteps)."""
    sch = diffusers.EulerDiscreteScheduler(**BETAS)
    ts = train_sigmas_of(sch)
    sigmas = get_sigmas(schedule, ts, 12)
    sch.set_timesteps(sigmas=sigmas.tolist())
    net = make_net(ts)
    x = start_noise() * math.sqrt(1 + float(sigmas[0]) ** 2)
    ref = run_diffusers(sch, net, x)
    ours = sample_euler(make_denoiser(net, "eps", ts), x, sigmas)
    assert max_diff(ours, ref) < TOL


def test_heun_matches_heun_discrete():
    """HeunDiscreteScheduler(use_karras_sigmas=True): its de-duplicated sigmas are our karras schedule."""
    sch = diffusers.HeunDiscreteScheduler(**BETAS, use_karras_sigmas=True)
    sch.set_timesteps(10)
    ts = train_sigmas_of(sch)
    sigmas = get_sigmas("karras", ts, 10)
    torch.testing.assert_close(torch.unique_consecutive(sch.sigmas), sigmas, rtol=1e-6, atol=0)
    net = make_net(ts)
    x = start_noise() * math.sqrt(1 + float(sigmas[0]) ** 2)
    ref = run_diffusers(sch, net, x)
    ours = sample_heun(make_denoiser(net, "eps", ts), x, sigmas)
    assert max_diff(ours, ref) < TOL


def test_lms_matches_lms_discrete():
    """LMSDiscreteScheduler(use_karras_sigmas=True), order 4 (its default; it integrates with scipy)."""
    from diffusers import LMSDiscreteScheduler

    sch = LMSDiscreteScheduler(**BETAS, use_karras_sigmas=True)
    sch.set_timesteps(15)
    ts = train_sigmas_of(sch)
    sigmas = get_sigmas("karras", ts, 15)
    torch.testing.assert_close(sch.sigmas, sigmas, rtol=1e-6, atol=0)
    net = make_net(ts)
    x = start_noise() * math.sqrt(1 + float(sigmas[0]) ** 2)
    ref = run_diffusers(sch, net, x)
    ours = sample_lms(make_denoiser(net, "eps", ts), x, sigmas)
    assert max_diff(ours, ref) < TOL


def test_dpmpp_2m_matches_dpmsolver_multistep_up_to_timestep_rounding():
    """DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True,
    final_sigmas_type="zero"): VP-space sample, and it hands the network round(t(sigma)) while its update
    uses the unrounded karras sigma. Our engine passes the fractional t, so the results differ by more
    than the tolerance; with a denoiser that rounds t the same way, they agree within 1e-4."""
    sch = diffusers.DPMSolverMultistepScheduler(**BETAS, algorithm_type="dpmsolver++", solver_order=2,
                                                use_karras_sigmas=True, final_sigmas_type="zero")
    sch.set_timesteps(20)
    ts = train_sigmas_of(sch)
    sigmas = get_sigmas("karras", ts, 20)
    torch.testing.assert_close(sch.sigmas, sigmas, rtol=1e-6, atol=0)
    assert torch.equal(sch.timesteps.double(), sigma_to_t(sigmas[:-1], ts).double().round())  # the rounding
    net = make_net(ts)
    x = start_noise() * math.sqrt(1 + float(sigmas[0]) ** 2)
    ref = run_diffusers(sch, net, x / math.sqrt(1 + float(sigmas[0]) ** 2))  # VP space; ends at sigma 0

    ours_fractional = sample_dpmpp_2m(make_denoiser(net, "eps", ts), x, sigmas)

    def rounded(x, sigma):  # make_denoiser for eps, but with the timestep rounded like diffusers
        s = sigma.view(-1, 1, 1, 1)
        return x - s * net(x / (1 + s**2).sqrt(), sigma_to_t(sigma, ts).round())

    ours_rounded = sample_dpmpp_2m(rounded, x, sigmas)
    assert max_diff(ours_rounded, ref) < TOL
    assert max_diff(ours_fractional, ref) > 5 * TOL  # ~9e-4: the convention is the whole difference


def test_ddim_eta0_matches_ddim_scheduler():
    """DDIMScheduler(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=True, clip_sample=False):
    timesteps 901, 801, ..., 1 = our ddim_uniform schedule; VP-space sample."""
    sch = diffusers.DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=True, steps_offset=1,
                                  timestep_spacing="leading")
    sch.set_timesteps(10)
    ts = train_sigmas_of(sch)
    sigmas = get_sigmas("ddim_uniform", ts, 10)
    assert sch.timesteps.tolist() == list(range(901, 0, -100))
    torch.testing.assert_close(sigmas[:-1], ts[sch.timesteps], rtol=0, atol=0)
    net = make_net(ts)
    x = start_noise() * math.sqrt(1 + float(sigmas[0]) ** 2)
    ref = run_diffusers(sch, net, x / math.sqrt(1 + float(sigmas[0]) ** 2), eta=0.0)
    ours = sample_ddim(make_denoiser(net, "eps", ts), x, sigmas)
    assert max_diff(ours, ref) < TOL


def test_ddim_eta1_matches_ddim_scheduler_with_same_generator():
    sch = diffusers.DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=True, steps_offset=1,
                                  timestep_spacing="leading")
    sch.set_timesteps(10)
    ts = train_sigmas_of(sch)
    sigmas = get_sigmas("ddim_uniform", ts, 10)
    net = make_net(ts)
    x = start_noise() * math.sqrt(1 + float(sigmas[0]) ** 2)
    ref = run_diffusers(sch, net, x / math.sqrt(1 + float(sigmas[0]) ** 2), eta=1.0,
                        generator=torch.Generator().manual_seed(7))
    ours = sample_ddim(make_denoiser(net, "eps", ts), x, sigmas, eta=1.0, generator=torch.Generator().manual_seed(7))
    assert max_diff(ours, ref) < TOL


def test_euler_ancestral_matches_euler_ancestral_discrete():
    """EulerAncestralDiscreteScheduler (timestep_spacing "linspace"): at 28 steps its timesteps are the integers
    999, 962, ..., 0, so its sigmas are our "normal" schedule; same CPU generator seed for the step noise."""
    sch = diffusers.EulerAncestralDiscreteScheduler(**BETAS)
    sch.set_timesteps(28)
    ts = train_sigmas_of(sch)
    sigmas = get_sigmas("normal", ts, 28)
    torch.testing.assert_close(sch.sigmas, sigmas, rtol=1e-6, atol=0)
    net = make_net(ts)
    x = start_noise() * math.sqrt(1 + float(sigmas[0]) ** 2)
    ref = run_diffusers(sch, net, x, generator=torch.Generator().manual_seed(3))
    ours = sample_euler_ancestral(make_denoiser(net, "eps", ts), x, sigmas, generator=torch.Generator().manual_seed(3))
    assert max_diff(ours, ref) < TOL
    other = sample_euler_ancestral(make_denoiser(net, "eps", ts), x, sigmas, generator=torch.Generator().manual_seed(4))
    assert max_diff(other, ref) > 1e-2  # the noise matters: the agreement is not an accident


def test_ddpm_matches_ddpm_scheduler():
    """DDPMScheduler(timestep_spacing="leading", steps_offset=1, variance_type="fixed_small", clip_sample=False)
    at 20 steps: timesteps 951, ..., 1 = our ddim_uniform schedule; VP-space sample; same generator seed."""
    sch = diffusers.DDPMScheduler(**BETAS, clip_sample=False, variance_type="fixed_small", steps_offset=1,
                                  timestep_spacing="leading")
    sch.set_timesteps(20)
    ts = train_sigmas_of(sch)
    sigmas = get_sigmas("ddim_uniform", ts, 20)
    assert sch.timesteps.tolist() == list(range(951, 0, -50))
    net = make_net(ts)
    x = start_noise() * math.sqrt(1 + float(sigmas[0]) ** 2)
    ref = run_diffusers(sch, net, x / math.sqrt(1 + float(sigmas[0]) ** 2), generator=torch.Generator().manual_seed(5))
    ours = sample_ddpm(make_denoiser(net, "eps", ts), x, sigmas, generator=torch.Generator().manual_seed(5))
    assert max_diff(ours, ref) < TOL


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_uni_pc_matches_unipc_multistep(variant):
    """UniPCMultistepScheduler(solver_order=3, solver_type=variant, use_exponential_sigmas=True,
    final_sigmas_type="zero"), predictor + corrector; exponential sigmas keep the fractional timestep."""
    sch = diffusers.UniPCMultistepScheduler(**BETAS, solver_order=3, solver_type=variant, predict_x0=True,
                                            use_exponential_sigmas=True, final_sigmas_type="zero")
    sch.set_timesteps(12)
    ts = train_sigmas_of(sch)
    sigmas = get_sigmas("exponential", ts, 12)
    torch.testing.assert_close(sch.sigmas, sigmas, rtol=1e-6, atol=0)
    net = make_net(ts)
    x = start_noise() * math.sqrt(1 + float(sigmas[0]) ** 2)
    ref, steps = x / math.sqrt(1 + float(sigmas[0]) ** 2), []
    for i, t in enumerate(sch.timesteps):
        ref = sch.step(net(ref, t), t, ref).prev_sample  # VP space
        steps.append(ref * math.sqrt(1 + float(sigmas[i + 1]) ** 2))

    # This scheduler stores its timesteps as int64 (999.0 - 1e-13 becomes 998): the network sees them, as here.
    t_of = {float(s): t for s, t in zip(sigmas[:-1].tolist(), sch.timesteps.tolist())}

    def den(x, sigma):
        s = sigma.view(-1, 1, 1, 1)
        return x - s * net(x / (1 + s**2).sqrt(), t_of[float(sigma[0])])

    ours = []
    sample_uni_pc(den, x, sigmas, order=3, variant=variant, callback=lambda d: ours.append(d["x"]))
    # diffusers' bh1 turns the last step into nan (B(h) = -h = -inf times a zero correction), so the
    # samples are compared after every step but that one; bh2 is compared to the end.
    last = len(steps) - (1 if variant == "bh1" else 0)
    assert torch.isnan(steps[-1]).any() == (variant == "bh1")
    assert max(max_diff(a, b) for a, b in zip(ours[:last], steps[:last])) < TOL
