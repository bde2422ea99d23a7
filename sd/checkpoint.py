"""Reading single-file checkpoints: `.safetensors` (header first, tensors memory-mapped) and weights-only `.ckpt`.

Nothing here knows model architectures. It gives names, shapes and tensors, and turns every way a file can be
bad (missing, truncated, not a checkpoint, a pickle that would run code, a hostile header or pickle) into a one-line
`CheckpointError`, and no other exception. A safetensors header is validated field by field within fixed caps
(header bytes, tensors, dimensions, elements), so reading one takes a bounded time (well under a second) whatever
the file holds; a .ckpt is loaded weights-only and its `state_dict` search is bounded (no cycles, 8 levels).
The key-accounting rules (which tensors may be ignored, and why) also live here, so `inspect` and the loader agree.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import struct
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

Tensor = torch.Tensor

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
_DTYPE_SIZE = {name: dt.itemsize for name, dt in SAFETENSORS_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message says what is wrong and what to do, on one line."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str            # safetensors dtype name ("F16") or torch dtype name for .ckpt
    shape: tuple[int, ...]
    offset: int = -1      # .safetensors: the data's absolute byte offset in the file (-1: .ckpt, in memory)


# Tensors a loader may skip, each with the reason shown by `inspect`. Patterns match the full key.
IGNORE_RULES: tuple[tuple[str, str], ...] = (
    (r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|"
     r"log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance|"
     r"posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|lvlb_weights)",
     "LDM schedule buffer (recomputed from the betas)"),
    (r"(low_scale_model|noise_augmentor)\.(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|"
     r"sqrt_one_minus_alphas_cumprod|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|"
     r"sqrt_recipm1_alphas_cumprod)", "noise-augmentation schedule buffer (the family reads the betas)"),
    (r"embedder\.model\.(token_embedding\.weight|positional_embedding|ln_final\.(weight|bias)|text_projection|"
     r"transformer\..*)", "unCLIP image embedder's text side (only its vision tower runs)"),
    (r"model_ema\..*", "EMA copy (the LDM families load a complete one in place of model.*; else unused)"),
    (r".*\.position_ids", "text position ids (recomputed)"),
    (r".*logit_scale", "CLIP logit scale (unused for text conditioning)"),
    (r"logvar", "training log-variance"),
    (r"denoiser\.sigmas", "SGM sigma table (recomputed)"),
    (r"model\.model_sampling\.sigmas", "sigma table (recomputed)"),
    (r"first_stage_model\.loss\..*", "autoencoder training loss (LPIPS / discriminator)"),
    (r"loss\..*", "autoencoder training loss (LPIPS / discriminator) of a standalone first-stage file"),
    (r"v_pred|ztsnr", "ComfyUI marker key (read by detection)"),
    (r"scale_factor", "LDM latent scale buffer (read by the family, sd/families/ldm.py)"),
    (r"cond_stage_model\.transformer\.to_logits\.(weight|bias)", "LDM text transformer's unused logits head"),
    (r"text_encoders\.clip_l\.transformer\.text_projection\.weight",
     "SD3 bundles' CLIP-L projection (SD3 feeds CLIP-L's pooled output unprojected)"),
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

    def get_as(self, key: str, dtype: torch.dtype) -> Tensor:
        """The tensor in `dtype` when both it and the stored dtype are floating (others as stored). A .safetensors
        tensor stored in another dtype is read from the file into a buffer of its own and cast from there: the
        file's mapped pages never sit beside the cast copy (an SDXL float16 UNet into float32: 4.8 GiB less at the
        peak of the load). The same dtype: the mmap view itself, no copy."""
        info = self.infos[key]
        stored = SAFETENSORS_DTYPES.get(info.dtype) if self._tensors is None else None
        if stored is None or stored == dtype or not (stored.is_floating_point and dtype.is_floating_point):
            t = self.get(key)
            return t.to(dtype) if t.is_floating_point() and dtype.is_floating_point else t
        nbytes = math.prod(info.shape) * stored.itemsize
        buf = torch.empty(nbytes, dtype=torch.uint8)
        try:
            with open(self.path, "rb") as f:
                f.seek(info.offset)
                got = f.readinto(memoryview(buf.numpy()))
        except OSError as e:
            raise CheckpointError(f"{self.path.name}: cannot read tensor {key!r} ({e.strerror or e}); check the "
                                  "disk and the file") from None
        if got != nbytes:
            raise CheckpointError(f"{self.path.name}: tensor {key!r} is cut short ({got} of {nbytes} bytes): the file "
                                  "changed or is truncated, download it again")
        return buf.view(stored).reshape(info.shape).to(dtype)

    def close(self) -> None:
        """Let go of the file's mapping (reopened by the next `get`); tensors read before keep what they map."""
        self._safe = None

    def tensors(self, prefix: str, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """All tensors under `prefix`, with the prefix stripped; floating ones in `dtype` if given (get_as)."""
        if dtype is None:
            return {k[len(prefix):]: self.get(k) for k in self.infos if k.startswith(prefix)}
        return {k[len(prefix):]: self.get_as(k, dtype) for k in self.infos if k.startswith(prefix)}


# Limits of a checkpoint header. Every check below is O(1) per tensor, so with these caps the header of any file
# is parsed or refused in a bounded time: measured on this project's shared 2-core CPU, the slowest header within
# the caps (20,000 tensors of 8 dimensions + 100k metadata entries, 3 MB) reads in ~0.35 s, and a refused one takes
# at most ~0.15 s (the 2.4 MB header of 4,299-digit dimensions: under 0.1 s; it took 22 s before these checks).
# - Header bytes. safetensors' own limit is 100 MB. The largest real checkpoint header, written from the released
#   key lists in tests/data/checkpoint-keys/, is 432 KB (ldm_layout2img_openimages256, 3089 tensors; SDXL base:
#   367 KB, 2516 tensors). 16 MB is ~40x that and leaves room for large training metadata (kohya's tag counts).
MAX_HEADER_BYTES = 16 * 2**20
# - Tensors: the largest real checkpoint has 3089 (a full-rank SDXL LoRA ~2,200); 20,000 is 6x that. Validating
#   costs ~6 us per tensor, so a header at this cap takes ~0.3 s in all.
MAX_TENSORS = 20_000
# - JSON tokens, counted on the raw bytes before parsing (also inside strings, so metadata text counts): json.loads
#   spends up to ~1 us per dict entry and ~0.4 us per value on this project's shared CPU, so a 16 MB header of
#   small values would take seconds. A tensor entry needs 3 containers ({ and [), 4 colons and at most 11 commas;
#   the slack is for metadata text (A1111 and kohya store JSON documents, e.g. tag counts, as metadata strings).
#   The largest real header (3089 tensors) has ~9k containers, ~12k colons and ~25k commas.
MAX_CONTAINERS = 3 * MAX_TENSORS + 50_000
MAX_COLONS = 4 * MAX_TENSORS + 100_000
MAX_COMMAS = 12 * MAX_TENSORS + 200_000
# - Shapes: real checkpoints have <= 4 dimensions and <= 1.4e8 elements per tensor (SD3's T5 embedding).
MAX_DIMS = 8
MAX_ELEMENTS = 2**40


def _damaged(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path.name}: damaged safetensors header: {what}; the file is damaged or not a checkpoint, "
                           "download it again")


