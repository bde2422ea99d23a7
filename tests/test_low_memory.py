"""Low-memory mode (`--low-memory`, issue 14): nothing stays loaded between uses; the text towers, the UNet and the
VAE are each read from the file for their use (their own mmap) and dropped after (sd.text_encoders.Resident), the
UNet before the decode starts; the decode runs in tiles.

The UNet runs the CFG pair one image at a time (`one_by_one`: half the activations), which changes float32
rounding only: on tiny SD 1.5 and SDXL files the latents equal the normal mode's within 1e-4 (values up to ~40;
measured 1.9e-5 and 3.4e-5) and the 8-bit images within 1 (measured 0 and 1); at 64x64 the latent is one decode
tile, where the tiled decode is exactly `vae.decode`. `one_by_one` itself equals per-image calls bit for bit. The
parts hold no weights after a run, a second run reloads them (bit-identical to the first), and the file's pages read
for a tower are unmapped once the tower is dropped.
"""
from __future__ import annotations

import numpy as np
import pytest
from pathlib import Path
import torch

from sd.pipeline import GenerateParams, ModelCache, generate, load_model, loaded, one_by_one
from sd.text_encoders import resident


def _params() -> GenerateParams:
    return GenerateParams(prompt="a red cube", negative_prompt="blurry", width=64, height=64, steps=2, cfg=5.0,
                          seed=3, sampler="euler", batch_size=1)


def _close(a, b) -> None:
    """Low-memory against normal: float32 rounding of the split CFG batch only."""
    assert (a.latents - b.latents).abs().max().item() <= 1e-4
    for x, y in zip(a.images, b.images):
        assert np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16)).max() <= 1


def _mappings(path) -> int:
    """How many regions of this process map `path` (Linux /proc/self/maps)."""
    name = str(path.resolve())
    with open("/proc/self/maps") as f:
        return sum(line.rstrip().endswith(name) for line in f)


@pytest.mark.parametrize("layout", ["sd1", "sdxl_base"])
def test_low_memory_run_equals_the_normal_run(tiny_files, layout) -> None:
    path = tiny_files(layout)
    normal, low = load_model(path), load_model(path, low_memory=True)
    towers = [*low.parts.text_encoders, low.parts.vae, low.parts.unet]
    assert resident(towers) == [False] * len(towers)          # checked on the meta device at load, nothing read
    assert low.nbytes() == 0 < normal.nbytes()
    a = generate(normal, _params())
    b = generate(low, _params())
    _close(a, b)
    assert resident(towers) == [False] * len(towers)          # dropped again after the run
    c = generate(low, _params())                                # reloaded from the file for the second run
    assert torch.equal(b.latents, c.latents)


def test_one_by_one_is_the_per_image_call() -> None:
    calls = []

    def net(x, t, crossattn=None, vector=None, concat=None):   # (B, C, h, w), (B,), (B, T, D), (B, A), (B, c, h, w)
        calls.append(x.shape[0])
        return x * t[:, None, None, None] + crossattn.sum() + vector.sum(1)[:, None, None, None] + concat.mean()

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 4, 5, 5, generator=g), torch.tensor([1.0, 2.0, 3.0])
    cond = dict(crossattn=torch.randn(3, 7, 8, generator=g), vector=torch.randn(3, 6, generator=g),
                concat=torch.randn(3, 1, 5, 5, generator=g))
    got = one_by_one(net)(x, t, **cond)
    want = torch.cat([net(x[i:i + 1], t[i:i + 1], **{k: v[i:i + 1] for k, v in cond.items()}) for i in range(3)])
    assert torch.equal(got, want) and calls == [1] * 6


def test_a_dropped_tower_gives_its_pages_back(tiny_files, tmp_path) -> None:
    import shutil

    path = Path(shutil.copy(tiny_files("sd1"), tmp_path / "own.safetensors"))   # mapped by this test only
    low = load_model(path, low_memory=True)
    before = _mappings(path)                                    # nothing of the file is held between uses
    assert before == 0
    with loaded(*low.parts.text_encoders):
        assert resident(low.parts.text_encoders) == [True]
        assert _mappings(path) == before + 1                    # the tower's own handle on the file
    assert resident(low.parts.text_encoders) == [False]
    assert _mappings(path) == before                            # unmapped with the tower's last tensor


