"""SD3 / SD3.5 text towers from the checkpoint or from separate files: where they are found, which one is used, and
loading them with one-line errors that name the file and what was expected.

SD3 (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", sec. 5.2)
conditions on CLIP-L, CLIP-G (OpenCLIP ViT-bigG) and T5-XXL. SD3 medium's `*_incl_clips(_t5xxlfp16)` files bundle
them (`text_encoders.{clip_l,clip_g,t5xxl}.transformer.*`); SD3.5 files carry only the MMDiT and the VAE, and the
towers are separate files, as ComfyUI and the SD3.5 reference code keep them.

Each role (clip_l, clip_g, t5xxl) is taken from, in this order:
  1. the checkpoint itself, when it bundles that tower;
  2. `--text-encoders DIR` (TextSources.folder);
  3. a `text_encoders/`, `clip/` (ComfyUI) or `text_encoder/` folder beside the checkpoint, or in the folder above
     it (the models folder of `models/checkpoints/x.safetensors`), or the one above that;
  4. diffusers' per-component files beside the checkpoint: `text_encoder/`, `text_encoder_2/`, `text_encoder_3/`
     `model.safetensors` (a sharded T5 is not read), with the tokenizer in `tokenizer_3/`.
File names: `clip_l.safetensors`, `clip_g.safetensors`, `t5xxl_fp16.safetensors` (preferred), `t5xxl_bf16`,
`t5xxl_fp8_e4m3fn`, `t5xxl.safetensors`. Keys are the towers' own names (CLIP: transformers' `text_model.*` +
`text_projection.weight`; T5: `encoder.*`, `shared.weight`), optionally under the bundle prefix.

The T5 tokenizer (a sentencepiece `spiece.model`, or a tokenizers `tokenizer.json`) is `--t5-tokenizer PATH`, else
found beside the T5 file, in the text-encoder folders, or beside the checkpoint. Without T5 (no file, no
tokenizer, or `--no-t5`) SD3 runs on CLIP-L/G alone and the notes say so.

Memory (T5-XXL alone is 9.5 GB in fp16): each tower carries a `Resident` (`tower.resident`) that loads its weights
from the (mmap'd) file when a request encodes with it and drops them again (every tensor set to the meta device, the
module object kept) once the prompts are encoded, so no text tower is resident while the MMDiT samples; at load time
the towers are only checked, on the meta device. `TextSources.keep` (`--keep-text-encoders`) keeps them loaded
instead; `TextSources.t5_device` (`--t5-device cpu`) puts T5 on another device than the MMDiT (its output is moved to
the MMDiT's). Reloading runs the same code on the same tensors, so results are bit-identical either way.

CLIP-L and CLIP-G cannot be told apart by key names (both are transformers CLIP text models); the pair is checked
against the MMDiT it feeds: CLIP-L's pooled output (unprojected) + CLIP-G's projected pooled output must be the
MMDiT's vector width, their hidden widths must fit in its context width, and CLIP-G needs a text projection.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .checkpoint import CheckpointError, open_checkpoint
from .config import TextEncoderConfig
from .sd3_text import CLIP_G_PREFIX, CLIP_L_PREFIX, T5_PREFIX, load_sd3_clip
from .t5 import EOS, PAD, SentencePieceTokenizer, build_t5, load_t5, load_t5_tokenizer, t5_config_for

Tensor = torch.Tensor
Shapes = dict[str, tuple[int, ...]]

ROLES = ("clip_l", "clip_g", "t5xxl")
PREFIX = {"clip_l": CLIP_L_PREFIX, "clip_g": CLIP_G_PREFIX, "t5xxl": T5_PREFIX}
LABEL = {"clip_l": "CLIP-L (OpenAI CLIP ViT-L/14 text encoder)", "clip_g": "CLIP-G (OpenCLIP ViT-bigG/14 text encoder)",
         "t5xxl": "T5-XXL encoder"}
FILE_NAMES = {"clip_l": ("clip_l.safetensors",), "clip_g": ("clip_g.safetensors",),
              "t5xxl": ("t5xxl_fp16.safetensors", "t5xxl_bf16.safetensors", "t5xxl_fp8_e4m3fn.safetensors",
                        "t5xxl_fp8_e4m3fn_scaled.safetensors", "t5xxl.safetensors")}
FOLDER_NAMES = ("text_encoders", "clip", "text_encoder")
# diffusers' per-component folders (a pipeline folder beside the checkpoint): one model.safetensors each
DIFFUSERS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"}
TOKENIZER_NAMES = ("spiece.model", "tokenizer.json")
TOKENIZER_FOLDERS = ("tokenizer_3",)   # diffusers' T5 tokenizer folder
WHERE = ("in a text_encoders/ (or ComfyUI clip/) folder beside the checkpoint or in the models folder, "
         "or give --text-encoders DIR")


@dataclass(frozen=True)
class TextSources:
    """Where the caller says the separate text parts are (CLI flags); hashable, part of the model cache key."""

    folder: str | None = None          # --text-encoders DIR: searched before the folders near the checkpoint
    t5_tokenizer: str | None = None    # --t5-tokenizer PATH: spiece.model / tokenizer.json, or a folder with one
    t5: bool = True                    # False (--no-t5): T5 is not even loaded
    bert_vocab: str | None = None      # --bert-vocab PATH: BERT's uncased vocab.txt for the LDM text models
    keep: bool = False                 # True (--keep-text-encoders): the towers stay loaded between requests
    t5_device: str | None = None       # --t5-device cpu: T5 on this device (None: the MMDiT's)


class T5Tower(nn.Module):
    """T5-XXL (transformers T5EncoderModel) with its sentencepiece tokenizer, as one text tower."""

    def __init__(self, model: nn.Module, tokenizer: SentencePieceTokenizer):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer


# ----------------------------------------------------------------------------------------------- residency


def _tensors(module: nn.Module):
    for mod in module.modules():
        yield from (t for t in mod._parameters.values() if t is not None)
        yield from (t for t in mod._buffers.values() if t is not None)


def _transplant(src: nn.Module, dst: nn.Module) -> None:
    """`dst` takes every parameter and buffer (persistent or not) of `src`, a module of the same architecture;
    a submodule shared in `dst` (T5's tied embedding) is filled once and stays shared."""
    for name, mod in dst.named_modules():
        other = src.get_submodule(name)
        for k in mod._parameters:
            mod._parameters[k] = other._parameters[k]
        for k in mod._buffers:
            mod._buffers[k] = other._buffers[k]


def _drop(module: nn.Module) -> None:
    """Every tensor of `module` replaced by a meta tensor of its shape and dtype: the memory is freed, the module
    object (and whatever refers to it) stays."""
    for mod in module.modules():
        for k, p in mod._parameters.items():
            if p is not None:
                mod._parameters[k] = nn.Parameter(p.to("meta"), requires_grad=False)
        for k, b in mod._buffers.items():
            if b is not None:
                mod._buffers[k] = b.to("meta")


class Resident:
    """When one text tower's weights are in memory: loaded by `load()` (a fresh module from the file) when a request
    uses the tower, dropped after the last user is done unless `keep`. Thread-safe: concurrent requests share one
    load. `own`: the family's conditioner loads the tower itself (`load_tower`: SD3, one tower at a time), so the
    shared `use` (sd.pipeline.loaded around a whole conditioning) passes it through untouched."""

    def __init__(self, module: nn.Module, load: Callable[[], nn.Module], keep: bool, own: bool = False):
        self.module, self.load, self.keep, self.own = module, load, keep, own
        self._lock = threading.Lock()
        self._users = 0

    @property
    def loaded(self) -> bool:
        return not any(t.is_meta for t in _tensors(self.module))

    @contextmanager
    def use(self):
        with self._lock:
            if not self.loaded:
                _transplant(self.load(), self.module)
            self._users += 1
        try:
            yield self.module
        finally:
            with self._lock:
                self._users -= 1
                if not self._users and not self.keep:
                    _drop(self.module)


def use(tower: nn.Module):
    """`with use(tower) as module:` the tower with its weights loaded for the block (a tower without a Resident, as
    in tests that build towers by hand, is used as it is; one its conditioner loads itself is passed through)."""
    res = getattr(tower, "resident", None)
    return res.use() if res is not None and not res.own else nullcontext(tower)


def load_tower(tower: nn.Module):
    """`with load_tower(tower) as module:` what a conditioner that loads its own towers uses (SD3: each tower only
    for its own prompts, so at most one is in memory)."""
    res = getattr(tower, "resident", None)
    return res.use() if res is not None else nullcontext(tower)


def resident(towers) -> list[bool]:
    """Which of `towers` hold their weights now."""
    return [getattr(t, "resident", None) is None or t.resident.loaded for t in towers]


def _meta_tensors(obj, prefix: str) -> dict[str, Tensor]:
    """The file's tensors under `prefix` as meta tensors (shapes only, nothing read): for checking a file."""
    return {k[len(prefix):]: torch.empty(s, device="meta") for k, s in obj.shapes().items() if k.startswith(prefix)}


def _fresh(obj):
    """A new handle on the checkpoint's file: the tensors a load reads hold its mapping, so the mapping (and the
    file pages it keeps in the resident set) goes when the tower is dropped, not when the model is."""
    return open_checkpoint(obj.path)


def _load_clip(obj, prefix: str, cfg: TextEncoderConfig, device, dtype, meta: bool = False) -> nn.Module:
    # built in `dtype`: the file's tensors are cast once, straight to it (no float32 copy of CLIP-G on the way)
    enc = load_sd3_clip(_meta_tensors(obj, prefix) if meta else _fresh(obj).tensors(prefix), cfg, dtype=dtype)
    return enc.to(device="meta" if meta else device, dtype=dtype).eval().requires_grad_(False)


def _load_t5(obj, prefix: str, tok: SentencePieceTokenizer, device, dtype, meta: bool = False) -> "T5Tower":
    t5 = load_t5(_meta_tensors(obj, prefix) if meta else _fresh(obj).tensors(prefix),
                 device="meta" if meta else device, dtype=dtype)
    return T5Tower(t5.requires_grad_(False), tok)


def _resident(load: Callable[..., nn.Module], keep: bool) -> nn.Module:
    """The tower `load` builds: loaded now (keep), or checked on the meta device and loaded on first use (by the SD3
    conditioner, one tower at a time: `own`)."""
    tower = load(meta=not keep)
    tower.resident = Resident(tower, load, keep, own=True)
    return tower


def check_device(name: str | None, flag: str = "t5_device") -> str | None:
    """A device name checked by torch (None stays None); ValueError in one line otherwise."""
    if name is None:
        return None
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"{flag} {name}: not a torch device (cpu, cuda, cuda:1, mps)") from None
    return name


