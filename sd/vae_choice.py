"""Choosing the VAE a checkpoint decodes (and encodes) with, as AUTOMATIC1111's "SD VAE" setting does.

Choices: "Automatic" (a `NAME.vae.safetensors` / `.vae.pt` / `.vae.ckpt` beside the checkpoint `NAME.*`, else the
checkpoint's own), "None" (the checkpoint's own), or a file of the VAE folders (`sd.models_dir.extra_files("VAE",
...)`: models/VAE, models/vae, vae/, or --vae-dir), named by its listed name. A VAE file is a standalone LDM
AutoencoderKL (`encoder.*`, `decoder.*`, `quant_conv`, `post_quant_conv`; A1111's and Stability's releases) or any
checkpoint's `first_stage_model.*`, loaded strictly by `sd.first_stage.load_first_stage`. It must fit the family's
latent (channels and downsampling factor, `Family.latent`): an SDXL VAE fits SD 1.x by shape but not by training,
which shapes cannot tell, so only the shape is checked and the choice is the user's.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from .checkpoint import CheckpointError, file_sha256
from .models_dir import extra_files, resolve_extra

AUTOMATIC, NONE = "Automatic", "None"
_BESIDE = (".vae.safetensors", ".vae.pt", ".vae.ckpt")   # A1111 find_vae_near_checkpoint, safetensors first


def vae_files(models_dir: str | os.PathLike | None = None, vae_dir: str | os.PathLike | None = None
              ) -> dict[str, Path]:
    """{listed name: file} of the VAE folders."""
    return extra_files("VAE", models_dir, vae_dir)


def vae_choices(models_dir: str | os.PathLike | None = None, vae_dir: str | os.PathLike | None = None) -> list[str]:
    """What a dropdown offers: "Automatic", "None", then every listed VAE name."""
    return [AUTOMATIC, NONE, *vae_files(models_dir, vae_dir)]


def beside(checkpoint: str | os.PathLike) -> Path | None:
    """`NAME.vae.safetensors` (or .vae.pt / .vae.ckpt) next to the checkpoint `NAME.ext`, if there is one."""
    ckpt = Path(checkpoint)
    for suffix in _BESIDE:
        p = ckpt.with_name(ckpt.stem + suffix)
        if p.is_file():
            return p
    return None


def resolve_vae(choice: str | None, checkpoint: str | os.PathLike, models_dir: str | os.PathLike | None = None,
                vae_dir: str | os.PathLike | None = None) -> Path | None:
    """The VAE file a choice means for `checkpoint`, or None for the checkpoint's own. A name outside the VAE
    listing gets the one refusal of `resolve_extra` (NotInModelsFolder)."""
    if choice in (None, "", NONE):
        return None
    if choice == AUTOMATIC:
        return beside(checkpoint)
    return resolve_extra(choice, vae_files(models_dir, vae_dir), "VAE")


def vae_hash(path: str | os.PathLike) -> str:
    """A1111's `VAE hash`: the first 10 hex digits of the sha256 of the file."""
    return file_sha256(path)[:10]


def load_vae_for(path: str | os.PathLike, spec, label: str, device, dtype):
    """(VAE module, spec with its VAE config) of a VAE file for a model of `spec` (family `label`). Raises
    CheckpointError (one line, naming the file) when it is not a first stage or does not fit the family's latent."""
    from .first_stage import load_first_stage

    path = Path(path)
    fs = load_first_stage(path, device=device, dtype=dtype)
    lat = spec.latent
    if fs.is_vq or fs.cfg.embed_dim != lat.channels or fs.factor != lat.factor:
        what = "a VQ first stage" if fs.is_vq else f"a VAE with {fs.cfg.embed_dim} latent channels at f{fs.factor}"
        raise CheckpointError(f"{path.name}: {what}, {label} needs {lat.channels} channels at f{lat.factor}: choose "
                              f"a VAE made for {label}, or None for the checkpoint's own")
    return fs.model, replace(spec, vae=fs.cfg)


def infotext_fields(path: Path | None) -> dict[str, str]:
    """A1111's `VAE hash` and `VAE` (the file name) of an external VAE; {} for the checkpoint's own."""
    if path is None:
        return {}
    return {"VAE hash": vae_hash(path), "VAE": Path(path).name}


# ----------------------------------------------------------------------------- a checkpoint without a VAE
# (SD3.5 MMDiT-only files, any file saved without first_stage_model.*): where its VAE is looked for

VAE_FOLDERS = ("vae", "VAE")


def _latent_channels(path: Path) -> int | None:
    """The latent channels a VAE file's decoder takes (decoder.conv_in.weight, bare or under first_stage_model.),
    read from the header only; None for anything else."""
    from .checkpoint import open_checkpoint

    try:
        shapes = open_checkpoint(path).shapes()
    except (CheckpointError, OSError, ValueError):
        return None
    for key in ("decoder.conv_in.weight", "first_stage_model.decoder.conv_in.weight"):
        if len(shapes.get(key, ())) == 4:
            return shapes[key][1]
    return None


def find_vae(checkpoint: str | os.PathLike, channels: int) -> Path | None:
    """The VAE of a checkpoint that has none: `NAME.vae.safetensors` (.pt, .ckpt) beside it, else the first
    .safetensors by name in a vae/ or VAE/ folder beside it, one folder up (models/VAE of models/checkpoints/x) or
    two, whose decoder takes `channels` latent channels (header only). None when there is none."""
    ckpt = Path(checkpoint)
    if beside(ckpt) is not None:
        return beside(ckpt)
    for up in (ckpt.parent, ckpt.parent.parent, ckpt.parent.parent.parent):
        for name in VAE_FOLDERS:
            folder = up / name
            if folder.is_dir():
                for f in sorted(folder.rglob("*.safetensors")):
                    if f.is_file() and _latent_channels(f) == channels:
                        return f
    return None


def missing_vae(checkpoint: str | os.PathLike, label: str, channels: int) -> str:
    """The one line for a checkpoint without a VAE when none was found: what is missing and where to put it."""
    ckpt = Path(checkpoint)
    return (f"{ckpt.name} has no VAE (first_stage_model.*) and no VAE file was found for it: put a {label} VAE "
            f"({channels} latent channels) as {ckpt.stem}.vae.safetensors beside it or in a vae/ folder beside it or "
            "in the models folder, or choose one (--vae FILE; in the app the VAE dropdown)")


__all__ = ["AUTOMATIC", "NONE", "vae_files", "find_vae", "missing_vae", "vae_choices", "beside", "resolve_vae",
           "vae_hash", "load_vae_for",
           "infotext_fields", "CheckpointError"]
