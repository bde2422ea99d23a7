"""A VAE-less SD3.5 file (MMDiT only) takes its VAE from a separate file (issue 16 item 4): NAME.vae.safetensors beside
it or the first fitting file in a vae/ (VAE/) folder beside it or in the models folder (sd.vae_choice.find_vae, 16
latent channels read from the header), or --vae FILE; without one, a one-line error says what is missing and where
to put it. Tiny sd35_large layout, CLIP-L/G in models/text_encoders/ (no T5: faster, said in the notes)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sd.__main__ import main
from sd.config import VAEConfig
from sd.pipeline import GenerateParams, generate, load_model
from sd.sd3_text import CLIP_G_PREFIX, CLIP_L_PREFIX
from sd.vae import AutoencoderKL

from .tiny_sd3 import tiny_mmdit_tensors, tiny_text_tensors, tiny_vae_tensors

P = GenerateParams(prompt="a red cat", negative_prompt="", width=32, height=32, steps=2, cfg=3.0, seed=3)
MISSING = ("sd3.5_large.safetensors has no VAE (first_stage_model.*) and no VAE file was found for it: put a SD3.5 "
           "large VAE (16 latent channels) as sd3.5_large.vae.safetensors beside it or in a vae/ folder beside it "
           "or in the models folder, or choose one (--vae FILE; in the app the VAE dropdown)")


def _save(tensors: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.fixture()
def models(tmp_path):
    """models/checkpoints/sd3.5_large.safetensors (MMDiT only), models/full.safetensors (the same + its VAE) and
    models/text_encoders/clip_l|clip_g.safetensors."""
    torch.set_num_threads(1)
    root = tmp_path / "models"
    net = tiny_mmdit_tensors("sd35_large")
    bare = _save(net, root / "checkpoints" / "sd3.5_large.safetensors")
    full = _save({**net, **tiny_vae_tensors(5)}, root / "full" / "sd3.5_large.safetensors")
    text = tiny_text_tensors()
    for name, prefix in (("clip_l", CLIP_L_PREFIX), ("clip_g", CLIP_G_PREFIX)):
        _save({k[len(prefix):]: v for k, v in text.items() if k.startswith(prefix)},
              root / "text_encoders" / f"{name}.safetensors")
    shutil.copytree(root / "text_encoders", root / "full" / "text_encoders")
    vae16 = {k[len("first_stage_model."):]: v for k, v in tiny_vae_tensors(5).items()}
    return root, bare, full, vae16


@torch.no_grad()
def test_vae_from_the_models_folder_or_named_on_the_cli(models, tmp_path, capsys) -> None:
    root, bare, full, vae16 = models
    model = load_model(bare)
    assert model.parts.vae is None
    with pytest.raises(ValueError) as e:
        generate(model, P)
    assert str(e.value) == MISSING
    # an SD 1.x-style 4-channel VAE in models/VAE does not fit: still missing
    sd1_vae = AutoencoderKL(VAEConfig(ch=32, z_channels=4, embed_dim=4)).state_dict()
    _save(sd1_vae, root / "VAE" / "a_sd1_vae.safetensors")
    assert load_model(bare).parts.vae is None
    # the 16-channel one in models/vae (a folder up from the checkpoint) is found, said, and decodes like the
    # bundled VAE bit for bit
    _save(vae16, root / "vae" / "sd3_vae.safetensors")
    found = load_model(bare)
    assert found.vae_file == root / "vae" / "sd3_vae.safetensors"
    assert "VAE from vae/sd3_vae.safetensors (the checkpoint has none)" in found.spec.notes
    got, ref = generate(found, P), generate(load_model(full), P)
    assert torch.equal(got.latents, ref.latents) and got.images[0].tobytes() == ref.images[0].tobytes()
    assert len(set(got.images[0].tobytes())) > 16      # a real image, not a flat one
    assert got.info["infotext"]["VAE"] == "sd3_vae.safetensors"
    # NAME.vae.safetensors beside the checkpoint comes first
    _save({k: v * 0.5 if k.endswith("conv_out.weight") else v for k, v in vae16.items()},
          bare.with_name("sd3.5_large.vae.safetensors"))
    beside = load_model(bare)
    assert "VAE from sd3.5_large.vae.safetensors (the checkpoint has none)" in beside.spec.notes
    assert generate(beside, P).images[0].tobytes() != ref.images[0].tobytes()

    # the CLI: --vae FILE anywhere; with no VAE at all, exit 2 and the one line
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(bare, alone / "sd3.5_large.safetensors")
    shutil.copytree(root / "text_encoders", alone / "text_encoders")
    args = ["generate", "--checkpoint", str(alone / "sd3.5_large.safetensors"), "--prompt", "a red cat", "--width",
            "32", "--height", "32", "--steps", "2", "--cfg", "3", "--seed", "3", "--out", str(tmp_path / "o.png")]
    capsys.readouterr()
    assert main(args) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {MISSING}"]
    assert main(args + ["--vae", str(root / "vae" / "sd3_vae.safetensors")]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "o.png").tobytes() == ref.images[0].tobytes()