# ----------------------------------------------------------------------------------------------- finding files


def search_folders(checkpoint: Path, sources: TextSources) -> list[Path]:
    """The folders looked in for separate text-encoder files, in order (existing ones only)."""
    out: list[Path] = []
    if sources.folder:
        given = Path(sources.folder)
        if not given.is_dir():
            raise FileNotFoundError(f"--text-encoders {sources.folder}: no such folder")
        out.append(given)
    base = Path(checkpoint).parent
    for up in (base, base.parent, base.parent.parent):
        out += [up / name for name in FOLDER_NAMES if (up / name).is_dir()]
    seen, unique = set(), []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def find_file(role: str, folders: list[Path], checkpoint: Path | None = None) -> Path | None:
    """The first file named for `role` in `folders` (folder order first, then the names' preference); else
    diffusers' `text_encoder{,_2,_3}/model.safetensors` beside the checkpoint (a sharded T5 is not read)."""
    for folder in folders:
        for name in FILE_NAMES[role]:
            if (folder / name).is_file():
                return folder / name
    if checkpoint is not None and (Path(checkpoint).parent / DIFFUSERS[role] / "model.safetensors").is_file():
        return Path(checkpoint).parent / DIFFUSERS[role] / "model.safetensors"
    return None


def find_t5_tokenizer(t5_file: Path | None, folders: list[Path], checkpoint: Path,
                      sources: TextSources) -> Path | None:
    """--t5-tokenizer, else spiece.model / tokenizer.json beside the T5 file, in the folders, beside the checkpoint."""
    if sources.t5_tokenizer:
        p = Path(sources.t5_tokenizer)
        if not p.exists():
            raise FileNotFoundError(f"--t5-tokenizer {sources.t5_tokenizer}: no such file or folder")
        return p
    dirs = ([t5_file.parent] if t5_file is not None else []) + folders + [Path(checkpoint).parent]
    dirs += [Path(checkpoint).parent / name for name in TOKENIZER_FOLDERS]
    for d in dirs:
        for name in TOKENIZER_NAMES:
            if (d / name).is_file():
                return d / name
    return None


