"""Reading single-file checkpoints: `.safetensors` (header first, tensors memory-mapped) and weights-only `.ckpt`.

Nothing here knows model architectures. It gives names, shapes and tensors, and turns every way a file can be
bad (missing, truncated, not a checkpoint, a pickle that would run code) into a one-line `CheckpointError`.
The key-accounting rules (which tensors may be ignored, and why) also live here, so `inspect` and the loader agree.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

Tensor = torch.Tensor

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message says what is wrong and what to do, on one line."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str            # safetensors dtype name ("F16") or torch dtype name for .ckpt
    shape: tuple[int, ...]


# Tensors a loader may skip, each with the reason shown by `inspect`. Patterns match the full key.
IGNORE_RULES: tuple[tuple[str, str], ...] = (
    (r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|"
     r"log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance|"
     r"posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|lvlb_weights)",
     "LDM schedule buffer (recomputed from the betas)"),
    (r"model_ema\..*", "EMA copy (the model.* weights are used)"),
    (r".*\.position_ids", "text position ids (recomputed)"),
    (r".*logit_scale", "CLIP logit scale (unused for text conditioning)"),
    (r"logvar", "training log-variance"),
    (r"denoiser\.sigmas", "SGM sigma table (recomputed)"),
    (r"model\.model_sampling\.sigmas", "sigma table (recomputed)"),
    (r"first_stage_model\.loss\..*", "autoencoder training loss (LPIPS / discriminator)"),
    (r"v_pred|ztsnr", "ComfyUI marker key (read by detection)"),
)
_IGNORE = [(re.compile(p), why) for p, why in IGNORE_RULES]


def ignore_reason(key: str) -> str | None:
    """The named rule under which `key` may be left unloaded, or None."""
    for pattern, why in _IGNORE:
        if pattern.fullmatch(key):
            return why
    return None


@dataclass
class Checkpoint:
    """An opened checkpoint: names and shapes known up front; tensors read on demand."""

    path: Path
    infos: dict[str, TensorInfo]
    _tensors: dict[str, Tensor] | None = None          # .ckpt: everything loaded (weights only)
    _safe: object | None = field(default=None, repr=False)  # .safetensors: safe_open handle (mmap)
    metadata: dict[str, str] = field(default_factory=dict)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.infos.items()}

    def get(self, key: str) -> Tensor:
        if self._tensors is not None:
            return self._tensors[key]
        if self._safe is None:
            from safetensors import safe_open

            self._safe = safe_open(str(self.path), framework="pt", device="cpu")
        try:
            return self._safe.get_tensor(key)
        except Exception as e:  # a damaged data section shows up only here
            raise CheckpointError(f"{self.path.name}: cannot read tensor {key!r} ({e}); the file is damaged, download it again") from None

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        """All tensors under `prefix`, with the prefix stripped."""
        return {k[len(prefix):]: self.get(k) for k in self.infos if k.startswith(prefix)}


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse the JSON header of a .safetensors file and check that the data section is complete."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path.name}: not a safetensors file (only {size} bytes); check that the download finished")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise CheckpointError(f"{path.name}: not a safetensors file (its first bytes are not a safetensors header); "
                                  "is it a .ckpt, a text or an HTML page saved under this name?")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path.name}: not a safetensors file (the header is not valid JSON); "
                              "is it a .ckpt, a text or an HTML page saved under this name?") from None
    meta = header.pop("__metadata__", None) or {}
    infos: dict[str, TensorInfo] = {}
    end = 0
    for name, entry in header.items():
        try:
            dtype, shape, (a, b) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path.name}: damaged safetensors header at tensor {name!r}") from None
        count = 1
        for s in shape:
            count *= s
        if dtype in _DTYPE_SIZE and b - a != count * _DTYPE_SIZE[dtype]:
            raise CheckpointError(f"{path.name}: damaged safetensors header: tensor {name!r} has the wrong byte size")
        infos[name] = TensorInfo(dtype, shape)
        end = max(end, b)
    if 8 + n + end > size:
        raise CheckpointError(f"{path.name}: truncated: the header describes {8 + n + end} bytes but the file has {size}; "
                              "the download or copy did not finish, get the file again")
    return infos, meta


def _find_state_dict(obj: object) -> dict[str, Tensor]:
    """The tensor dict of a .ckpt: top level, or under (possibly nested) `state_dict`."""
    while isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"holds a {type(obj).__name__}, not a dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError("holds no tensors")
    return tensors


def _load_ckpt(path: Path) -> dict[str, Tensor]:
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            first = f.read(2)
        if not first or first[0] != 0x80:  # a pickle starts with the PROTO opcode
            raise CheckpointError(f"{path.name}: not a PyTorch checkpoint (neither a zip archive nor a pickle); "
                                  "check the file type and that the download finished")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        first_line = str(e).strip().splitlines()
        detail = next((line for line in first_line if "GLOBAL" in line or "Unsupported" in line), first_line[0] if first_line else "")
        raise CheckpointError(f"{path.name}: refused: the pickle asks to run code or build objects that are not plain "
                              f"tensors ({detail.strip()[:160]}); only weights-only checkpoints are loaded, convert it "
                              "to .safetensors with a tool you trust") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path.name}: cannot read this .ckpt ({msg[:160]}); the file is damaged or truncated, "
                              "get it again") from None
    try:
        return _find_state_dict(obj)
    except CheckpointError as e:
        raise CheckpointError(f"{path.name}: {e}; not a Stable Diffusion checkpoint") from None


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a .safetensors (header only; tensors mmapped on demand) or .ckpt/.pt/.pth (weights only)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; give the single-file checkpoint (.safetensors or .ckpt) inside it")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        infos, meta = read_safetensors_header(path)
        return Checkpoint(path, infos, metadata=meta)
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        tensors = _load_ckpt(path)
        infos = {k: TensorInfo(str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in tensors.items()}
        return Checkpoint(path, infos, _tensors=tensors)
    raise CheckpointError(f"{path.name}: unsupported file type {suffix or '(none)'}; expected .safetensors or .ckpt")