def _tensor_name(name: str) -> str:
    return repr(name if len(name) <= 80 else name[:77] + "...")


def _parse_int_bounded(text: str) -> int:
    """json parse_int when the interpreter's int digit limit is off: no quadratic str->int conversion of huge
    numbers; a number of over 20 digits (offsets are < 2**64) becomes +-2**70, which every check refuses."""
    if len(text) <= 20:
        return int(text)
    return -2**70 if text.startswith("-") else 2**70


def _check_tensor(path: Path, name: object, entry: object) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, or CheckpointError naming the tensor and the problem."""
    if not isinstance(name, str):
        raise _damaged(path, f"tensor name {name!r} is not a string")
    t = f"tensor {_tensor_name(name)}"
    if not isinstance(entry, dict):
        raise _damaged(path, f"{t} is a {type(entry).__name__}, not an object with dtype, shape and data_offsets")
    for field_name in ("dtype", "shape", "data_offsets"):
        if field_name not in entry:
            raise _damaged(path, f"{t} has no {field_name!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPE_SIZE:
        shown = repr(dtype)[:40]
        raise _damaged(path, f"{t} has an unknown dtype {shown} (known: {', '.join(_DTYPE_SIZE)})")
    if not isinstance(shape, list):
        raise _damaged(path, f"{t} has a shape that is a {type(shape).__name__}, not a list of sizes")
    if len(shape) > MAX_DIMS:
        raise _damaged(path, f"{t} has {len(shape)} dimensions (at most {MAX_DIMS})")
    count = 1
    for d in shape:
        if type(d) is not int:  # not bool, float, str, null, list
            raise _damaged(path, f"{t} has a dimension that is a {type(d).__name__}, not an integer")
        if d < 0:
            raise _damaged(path, f"{t} has a negative dimension")
        count *= d  # both factors <= 2**40: no big-int work
        if count > MAX_ELEMENTS:
            raise _damaged(path, f"{t} has more than 2**40 elements")
    if not isinstance(offsets, list) or len(offsets) != 2 or any(type(o) is not int for o in offsets):
        raise _damaged(path, f"{t} has data_offsets {repr(offsets)[:40]}, not a list of two integers")
    begin, end = offsets
    if begin < 0 or end < begin:
        raise _damaged(path, f"{t} has data_offsets [{begin}, {end}] (need 0 <= begin <= end)")
    if end - begin != count * _DTYPE_SIZE[dtype]:
        raise _damaged(path, f"{t} has the wrong byte size ({end - begin} bytes for {count} {dtype} values)")
    return dtype, tuple(shape), begin, end


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate the JSON header of a .safetensors file and check that the data section is complete.

    Accepts what `safetensors.safe_open` accepts (known dtypes; tensors packed back to back from offset 0 and
    covering the data section exactly), within the caps above; anything else is a one-line `CheckpointError`.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path.name}: not a safetensors file (only {size} bytes); check that the download finished")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise CheckpointError(f"{path.name}: not a safetensors file (its first bytes are not a safetensors header); "
                                  "is it a .ckpt, a text or an HTML page saved under this name?")
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path.name}: safetensors header of {n / 2**20:.1f} MB, over the "
                                  f"{MAX_HEADER_BYTES // 2**20} MB limit (real checkpoint headers are under 1 MB); "
                                  "the file is damaged or not a checkpoint")
        raw = f.read(n)
    containers, colons, commas = raw.count(b"{") + raw.count(b"["), raw.count(b":"), raw.count(b",")
    if containers > MAX_CONTAINERS or colons > MAX_COLONS or commas > MAX_COMMAS:
        raise CheckpointError(f"{path.name}: safetensors header with {containers} objects/lists, {colons} colons and "
                              f"{commas} commas, more than a checkpoint of up to {MAX_TENSORS} tensors needs "
                              f"(limits {MAX_CONTAINERS}/{MAX_COLONS}/{MAX_COMMAS}); the file is damaged or not a "
                              "checkpoint")
    try:
        text = raw.decode("utf-8")
        if 0 < sys.get_int_max_str_digits() <= 5000:  # Python's default (4300) bounds the cost of each number
            header = json.loads(text)
        else:
            header = json.loads(text, parse_int=_parse_int_bounded)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path.name}: not a safetensors file (the header is not valid JSON); "
                              "is it a .ckpt, a text or an HTML page saved under this name?") from None
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _damaged(path, "__metadata__ is not a map of strings to strings")
    if len(header) > MAX_TENSORS:
        raise _damaged(path, f"{len(header)} tensors (a checkpoint has at most a few thousand; limit {MAX_TENSORS})")
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        dtype, shape, begin, end = _check_tensor(path, name, entry)
        infos[name] = TensorInfo(dtype, shape, 8 + n + begin)
        spans.append((begin, end, name))
    spans.sort()
    pos = 0  # safetensors packs tensors back to back from offset 0 (safe_open refuses gaps and overlaps)
    for begin, end, name in spans:
        if begin != pos:
            what = ("overlaps the previous tensor" if begin < pos
                    else f"starts at {begin}, after a gap (previous ends at {pos})")
            raise _damaged(path, f"tensor {_tensor_name(name)} {what}")
        pos = end
    data = size - 8 - n
    if pos > data:
        raise CheckpointError(f"{path.name}: truncated: the header describes {8 + n + pos} bytes but the file has "
                              f"{size}; the download or copy did not finish, get the file again")
    if pos < data:
        raise _damaged(path, f"{data - pos} bytes after the last tensor (the tensors cover {pos} of {data} data bytes)")
    return infos, meta


# How deep `state_dict` entries may nest in a .ckpt (real files: 1, Lightning's {"state_dict": {...}}).
MAX_STATE_DICT_NESTING = 8
# torch dtypes a checkpoint tensor may have: those of the safetensors dtypes above.
_TORCH_DTYPES = set(SAFETENSORS_DTYPES.values())


def _find_state_dict(obj: object) -> dict[str, Tensor]:
    """The tensor dict of a .ckpt: top level, or under (possibly nested, at most 8 levels) `state_dict`."""
    seen: set[int] = set()
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        seen.add(id(obj))
        obj = obj["state_dict"]
        if id(obj) in seen:
            raise CheckpointError("its 'state_dict' entries form a cycle (a dict that contains itself), which no "
                                  "training program writes; the file is damaged or was crafted")
        if len(seen) > MAX_STATE_DICT_NESTING:
            raise CheckpointError(f"its 'state_dict' entries are nested more than {MAX_STATE_DICT_NESTING} levels deep "
                                  "(real checkpoints: 1); the file is damaged or was crafted")
    if not isinstance(obj, dict):
        raise CheckpointError(f"holds a {type(obj).__name__}, not a dict of tensors")
    tensors: dict[str, Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            continue  # training state next to the weights (global_step, epoch, ...): not tensors of the model
        what = None
        if type(v) not in (torch.Tensor, torch.nn.Parameter):
            what = f"a {type(v).__name__}"
        elif v.is_nested or v.layout != torch.strided:
            what = "a sparse or nested tensor"
        elif v.is_quantized:
            what = "a quantized tensor"
        elif v.device.type != "cpu":
            what = f"a tensor on {v.device.type}"
        elif v.dtype not in _TORCH_DTYPES:
            what = f"a tensor of dtype {str(v.dtype).removeprefix('torch.')}"
        if what:
            raise CheckpointError(f"tensor {_tensor_name(k)} is {what}; only dense CPU tensors of the usual dtypes are "
                                  "loaded")
        tensors[k] = v.detach() if type(v) is not torch.Tensor else v
    if not tensors:
        raise CheckpointError("holds no tensors")
    return tensors


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message, printable characters only, at most 160 of them."""
    lines = str(e).strip().splitlines()
    line = lines[0] if lines else type(e).__name__
    return "".join(c if c.isprintable() else "?" for c in line)[:160]