def open_t5_tokenizer(path: Path) -> SentencePieceTokenizer:
    """The T5 tokenizer at `path`, checked: a sentencepiece model or tokenizer.json whose id 1 is </s> (T5's EOS).
    Raises ValueError naming the file and what was expected."""
    expected = "expected T5's sentencepiece model (spiece.model) or its tokenizers tokenizer.json"
    try:
        tok = load_t5_tokenizer(path)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - sentencepiece / tokenizers raise RuntimeError, OSError, ...
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise ValueError(f"{Path(path).name}: not a T5 tokenizer ({reason}); {expected}") from None
    if _piece(tok, EOS) != "</s>" or _piece(tok, PAD) not in ("<pad>", None):
        raise ValueError(f"{tok.path.name}: a tokenizer, but not T5's (id {EOS} is {_piece(tok, EOS)!r}, not '</s>'); "
                         f"{expected}")
    return tok


def _piece(tok: SentencePieceTokenizer, i: int) -> str | None:
    if str(tok.path).endswith(".json"):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(tok.path)).id_to_token(i)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok.path))
    return sp.id_to_piece(i) if i < sp.get_piece_size() else None


# ----------------------------------------------------------------------------------------------- configs from shapes


def has_role(shapes: Shapes, role: str, prefix: str | None = None) -> bool:
    p = PREFIX[role] if prefix is None else prefix
    key = "shared.weight" if role == "t5xxl" else "embeddings.token_embedding.weight"
    return any(k.startswith(p) and k.endswith(key) for k in shapes)


