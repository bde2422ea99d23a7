"""SD3 text-tower memory (issue 16 item 8), CPU, a tiny bundled SD3 file: the CLIP-L / CLIP-G / T5 weights are not
in memory while the MMDiT samples (sd.text_encoders.Resident), one tower at a time while the prompts are encoded,
and the result is bit-identical to keeping them loaded (`TextSources(keep=True)`, `--keep-text-encoders`) and to T5
on its own device (`--t5-device cpu`); both flags on the CLI and as app flags (the model cache's default).
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import sd.text_encoders as te
from sd.__main__ import main
from sd.pipeline import GenerateParams, ModelCache, generate
from sd.text_encoders import TextSources, resident

from .tiny_sd3 import write_tiny_sd3, write_tiny_spiece

P = GenerateParams(prompt="a red cat on the moon", negative_prompt="blurry", width=32, height=32, steps=3, cfg=4.5,
                   seed=7)


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    root = tmp_path_factory.mktemp("mem")
    path = write_tiny_sd3("sd3_medium", root / "sd3_medium_incl_clips_t5xxlfp16.safetensors")
    write_tiny_spiece(root / "spiece.model")
    return path


def _bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@torch.no_grad()
def test_towers_are_not_resident_while_sampling_and_the_result_is_bit_identical(bundled, monkeypatch) -> None:
    torch.set_num_threads(1)
    cache = ModelCache()
    free = cache.get(bundled)                                   # the default: towers dropped after encoding
    kept = cache.get(bundled, sources=TextSources(keep=True))   # --keep-text-encoders: today's behaviour
    assert free is not kept and len(cache.loaded()) == 2
    assert resident(free.parts.text_encoders) == [False, False, False]   # checked on the meta device at load
    assert resident(kept.parts.text_encoders) == [True, True, True]
    net_bytes = _bytes(free.parts.unet) + _bytes(free.parts.vae)
    assert free.nbytes() == net_bytes and kept.nbytes() > net_bytes + _bytes(kept.parts.text_encoders[2].model) - 1

    # while encoding: one tower loaded at a time, in the order CLIP-L, CLIP-G, T5
    seen = []
    real_load = te.load_tower

    def spy(tower):
        seen.append(resident(free.parts.text_encoders))
        return real_load(tower)

    monkeypatch.setattr(te, "load_tower", spy)
    during = []
    res = generate(free, P, callback=lambda info: during.append((resident(free.parts.text_encoders), free.nbytes())))
    monkeypatch.setattr(te, "load_tower", real_load)
    assert seen == [[False, False, False]] * 3                   # each tower is loaded only inside its own block
    assert len(during) == 3 and all(r == ([False, False, False], net_bytes) for r in during)
    assert resident(free.parts.text_encoders) == [False, False, False]

    ref = generate(kept, P)
    assert resident(kept.parts.text_encoders) == [True, True, True]
    assert res.latents.abs().max() > 0.5 and torch.equal(res.latents, ref.latents)
    assert [im.tobytes() for im in res.images] == [im.tobytes() for im in ref.images]
    # a second request reloads the weights from the file: still the same numbers; T5 off needs no T5 load
    again = generate(free, replace(P, seed=8))
    assert torch.equal(again.latents, generate(kept, replace(P, seed=8)).latents)
    no_t5 = replace(P, inputs={"use_t5": False})
    assert torch.equal(generate(free, no_t5).latents, generate(kept, no_t5).latents)

    # --t5-device cpu (here the MMDiT's device too): the same model, the same numbers, T5's weights on the CPU
    on_cpu = cache.get(bundled, sources=TextSources(keep=True, t5_device="cpu"))
    assert on_cpu.parts.text_encoders[2].model.shared.weight.device == torch.device("cpu")
    assert torch.equal(generate(on_cpu, P).latents, ref.latents)


def test_cli_flags_reach_the_loader(bundled, tmp_path, capsys, monkeypatch) -> None:
    """--keep-text-encoders and --t5-device go into TextSources (part of the cache key); the latents equal the
    default run's bit for bit."""
    got = {}
    real = te.load_sd3_text

    def spy(ckpt, context_dim, adm, sources=None, device="cpu", dtype=torch.float32):
        got["sources"] = sources
        return real(ckpt, context_dim, adm, sources, device, dtype)

    monkeypatch.setattr(te, "load_sd3_text", spy)
    base = ["generate", "--checkpoint", str(bundled), "--prompt", "a red cat", "--width", "32", "--height", "32",
            "--steps", "2"]
    lat = []
    for i, extra in enumerate(([], ["--keep-text-encoders", "--t5-device", "cpu"])):
        z = tmp_path / f"z{i}.safetensors"
        assert main(base + extra + ["--out", str(tmp_path / f"o{i}.png"), "--save-latent", str(z)]) == 0
        from safetensors.torch import load_file

        lat.append(load_file(str(z))["latent"])
        want = TextSources() if not extra else TextSources(keep=True, t5_device="cpu")
        assert got["sources"] == want
    assert torch.equal(lat[0], lat[1])
    capsys.readouterr()
    assert main(base + ["--t5-device", "tpu9", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --t5-device tpu9: not a torch device (cpu, cuda, cuda:1, mps)"]


def test_app_flags_become_the_cache_default(bundled, capsys) -> None:
    """python app.py --t5-device cpu --keep-text-encoders: the model cache's default TextSources (every tab's
    checkpoints load with them); a bad device is one line, exit 2, before anything starts."""
    import app
    import app_sd3

    args = app.parse_args(["--t5-device", "cpu", "--keep-text-encoders"])
    want = TextSources(keep=True, t5_device="cpu")
    assert app_sd3.text_sources(args) == want and app_sd3.text_sources(app.parse_args([])) == TextSources()
    cache = ModelCache(sources=want)
    model = cache.get(bundled)
    assert resident(model.parts.text_encoders) == [True, True, True]
    assert cache.get(bundled, sources=want) is model and cache.get(bundled, sources=TextSources()) is not model
    assert app.main(["--t5-device", "tpu9"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --t5-device tpu9: not a torch device (cpu, cuda, "
                                                            "cuda:1, mps)"]