def load_pickle(path: Path) -> object:
    """A .ckpt / .pt unpickled weights-only (torch.load(weights_only=True): tensors, dicts, lists, numbers and
    strings, no code); whatever goes wrong is a one-line CheckpointError naming the file. Textual-inversion .pt
    files (`string_to_param`) are read with it too."""
    path = Path(path)
    is_zip = zipfile.is_zipfile(path)
    if not is_zip:
        with open(path, "rb") as f:
            first = f.read(2)
        if not first or first[0] != 0x80:  # a pickle starts with the PROTO opcode
            raise CheckpointError(f"{path.name}: not a PyTorch checkpoint (neither a zip archive nor a pickle); "
                                  "check the file type and that the download finished")
    try:
        with warnings.catch_warnings():  # torch's warnings about a damaged pickle ("Detected pickle protocol 35")
            warnings.simplefilter("ignore")  # would be more lines beside the one-line error
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).strip().splitlines()]
        if any("Unsupported operand" in line for line in lines):  # an opcode no pickle has: damage, not code
            raise CheckpointError(f"{path.name}: cannot read this .ckpt (its pickle is damaged: {_first_line(e)}); "
                                  "the file is damaged or truncated, get it again") from None
        detail = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else "")
        raise CheckpointError(f"{path.name}: refused: the pickle asks to run code or build objects that are not plain "
                              f"tensors ({_first_line(ValueError(detail))}); only weights-only checkpoints are loaded, "
                              "convert it to .safetensors with a tool you trust") from None
    except Exception as e:  # noqa: BLE001 - torch.load parses untrusted bytes: whatever it raises, the file is bad
        # (seen in tests/test_fuzz_checkpoint.py: RuntimeError, EOFError, UnicodeDecodeError, IndexError, KeyError,
        # struct.error, AssertionError; also possible: zipfile errors, OSError, MemoryError, OverflowError, ...)
        raise CheckpointError(f"{path.name}: cannot read this .ckpt ({type(e).__name__}: {_first_line(e)}); the file "
                              "is damaged or truncated, get it again") from None
    return obj


def _load_ckpt(path: Path) -> dict[str, Tensor]:
    obj = load_pickle(path)
    try:
        return _find_state_dict(obj)
    except CheckpointError as e:
        raise CheckpointError(f"{path.name}: {e}; not a usable Stable Diffusion checkpoint") from None


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


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a whole file, read in 1 MiB blocks (A1111's model / VAE / TI hashes are prefixes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