def clip_config(shapes: Shapes, role: str, prefix: str) -> TextEncoderConfig:
    """An SD3 CLIP tower read from shapes: penultimate layer without the final LN, pooled output kept; CLIP-L
    pads with EOT and its pooled output is not projected (a text_projection in the file is unused); CLIP-G pads
    with 0, uses GELU and projects its pooled output. Heads: width / 64 (ViT-L/14: 12, bigG: 20)."""
    base = prefix + ("text_model." if prefix + "text_model.embeddings.token_embedding.weight" in shapes else "")
    if base + "embeddings.token_embedding.weight" not in shapes:
        raise ValueError(f"not a CLIP text encoder: no {base}embeddings.token_embedding.weight")
    vocab, width = shapes[base + "embeddings.token_embedding.weight"]
    layers = len({k[len(base):].split(".")[2] for k in shapes if k.startswith(base + "encoder.layers.")})
    proj = shapes.get(prefix + "text_projection.weight")
    g = role == "clip_g"
    return TextEncoderConfig(
        naming="hf", prefix=prefix, width=width, layers=layers, heads=max(1, width // 64),
        mlp=shapes[base + "encoder.layers.0.mlp.fc1.weight"][0], act="gelu" if g else "quick_gelu", vocab_size=vocab,
        context_length=shapes[base + "embeddings.position_embedding.weight"][0],
        projection_dim=proj[0] if g and proj else 0, pad_token=0 if g else 49407, layer="penultimate",
        final_ln=False, output_pooled=True)


def bundled_configs(shapes: Shapes) -> tuple[TextEncoderConfig, ...]:
    """The CLIP towers a checkpoint bundles, CLIP-L first (none, or both)."""
    if not (has_role(shapes, "clip_l") and has_role(shapes, "clip_g")):
        return ()
    return tuple(clip_config(shapes, r, PREFIX[r]) for r in ("clip_l", "clip_g"))


def t5_tensors(shapes: Shapes, prefix: str = T5_PREFIX) -> dict[str, tuple[int, ...]]:
    """{full key: shape} of a T5 encoder under `prefix` (meta device), for key accounting; {} if there is none.
    The embedding is `shared.weight`; `encoder.embed_tokens.weight` too when the file has it (tied)."""
    if prefix + "shared.weight" not in shapes and prefix + "encoder.embed_tokens.weight" not in shapes:
        return {}
    full = dict(shapes)
    full.setdefault(prefix + "shared.weight", shapes.get(prefix + "encoder.embed_tokens.weight"))
    model = build_t5(t5_config_for(full, prefix), device="meta")
    keep = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    if prefix + "encoder.embed_tokens.weight" in shapes:
        keep["encoder.embed_tokens.weight"] = keep["shared.weight"]
    return {prefix + k: s for k, s in keep.items()}


# ----------------------------------------------------------------------------------------------- loading


@dataclass
class TextParts:
    """What `load_sd3_text` decided: the towers [CLIP-L, CLIP-G(, T5Tower)], their configs, and notes in plain
    words (which file each came from; why T5 is not used)."""

    modules: list[nn.Module]
    configs: tuple[TextEncoderConfig, ...]
    notes: tuple[str, ...]


def _file_prefix(shapes: Shapes, role: str) -> str:
    """A separate file's keys may be bare or under the bundle prefix."""
    return PREFIX[role] if any(k.startswith(PREFIX[role]) for k in shapes) else ""


def _where(path: Path, checkpoint: Path) -> str:
    """A file's place relative to the checkpoint's folder where possible (no absolute paths in messages)."""
    for base in (checkpoint.parent, checkpoint.parent.parent, checkpoint.parent.parent.parent):
        try:
            return path.relative_to(base).as_posix()
        except ValueError:
            continue
    return path.name


def load_sd3_text(ckpt, context_dim: int, adm: int, sources: TextSources | None = None, device="cpu",
                  dtype=torch.float32) -> TextParts:
    """Load CLIP-L, CLIP-G and (when found, with a tokenizer, and wanted) T5-XXL for an MMDiT of `context_dim` /
    `adm` widths, from the checkpoint `ckpt` (sd.checkpoint.Checkpoint) or separate files. Raises CheckpointError
    (a missing or wrong CLIP file, a T5 of the wrong width) or ValueError (a bad tokenizer), one line each."""
    sources = sources or TextSources()
    path = Path(ckpt.path)
    shapes = ckpt.shapes()
    folders: list[Path] | None = None
    notes: list[str] = []

    def source(role: str):
        """(checkpoint object, key prefix, file shown in messages, note) of a role, or None when not found."""
        nonlocal folders
        if has_role(shapes, role):
            return ckpt, PREFIX[role], path.name, f"{LABEL[role].split(' ')[0]} from the checkpoint"
        if folders is None:
            folders = search_folders(path, sources)
        f = find_file(role, folders, path)
        if f is None:
            return None
        other = open_checkpoint(f)  # a damaged file: CheckpointError naming it
        return other, _file_prefix(other.shapes(), role), f.name, f"{LABEL[role].split(' ')[0]} from {_where(f, path)}"

    towers, configs = [], []
    for role in ("clip_l", "clip_g"):
        src = source(role)
        if src is None:
            raise CheckpointError(f"{path.name}: the {LABEL[role]} is missing: put {FILE_NAMES[role][0]} {WHERE}")
        obj, prefix, name, note = src
        fs = obj.shapes()
        try:
            cfg = clip_config(fs, role, prefix)
        except (ValueError, KeyError):
            raise CheckpointError(f"{name}: not a CLIP text encoder (no text_model.embeddings.token_embedding."
                                  f"weight); expected the {LABEL[role]}") from None
        configs.append((cfg, name, obj, prefix))
        notes.append(note)
    (lcfg, lname, _, _), (gcfg, gname, _, _) = configs
    if not gcfg.projection_dim:
        raise CheckpointError(f"{gname}: expected the {LABEL['clip_g']}, which has a text_projection.weight; this "
                              "file has none (a CLIP-L file where CLIP-G belongs?)")
    if lcfg.width + gcfg.projection_dim != adm:
        raise CheckpointError(
            f"{gname}: expected the {LABEL['clip_g']} whose pooled output completes the MMDiT's {adm}-wide vector "
            f"after CLIP-L's {lcfg.width} ({adm - lcfg.width} wide); this file gives {gcfg.projection_dim} "
            f"({gcfg.layers} layers of {gcfg.width}: a CLIP-L file where CLIP-G belongs?)")
    if lcfg.width + gcfg.width > context_dim:
        raise CheckpointError(f"{lname} + {gname}: CLIP widths {lcfg.width} + {gcfg.width} exceed the MMDiT's "
                              f"context width {context_dim}; expected CLIP-L and CLIP-G of this model")
    for cfg, name, obj, prefix in configs:
        try:
            towers.append(_resident(partial(_load_clip, obj, prefix, cfg, device, dtype), sources.keep))
        except ValueError as e:
            raise CheckpointError(f"{name}: {str(e).splitlines()[0][:300]}") from None
    out_cfgs = [cfg for cfg, *_ in configs]
    used, notes = notes, []    # "CLIP-L from ...": one line for all; the fallbacks in lines of their own

    def done() -> TextParts:
        return TextParts(towers, tuple(out_cfgs), ("text encoders: " + "; ".join(used), *notes))

    if not sources.t5:
        notes.append("T5-XXL off (--no-t5): running on CLIP-L/G alone; prompts are followed less closely")
        return done()
    src = source("t5xxl")
    if src is None:
        notes.append(f"no T5-XXL found (t5xxl_fp16.safetensors {WHERE}): running on CLIP-L/G alone; prompts are "
                     "followed less closely")
        return done()
    obj, prefix, name, note = src
    t5_file = None if obj is ckpt else Path(obj.path)
    tok_path = find_t5_tokenizer(t5_file, folders if folders is not None else search_folders(path, sources), path,
                                 sources)
    if tok_path is None:
        notes.append(f"T5-XXL found ({name}) but no T5 tokenizer (spiece.model or tokenizer.json beside it, or "
                     "--t5-tokenizer PATH; `python -m sd download` fetches it): running on CLIP-L/G alone")
        return done()
    tok = open_t5_tokenizer(tok_path)
    t5_device = sources.t5_device if sources.t5_device is not None else device
    try:
        tower = _resident(partial(_load_t5, obj, prefix, tok, t5_device, dtype), sources.keep)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{name}: {str(e).splitlines()[0][:200]}; expected the {LABEL['t5xxl']}") from None
    t5 = tower.model
    width = t5.config.d_model
    if width != context_dim:
        raise CheckpointError(f"{name}: a T5 encoder {width} wide, but the MMDiT's context is {context_dim} wide; "
                              f"expected the {LABEL['t5xxl']} of this model")
    if len(tok.encode("a")) and max(tok.encode("a photo")) >= t5.config.vocab_size:
        raise ValueError(f"{tok.path.name}: its ids exceed the T5 vocabulary ({t5.config.vocab_size}); expected "
                         "T5's own spiece.model")
    on = f", on {torch.device(t5_device)}" if torch.device(t5_device) != torch.device(device) else ""
    used.append(f"{note} (tokenizer {_where(Path(tok.path), path)}{on})")
    towers.append(tower)
    return done()


__all__ = ["TextSources", "T5Tower", "TextParts", "Resident", "use", "load_tower", "resident", "check_device",
           "load_sd3_text", "search_folders", "find_file",
           "find_t5_tokenizer", "open_t5_tokenizer", "clip_config", "bundled_configs", "t5_tensors", "has_role"]
