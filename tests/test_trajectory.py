"""The trajectory recorder (sd.trajectory) on tiny SD 1.x (eps) and SD 2 (v) checkpoints, and `--trajectory DIR`.

Checked: recording changes nothing (bit-identical latents and pixels); one frame per step; the last predicted x0 is
the final latent for Euler ending at sigma 0; the derived noise (x_t - x0) / sigma equals the network's own eps
(eps model) and sigma_t x_t + alpha_t v (v model, Salimans & Ho 2022 eq. for eps from v), each computed here from the
UNet's output with the CFG combination written out; an ancestral run's frames equal Euler's at step 0 and differ
after it; the CLI writes one PNG per step per strip and the sigmas it walked; every family has preview factors for
its latent channels.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from sd.denoiser import sigma_to_t
from sd.families import FAMILIES
from sd.pipeline import GenerateParams, generate, load_model, request_inputs, sampling_sigmas, seed_generator
from sd.trajectory import STRIPS, Recorder

P = GenerateParams(prompt="a red circle", negative_prompt="blurry", width=64, height=64, steps=4, cfg=5.0, seed=7)


@pytest.fixture(scope="module")
def sd1(tiny_files):
    return load_model(tiny_files("sd1"))


@pytest.fixture(scope="module")
def sd2v(tiny_files):
    return load_model(tiny_files("sd2_768_v"), prediction="v")


def recorded(model, p):
    rec = Recorder(model.spec.prediction, model.spec.family)
    return generate(model, p, callback=rec), rec.trajectory


def test_recording_is_bit_identical(sd1):
    p = replace(P, sampler="euler_ancestral", schedule="karras")
    plain = generate(sd1, p)
    res, traj = recorded(sd1, p)
    assert torch.equal(plain.latents, res.latents)
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(res.images[0]))
    assert len(traj) == p.steps


def test_one_frame_per_step_and_the_last_x0_is_the_final_latent(sd1):
    p = replace(P, sampler="euler", steps=5)
    res, traj = recorded(sd1, p)
    assert len(traj) == 5 and traj.sigma_next[-1] == 0.0
    assert traj.sigma == sampling_sigmas(sd1, replace(p, inputs=request_inputs(sd1.spec, p)))[:-1].tolist()
    for name in STRIPS:
        frames = traj.strip(name)
        assert len(frames) == 5 and frames[0].size == (8, 8)   # the 64 px image's 8x8 latent
    # Euler's last step to sigma 0: x + (x - D) / sigma * (0 - sigma) = D, up to float32 rounding
    assert float((traj.x0[-1] - res.latents[:1]).abs().max()) < 1e-6
    # x_t of step i > 0 is what step i - 1 left: x_t(1) = x_t(0) + (x_t(0) - x0(0)) / sigma_0 * (sigma_1 - sigma_0)
    s0, s1 = traj.sigma[0], traj.sigma[1]
    assert torch.allclose(traj.x[1], traj.x[0] + (traj.x[0] - traj.x0[0]) / s0 * (s1 - s0), atol=1e-5)


def network_output(model, p, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The UNet's own output F at (x, sigma) with CFG on it: F_u + cfg (F_c - F_u), computed from the conditioner."""
    req = replace(p, inputs=request_inputs(model.spec, p))
    cond, uncond = model.family.condition(model.parts, model.spec, req, seed_generator(p.seed))
    s = torch.tensor([sigma])
    c_in = 1 / math.sqrt(sigma ** 2 + 1)
    t = sigma_to_t(s, model.sigmas)
    with torch.no_grad():
        f_c = model.parts.unet(x * c_in, t, context=cond["crossattn"])
        f_u = model.parts.unet(x * c_in, t, context=uncond["crossattn"])
    return f_u + p.cfg * (f_c - f_u)


@pytest.mark.parametrize("step", [0, 2])
def test_eps_model_noise_is_the_networks_eps(sd1, step):
    p = replace(P, sampler="euler")
    _, traj = recorded(sd1, p)
    eps = network_output(sd1, p, traj.x[step], traj.sigma[step])        # (1, 4, 8, 8)
    assert float(eps.abs().mean()) > 0.01
    assert float((traj.noise(step) - eps).abs().max()) < 5e-5     # measured 1.0e-6 (step 0), 1.2e-5 (step 2)


def test_v_model_noise_follows_from_v(sd2v):
    p = replace(P, sampler="euler", steps=3)
    _, traj = recorded(sd2v, p)
    assert traj.prediction == "v"
    for step in (0, 1):
        sigma = traj.sigma[step]
        v = network_output(sd2v, p, traj.x[step], sigma)
        alpha, sig_vp = 1 / math.sqrt(sigma ** 2 + 1), sigma / math.sqrt(sigma ** 2 + 1)   # VP alpha_t, sigma_t
        x_vp = traj.x[step] * alpha                                                      # DDPM's x_t
        eps = sig_vp * x_vp + alpha * v                                                  # Salimans & Ho 2022
        assert float((traj.noise(step) - eps).abs().max()) < 5e-6  # measured 2.4e-7, 4.8e-7
        assert torch.allclose(traj.shown_x(step), x_vp)   # the x_t strip shows x c_in = DDPM's x_t


