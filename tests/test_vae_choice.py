"""VAE choice (sd.vae_choice): Automatic / None / a listed file, the fit check, the cache keyed on the VAE, the
cached checkpoint's own VAE untouched, and the `VAE hash` / `VAE` infotext written and read back."""
from __future__ import annotations

import hashlib
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sd.checkpoint import CheckpointError
from sd.models_dir import NotInModelsFolder
from sd.pipeline import GenerateParams, ModelCache, generate, load_model
from sd.pnginfo import build_parameters, parse_parameters, to_settings
from sd.vae_choice import AUTOMATIC, NONE, resolve_vae, vae_choices, vae_hash
from sd.vq import build_first_stage

from .tiny import tiny_spec


def _standalone(path, seed):
    """A standalone VAE file (A1111 / Stability layout: no prefix) of the tiny SD 1.x VAE with other weights."""
    torch.manual_seed(seed)
    sd = {k: v.contiguous() for k, v in build_first_stage(tiny_spec("sd1").vae).state_dict().items()}
    save_file(sd, str(path))
    return sd


def test_choices_automatic_none_and_listing(tiny_files, tmp_path) -> None:
    root = tmp_path / "models"
    (root / "Stable-diffusion").mkdir(parents=True)
    (root / "VAE").mkdir()
    ckpt = root / "Stable-diffusion" / "mine.safetensors"
    os.link(tiny_files("sd1"), ckpt)
    _standalone(root / "VAE" / "other.safetensors", 5)
    assert vae_choices(root) == [AUTOMATIC, NONE, "other.safetensors"]
    assert resolve_vae(NONE, ckpt, root) is None and resolve_vae(AUTOMATIC, ckpt, root) is None
    _standalone(root / "Stable-diffusion" / "mine.vae.safetensors", 6)
    assert resolve_vae(AUTOMATIC, ckpt, root) == root / "Stable-diffusion" / "mine.vae.safetensors"
    assert resolve_vae("other", ckpt, root) == root / "VAE" / "other.safetensors"
    for bad in ("../Stable-diffusion/mine.vae", str(ckpt), "nope"):
        with pytest.raises(NotInModelsFolder, match="^no such VAE in the VAE folders"):
            resolve_vae(bad, ckpt, root)


def test_override_decodes_with_the_file_and_round_trips(tiny_files, tmp_path) -> None:
    path = tiny_files("sd1")
    other = tmp_path / "other.safetensors"
    tensors = _standalone(other, 5)
    cache = ModelCache()
    own = cache.get(path)
    own_before = {k: v.clone() for k, v in own.parts.vae.state_dict().items()}
    swapped = cache.get(path, vae=other)
    assert swapped is not own and cache.get(path, vae=other) is swapped and cache.get(path) is own
    assert all(torch.equal(swapped.parts.vae.state_dict()[k], v) for k, v in tensors.items())
    p = GenerateParams(prompt="a boat", width=64, height=64, steps=2, seed=3)
    a, b = generate(own, p), generate(swapped, p)
    assert torch.equal(a.latents, b.latents)                       # the VAE only decodes here
    diff = np.abs(np.asarray(a.images[0], np.int16) - np.asarray(b.images[0], np.int16))
    assert diff.mean() > 5                                          # ... and decodes differently
    assert all(torch.equal(own.parts.vae.state_dict()[k], v) for k, v in own_before.items())
    assert "infotext" not in a.info
    assert b.info["infotext"] == {"VAE hash": hashlib.sha256(other.read_bytes()).hexdigest()[:10],
                                  "VAE": "other.safetensors"}
    text = build_parameters(prompt="a boat", negative_prompt="", steps=2, sampler="euler", schedule="normal", cfg=7,
                            seed=3, width=64, height=64, model_name="sd1", model_hash=None,
                            extra_fields=b.info["infotext"])
    assert "VAE hash: " + vae_hash(other) in text
    s = to_settings(parse_parameters(text))
    assert (s["vae"], s["vae_hash"]) == ("other.safetensors", vae_hash(other))


def test_a_vae_that_does_not_fit_is_refused(tiny_files, tmp_path) -> None:
    cfg = replace(tiny_spec("sd1").vae, z_channels=16, embed_dim=16)        # SD3-like 16-channel f8 latent
    module = build_first_stage(cfg)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(CheckpointError, match=r"^wide.safetensors: a VAE with 16 latent channels at f8, SD 1.x needs "
                                              r"4 channels at f8: choose a VAE made for SD 1.x"):
        load_model(tiny_files("sd1"), vae=tmp_path / "wide.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(CheckpointError, match="no first stage"):
        load_model(tiny_files("sd1"), vae=tmp_path / "lora.safetensors")