def test_the_cache_keys_low_memory_apart(tiny_files) -> None:
    path = tiny_files("sd1")
    plain, low = ModelCache(), ModelCache(low_memory=True)
    assert plain.get(path).low_memory is False
    m = low.get(path)
    assert m.low_memory is True and low.get(path) is m
    assert resident(m.parts.text_encoders) == [False]


def test_cli_and_app_flags(tiny_files, tmp_path, capsys, monkeypatch) -> None:
    """`python -m sd generate --low-memory --threads 1` loads in low-memory mode with one torch thread, and its PNG
    equals the normal mode's image (within 1); app.py's --low-memory makes it the cache's mode; --threads 0 is refused in one line."""
    import app
    import sd.__main__ as cli
    from PIL import Image

    got = []
    import sd.pipeline as pl

    real = pl.load_model
    monkeypatch.setattr(pl, "load_model", lambda *a, **kw: got.append(kw["low_memory"]) or real(*a, **kw))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: got.append(("threads", n)))
    base = ["generate", "--checkpoint", str(tiny_files("sd1")), "--prompt", "a red cube", "--negative-prompt",
            "blurry", "--width", "64", "--height", "64", "--steps", "2", "--cfg", "5", "--seed", "3"]
    assert cli.main(base + ["--low-memory", "--threads", "1", "--out", str(tmp_path / "b.png")]) == 0
    assert got == [("threads", 1), True]
    want = generate(load_model(tiny_files("sd1")), _params()).images[0]   # the normal mode's image
    got_png = np.asarray(Image.open(tmp_path / "b.png").convert("RGB"), dtype=np.int16)
    assert np.abs(got_png - np.asarray(want, dtype=np.int16)).max() <= 1
    capsys.readouterr()
    assert cli.main(base + ["--threads", "0", "--out", str(tmp_path / "c.png")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --threads must be at least 1, got 0"]
    args = app.parse_args(["--low-memory", "--threads", "2"])
    assert (args.low_memory, args.threads) == (True, 2)
    assert app.parse_args([]).low_memory is False


@pytest.mark.parametrize("layout", ["sd1", "sd1_inpaint"])
def test_low_memory_image_inputs_equal_the_normal_run(tiny_files, layout) -> None:
    """The VAE encode of img2img (sd1) and of the inpaint condition (sd1_inpaint: the masked image's posterior
    sample) reads the dropped VAE for the encode: the result equals the normal mode's (float32 rounding)."""
    from PIL import Image

    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.fromarray(((np.arange(64)[None, :] >= 32) * np.full((64, 1), 255)).astype(np.uint8))
    extra = {"init_image": image, "strength": 0.6} if layout == "sd1" else {"inputs": {"image": image, "mask": mask}}
    p = GenerateParams(**{**_params().__dict__, **extra})
    path = tiny_files(layout)
    low = load_model(path, low_memory=True)
    a, b = generate(load_model(path), p), generate(low, p)
    _close(a, b)
    assert resident([*low.parts.text_encoders, low.parts.vae]) == [False, False]


def test_the_unet_is_dropped_before_the_decode(tiny_files, monkeypatch) -> None:
    """The UNet holds its weights while sampling and none while the text towers encode or the VAE decodes: the
    peaks never add up."""
    import sd.pipeline as pl

    low = load_model(tiny_files("sd1"), low_memory=True)
    seen = {}
    real_sample, real_decode, real_guided = pl.sample, pl.decode_latents_info, pl.guided_denoiser
    monkeypatch.setattr(pl, "guided_denoiser", lambda *a, **kw: seen.setdefault(
        "text", resident([low.parts.unet])) and real_guided(*a, **kw))
    monkeypatch.setattr(pl, "sample", lambda *a, **kw: seen.setdefault("sampling", resident([low.parts.unet]))
                        and real_sample(*a, **kw))
    monkeypatch.setattr(pl, "decode_latents_info", lambda m, z: seen.setdefault(
        "decode", resident([low.parts.unet, low.parts.vae])) and real_decode(m, z))
    generate(low, _params())
    assert seen == {"text": [False], "sampling": [True], "decode": [False, False]}


def test_hires_and_attention_maps_run_in_low_memory(tiny_files) -> None:
    """The paths that wrap generate (the hires fix's two passes, the attention recorder's hooks on the UNet's
    modules) give the normal mode's result: the dropped UNet is the same module objects, refilled for each pass."""
    from sd.attention_maps import generate_with_maps
    from sd.hires import Hires, generate_hires

    path = tiny_files("sd1")
    normal, low = load_model(path), load_model(path, low_memory=True)
    h = Hires(scale=1.5, steps=2, denoise=0.5, upscaler="Latent")
    a, b = generate_hires(normal, _params(), h), generate_hires(low, _params(), h)
    assert a.images[0].size == b.images[0].size == (96, 96)
    _close(a, b)
    (ra, ma), (rb, mb) = generate_with_maps(normal, _params()), generate_with_maps(low, _params())
    _close(ra, rb)
    assert ma.maps.shape == mb.maps.shape and (ma.maps - mb.maps).abs().max().item() <= 1e-4 * ma.maps.abs().max()
    assert resident([low.parts.unet, low.parts.vae]) == [False, False]


def test_the_refiner_hand_off_runs_in_low_memory(tiny_files) -> None:
    """Base then refiner, each UNet read for its own steps only: the normal mode's result."""
    from sd.refiner import generate_with_refiner

    base, ref = tiny_files("sdxl_base"), tiny_files("sdxl_refiner")
    p = _params()
    a = generate_with_refiner(load_model(base), load_model(ref), p, switch_at=0.5)
    lb, lr = load_model(base, low_memory=True), load_model(ref, low_memory=True)
    b = generate_with_refiner(lb, lr, p, switch_at=0.5)
    _close(a, b)
    assert resident([lb.parts.unet, lr.parts.unet]) == [False, False]


def test_the_decode_is_whole_when_it_fits_in_what_the_unet_freed(tiny_files, monkeypatch) -> None:
    """Low memory decodes whole (exact, no tile cost) when the estimate (pixels x DECODE_BYTES_PER_PIXEL_PER_BYTE x
    dtype bytes) is at most the dropped UNet's bytes, in tiles otherwise."""
    import sd.pipeline as pl
    import sd.vae as vae_mod

    low = load_model(tiny_files("sd1"), low_memory=True)
    z = torch.zeros(1, 4, 8, 8)
    unet = sum(t.numel() * t.element_size() for t in low.parts.unet.parameters())
    per_byte = unet // (64 * 64 * 4)               # the estimate for a 64x64 image equals the UNet's bytes
    monkeypatch.setattr(pl, "DECODE_BYTES_PER_PIXEL_PER_BYTE", per_byte)
    assert pl.decode_fits_in_unet(low, z) and not pl.decode_fits_in_unet(low, torch.zeros(2, 4, 8, 8))
    tiled = []
    real = vae_mod.decode_tiled
    monkeypatch.setattr(vae_mod, "decode_tiled", lambda *a, **kw: tiled.append(1) or real(*a, **kw))
    generate(low, _params())
    assert tiled == []
    monkeypatch.setattr(pl, "DECODE_BYTES_PER_PIXEL_PER_BYTE", per_byte + 1)
    generate(low, _params())
    assert tiled == [1]


def test_a_dropped_unet_is_refused_in_one_line(tiny_files) -> None:
    """A sampling run outside `loaded(model.parts.unet)` (a code path that forgot it) says so, not a meta-tensor error."""
    from sd.pipeline import network_net

    low = load_model(tiny_files("sd1"), low_memory=True)
    net = network_net(low)                                       # built while dropped: fine, only calls need weights
    x, t, ctx = torch.zeros(1, 4, 8, 8), torch.tensor([500.0]), torch.zeros(1, 77, low.spec.unet.context_dim)
    with pytest.raises(RuntimeError, match=r"^the UNet is not loaded: run the sampling inside `with loaded"):
        net(x, t, crossattn=ctx)
    with loaded(low.parts.unet):
        assert net(x, t, crossattn=ctx).shape == (1, 4, 8, 8)