def test_ancestral_frames_differ_from_euler_after_the_first_step(sd1):
    _, euler = recorded(sd1, replace(P, sampler="euler"))
    _, anc = recorded(sd1, replace(P, sampler="euler_ancestral"))
    assert torch.equal(euler.x[0], anc.x[0]) and torch.equal(euler.x0[0], anc.x0[0])  # same start, same D
    for i in range(1, P.steps):
        assert float((euler.x[i] - anc.x[i]).abs().max()) > 1e-2
        assert float((euler.x0[i] - anc.x0[i]).abs().max()) > 1e-3


def test_cli_trajectory_folder(tiny_files, sd1, tmp_path):
    from sd.__main__ import main

    out = tmp_path / "traj"
    rc = main(["generate", "--checkpoint", str(tiny_files("sd1")), "--prompt", "a cat", "--steps", "3",
               "--width", "64", "--height", "64", "--sampler", "euler", "--schedule", "karras", "--seed", "3",
               "--out", str(tmp_path / "img.png"), "--trajectory", str(out)])
    assert rc == 0
    data = json.loads((out / "trajectory.json").read_text())
    model = sd1
    p = replace(P, steps=3, schedule="karras", sampler="euler")
    want = sampling_sigmas(model, replace(p, inputs=request_inputs(model.spec, p))).tolist()
    assert [s["sigma"] for s in data["steps"]] == want[:-1]
    assert [s["sigma_next"] for s in data["steps"]] == want[1:]
    assert data["prediction"] == "eps" and data["formula"] == "x0 = x - sigma eps"
    for name in STRIPS:
        files = sorted((out / name).glob("*.png"))
        assert [f.name for f in files] == ["step-000.png", "step-001.png", "step-002.png"]
        assert Image.open(files[0]).size == (64, 64)


def test_every_family_has_preview_factors_for_its_latent():
    for fam in FAMILIES:
        factors, bias = fam.preview
        assert len(factors) == fam.latent.channels and all(len(r) == 3 for r in factors), fam.name
        assert len(bias) == 3, fam.name


def test_flow_model_noise_is_the_mmdits_velocity(tmp_path):
    from sd.mmdit import mmdit_net

    from .tiny_sd3 import write_tiny_sd3, write_tiny_spiece

    path = write_tiny_sd3("sd3_medium", tmp_path / "sd3_medium_incl_clips_t5xxlfp16.safetensors")
    write_tiny_spiece(tmp_path / "spiece.model")
    model = load_model(path)
    p = replace(P, steps=3, sampler="euler", width=32, height=32)
    res, traj = recorded(model, p)
    assert traj.prediction == "flow" and traj.sigma[0] == 1.0 and "velocity" in traj.label("noise")
    assert float((traj.x0[-1] - res.latents[:1]).abs().max()) < 1e-6
    req = replace(p, inputs=request_inputs(model.spec, p))
    cond, uncond = model.family.condition(model.parts, model.spec, req, seed_generator(p.seed))
    net = mmdit_net(model.parts.unet)
    for step in (0, 1):
        x, sigma = traj.x[step], traj.sigma[step]
        t = torch.tensor([1000 * sigma])                                   # flow: t = 1000 sigma, c_in = 1
        with torch.no_grad():
            f_c, f_u = net(x, t, **cond), net(x, t, **uncond)
        v = f_u + p.cfg * (f_c - f_u)                                      # the MMDiT predicts v = noise - x0
        assert float(v.abs().mean()) > 0.01
        assert float((traj.noise(step) - v).abs().max()) < 5e-5
        assert torch.equal(traj.shown_x(step), x)                          # flow: x_t shown as it is


def test_refiner_hand_off_is_recorded_across_both_models(tiny_files):
    from sd.refiner import generate_with_refiner

    base, refiner = load_model(tiny_files("sdxl_base")), load_model(tiny_files("sdxl_refiner"))
    p = replace(P, steps=2, sampler="euler")
    plain = generate_with_refiner(base, refiner, p, 0.5)
    rec = Recorder(base.spec.prediction, base.spec.family)
    res = generate_with_refiner(base, refiner, p, 0.5, callback=rec)
    t = rec.trajectory
    assert torch.equal(plain.latents, res.latents)
    assert t.models == ["base", "refiner"] and all(x is not None for x in t.x)
    # the refiner's first x_t is the base's last state: x_t(1) = x_t(0) + (x_t(0) - x0(0)) / s0 * (s1 - s0)
    s0, s1 = t.sigma[0], t.sigma[1]
    assert torch.allclose(t.x[1], t.x[0] + (t.x[0] - t.x0[0]) / s0 * (s1 - s0), atol=1e-5)
    assert float((t.x0[-1] - res.latents[:1]).abs().max()) < 1e-6
