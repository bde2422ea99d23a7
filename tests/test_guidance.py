"""Classifier-free guidance wrapper: one batched call, skips, rescale, sigma interval, long prompts."""
from __future__ import annotations

import pytest
import torch

from sd.guidance import cfg_denoiser, rescale_guidance


def toy_denoise(calls: list):
    """denoise(x, sigma, context, y) depending nonlinearly on every input; records each call's batch size."""

    def denoise(x, sigma, context, y=None, flag=None):
        calls.append(x.shape[0])
        assert x.shape[0] == sigma.shape[0] == context.shape[0]
        c = context.mean(dim=(1, 2)).view(-1, 1, 1, 1)  # (B,1,1,1)
        out = torch.tanh(x) * (1 + c) + 0.1 * sigma.view(-1, 1, 1, 1) * c**2
        if y is not None:
            out = out + y[:, :1].view(-1, 1, 1, 1)
        return out

    return denoise


def rand(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


X = rand(2, 4, 8, 8, seed=1)
SIG = torch.tensor([3.0, 3.0])
COND = {"context": rand(2, 77, 16, seed=2), "y": rand(2, 32, seed=3)}
UNCOND = {"context": rand(2, 77, 16, seed=4), "y": rand(2, 32, seed=5)}


def reference(scale):
    calls = []
    d = toy_denoise(calls)
    c, u = d(X, SIG, **COND), d(X, SIG, **UNCOND)
    return u + scale * (c - u), c, u


def test_one_batched_call_equals_the_formula():
    calls = []
    out = cfg_denoiser(toy_denoise(calls), COND, UNCOND, 7.5)(X, SIG)
    assert calls == [4]  # cond and uncond in one call of 2B
    expect, c, u = reference(7.5)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    assert float((out - c).abs().max()) > 0.1


@pytest.mark.parametrize("scale,uncond", [(1.0, UNCOND), (7.0, None)])
def test_cond_only_when_scale_1_or_no_uncond(scale, uncond):
    calls = []
    out = cfg_denoiser(toy_denoise(calls), COND, uncond, scale)(X, SIG)
    assert calls == [2]
    torch.testing.assert_close(out, reference(1.0)[1])


def test_different_context_lengths_use_two_calls():
    """A 154-token prompt against a 77-token negative: not padded (that changes the result), two calls."""
    cond = {"context": rand(2, 154, 16, seed=6), "y": COND["y"]}
    calls = []
    out = cfg_denoiser(toy_denoise(calls), cond, UNCOND, 5.0)(X, SIG)
    assert calls == [2, 2]
    d = toy_denoise([])
    c, u = d(X, SIG, **cond), d(X, SIG, **UNCOND)
    torch.testing.assert_close(out, u + 5.0 * (c - u))


def test_batch_one_conditions_expand_and_scalar_sigma():
    calls = []
    cond = {k: v[:1] for k, v in COND.items()}
    uncond = {k: v[:1] for k, v in UNCOND.items()}
    out = cfg_denoiser(toy_denoise(calls), cond, uncond, 4.0)(X, torch.tensor(3.0))
    assert calls == [4]
    d = toy_denoise([])
    full_c = {k: v[:1].expand(2, *v.shape[1:]) for k, v in COND.items()}
    full_u = {k: v[:1].expand(2, *v.shape[1:]) for k, v in UNCOND.items()}
    c, u = d(X, SIG, **full_c), d(X, SIG, **full_u)
    torch.testing.assert_close(out, u + 4.0 * (c - u))


def test_non_tensor_values_pass_through():
    calls = []
    out = cfg_denoiser(toy_denoise(calls), dict(COND, flag="x"), dict(UNCOND, flag="x"), 3.0)(X, SIG)
    assert calls == [4]
    torch.testing.assert_close(out, reference(3.0)[0], rtol=1e-5, atol=1e-5)


def test_rescale_formula():
    """Lin et al. 2023 eq. 15-16: x_rescaled = x_cfg * std(cond)/std(x_cfg); out = phi x_rescaled + (1-phi) x_cfg."""
    expect, c, _ = reference(9.0)
    out0 = cfg_denoiser(toy_denoise([]), COND, UNCOND, 9.0, rescale=0.0)(X, SIG)
    torch.testing.assert_close(out0, expect, rtol=1e-5, atol=1e-5)
    out1 = cfg_denoiser(toy_denoise([]), COND, UNCOND, 9.0, rescale=1.0)(X, SIG)
    torch.testing.assert_close(out1.std(dim=(1, 2, 3)), c.std(dim=(1, 2, 3)), rtol=1e-5, atol=1e-6)
    out7 = cfg_denoiser(toy_denoise([]), COND, UNCOND, 9.0, rescale=0.7)(X, SIG)
    factor = c.std(dim=(1, 2, 3), keepdim=True) / expect.std(dim=(1, 2, 3), keepdim=True)  # per sample
    torch.testing.assert_close(out7, 0.7 * expect * factor + 0.3 * expect, rtol=1e-5, atol=1e-5)
    assert float((factor - 1).abs().min()) > 0.05  # the rescale does something here
    torch.testing.assert_close(rescale_guidance(expect, c, 0.7), out7, rtol=1e-5, atol=1e-5)


def test_sigma_interval():
    expect, c, _ = reference(6.0)
    calls = []
    g = cfg_denoiser(toy_denoise(calls), COND, UNCOND, 6.0, sigma_interval=(0.5, 5.0))
    torch.testing.assert_close(g(X, SIG), expect, rtol=1e-5, atol=1e-5)  # sigma 3 inside: guided
    assert calls == [4]
    calls.clear()
    out = g(X, torch.tensor([9.0, 9.0]))  # outside: conditional only, no unconditional call
    assert calls == [2]
    torch.testing.assert_close(out, toy_denoise([])(X, torch.tensor([9.0, 9.0]), **COND))
    mixed = g(X, torch.tensor([3.0, 9.0]))  # per sample
    d = toy_denoise([])
    s = torch.tensor([3.0, 9.0])
    c2, u2 = d(X, s, **COND), d(X, s, **UNCOND)
    torch.testing.assert_close(mixed[0], (u2 + 6.0 * (c2 - u2))[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], c2[1])
