"""Textual-inversion embeddings (Gal et al. 2022, "An Image is Worth One Word: Personalizing Text-to-Image
Generation using Textual Inversion"): a file of learned token vectors, used in a prompt by its file name.

Files read (from the `embeddings/` folders of `sd.models_dir.extra_files("embedding", ...)`):
  A1111 `.pt`   {"string_to_param": {"*": (n, width)}, "string_to_token", "name", "step", ...}, unpickled weights
                only by `sd.checkpoint.load_pickle`;
  `.safetensors` {"emb_params": (n, width)} (A1111's own), or SDXL's {"clip_l": (n, 768), "clip_g": (n, 1280)};
  diffusers `learned_embeds.bin` / `.safetensors` with one tensor {"<token>": (width,) or (n, width)}.
On a two-tower model (SDXL) a tower takes `clip_l` if it is a transformers CLIP (CLIP-L), `clip_g` if OpenCLIP; a
single-vector file only fits a model with one text tower, an SDXL file only a two-tower one (as A1111 decides by
the expected width). The vectors' width must equal the tower's (else refused, naming the file).

How a prompt uses one (AUTOMATIC1111's `tokenize_line` + `EmbeddingsWithFixes`): each weighted fragment is
tokenized; where the tokens of an embedding's name appear (longest name first), its n vectors take n token
positions (ids 0 as placeholders, weight of the fragment); an embedding that does not fit in the rest of a 75-token
chunk starts the next chunk. The tower's token-embedding output at those positions is replaced by the vectors
(a forward hook, active for this thread only: the model's embedding table is never written).
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError, file_sha256, load_pickle, open_checkpoint
from .file_cache import FileCache
from .tokenizer import CHUNK_TOKENS, encode, tokenize_chunks, tokenize_weighted

Tensor = torch.Tensor


@dataclass(frozen=True)
class Embedding:
    """One embedding file: its name (the file stem: what a prompt writes) and vectors per tower kind."""

    name: str
    path: Path
    vectors: dict[str, Tensor]     # "clip_l" / "clip_g" / "" (one tower) -> (n, width) float32

    def for_tower(self, naming: str, n_towers: int) -> Tensor | None:
        """The vectors for a tower of `naming` ("hf" CLIP-L, "openclip"), or None when the file has none for it."""
        if "" in self.vectors:
            return self.vectors[""] if n_towers == 1 else None
        if n_towers < 2:   # an SDXL embedding fits the two-tower models only (A1111: its width is 768 + 1280)
            return None
        return self.vectors.get("clip_l" if naming == "hf" else "clip_g")


def embedding_hash(path: str | os.PathLike) -> str:
    """A1111's `TI hashes` value: the first 12 hex digits of the sha256 of the whole file."""
    return file_sha256(path)[:12]


def _as_vectors(t: object, path: Path, key: str) -> Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() not in (1, 2) or not t.is_floating_point() or t.numel() == 0:
        raise CheckpointError(f"{path.name}: {key} is not a (tokens, width) float tensor; not a textual-inversion "
                              "embedding")
    return t.detach().float().reshape(-1, t.shape[-1]).clone()   # (n, width)


def read_embedding(path: str | os.PathLike) -> Embedding:
    """Parse an embedding file. Raises CheckpointError (one line, naming the file) when it is not one."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        ckpt = open_checkpoint(path)
        obj: dict = {k: ckpt.get(k) for k in ckpt.infos}
    else:
        obj = load_pickle(path)
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path.name}: holds a {type(obj).__name__}, not a textual-inversion embedding")
    if isinstance(obj.get("string_to_param"), dict) and obj["string_to_param"]:
        vec = {"": _as_vectors(next(iter(obj["string_to_param"].values())), path, "string_to_param")}
    elif "emb_params" in obj:
        vec = {"": _as_vectors(obj["emb_params"], path, "emb_params")}
    elif "clip_l" in obj or "clip_g" in obj:
        vec = {k: _as_vectors(obj[k], path, k) for k in ("clip_l", "clip_g") if k in obj}
    else:
        tensors = [(k, v) for k, v in obj.items() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise CheckpointError(f"{path.name}: not a textual-inversion embedding (no string_to_param, emb_params, "
                                  "clip_l/clip_g or single token tensor); put embeddings in the embeddings folder")
        vec = {"": _as_vectors(tensors[0][1], path, tensors[0][0])}
    return Embedding(path.stem, path, vec)


_CACHE: FileCache[Embedding] = FileCache(read_embedding, 256)


def load_embedding(path: str | os.PathLike) -> Embedding:
    """read_embedding, cached by (path, size, mtime)."""
    return _CACHE.get(path)


# ------------------------------------------------------------------------------------------------ tokenizing


@dataclass
class Active:
    """The embeddings one request may use on one tower: name-token ids -> (embedding, vectors (n, width)); what the
    prompts actually used is collected in `used`."""

    by_tokens: dict[tuple[int, ...], tuple[Embedding, Tensor | None, str]]  # vectors None: refused, the reason
    used: dict[str, str]           # name -> short hash, in first-use order (shared by the request's towers)


def tokenize_with_embeddings(text: str, pad_token: int, active: Active | None, cleaning: str = "hf"
                             ) -> tuple[Tensor, Tensor, list[tuple[int, int, Tensor]]]:
    """sd.tokenizer.tokenize_chunks with the active embeddings found at their name tokens (the longest name first,
    as A1111): (tokens (N, 77), weights (N, 77), fixes [(chunk, position, vectors (n, width))]). Without active
    embeddings (or none named in the text) it is tokenize_weighted exactly."""
    if active is None or not active.by_tokens:
        t, w = tokenize_weighted(text, pad_token, cleaning)
        return t, w, []
    by_first: dict[int, list[tuple[tuple[int, ...], tuple[Embedding, Tensor]]]] = {}
    for ids, item in active.by_tokens.items():
        by_first.setdefault(ids[0], []).append((ids, item))
    for v in by_first.values():
        v.sort(key=lambda e: -len(e[0]))                                   # longest name first (A1111)

    def special(ids: list[int], i: int) -> tuple[int, Tensor] | None:
        hit = next(((k, item) for k, item in by_first.get(ids[i], ()) if tuple(ids[i:i + len(k)]) == k), None)
        if hit is None:
            return None
        key, (emb, vec, why) = hit
        if vec is None:
            raise ValueError(why)
        if vec.shape[0] > CHUNK_TOKENS:
            raise ValueError(f"embedding {emb.name} has {vec.shape[0]} vectors, more than the {CHUNK_TOKENS} tokens of "
                             "a chunk; it cannot be used")
        active.used.setdefault(emb.name, embedding_hash(emb.path))
        return len(key), vec

    return tokenize_chunks(text, pad_token, cleaning, special)


# ------------------------------------------------------------------------------------------------ applying

_ACTIVE: contextvars.ContextVar[dict[int, Active] | None] = contextvars.ContextVar("sd_embeddings", default=None)
_FIXES: contextvars.ContextVar[dict[int, list] | None] = contextvars.ContextVar("sd_embedding_fixes", default=None)
_HOOKS: dict[int, list] = {}
_HOOK_LOCK = threading.Lock()


def token_embedding(encoder: nn.Module) -> nn.Embedding:
    """The token-embedding table of a TextEncoder (transformers CLIP or OpenCLIP naming)."""
    if hasattr(encoder, "token_embedding"):
        return encoder.token_embedding
    return encoder.text_model.embeddings.token_embedding


def active_for(encoder: nn.Module) -> Active | None:
    """The embeddings this thread's request put on `encoder` (None: none)."""
    act = _ACTIVE.get()
    return act.get(id(encoder)) if act else None


def _emb_hook(module, args, out):
    fixes = (_FIXES.get() or {}).get(id(module))
    if not fixes:
        return out
    out = out.clone()                                                      # (N, 77, width)
    for row, pos, vec in fixes:
        out[row, pos:pos + vec.shape[0]] = vec.to(out.device, out.dtype)
    return out


@contextlib.contextmanager
def inserted(encoder: nn.Module, fixes: list[tuple[int, int, Tensor]]):
    """Within the block, this thread's forward of `encoder` has `fixes` [(row, position, vectors (n, width))] in
    its token-embedding output."""
    if not fixes:
        yield
        return
    table = token_embedding(encoder)
    with _HOOK_LOCK:
        entry = _HOOKS.get(id(table))
        if entry is None:
            _HOOKS[id(table)] = [table.register_forward_hook(_emb_hook), 1]
        else:
            entry[1] += 1
    token = _FIXES.set({**(_FIXES.get() or {}), id(table): fixes})
    try:
        yield
    finally:
        _FIXES.reset(token)
        with _HOOK_LOCK:
            entry = _HOOKS[id(table)]
            entry[1] -= 1
            if entry[1] == 0:
                entry[0].remove()
                del _HOOKS[id(table)]


def candidates(text: str, files: dict[str, Path]) -> list[Path]:
    """The listed embedding files whose name (stem) occurs in the text, case-insensitively (A1111 matches the name's
    tokens, and the tokenizer lower-cases: a superset of those, so only these files are read)."""
    low = text.lower()
    return [p for p in files.values() if p.stem.lower() in low]


@contextlib.contextmanager
def use_embeddings(encoders, paths: list[Path], label: str = "this model"):
    """Within the block, this thread's encode_prompt on `encoders` (a model's text towers) knows the embeddings of
    `paths`. Yields the dict {name: short hash} of those the prompts used. A prompt naming an embedding whose width
    does not fit a tower, or that has no vectors for any tower of the model, raises ValueError (one line, naming the
    file) when it is tokenized."""
    used: dict[str, str] = {}
    acts: dict[int, Active] = {}
    embs = [load_embedding(p) for p in paths]
    n = len(encoders)
    for emb in embs:
        ids = tuple(encode(emb.name))
        if not ids:
            continue
        placed = False
        for enc in encoders:
            vec = emb.for_tower(enc.cfg.naming, n)
            if vec is None:
                continue
            placed = True
            why = ""
            if vec.shape[1] != enc.cfg.width:
                vec, why = None, (f"{emb.path.name}: an embedding of {vec.shape[1]}-wide vectors, the text tower of "
                                  f"{label} is {enc.cfg.width} wide: it was made for another model; remove "
                                  f"{emb.name} from the prompt")
            acts.setdefault(id(enc), Active({}, used)).by_tokens[ids] = (emb, vec, why)
        if not placed:   # refused only where the prompt really names it (tokenize_with_embeddings raises)
            kinds = ", ".join(sorted(k or "one tower" for k in emb.vectors))
            why = (f"{emb.path.name}: an embedding for {kinds}, which {label} does not have ({n} text "
                   f"tower{'s' if n > 1 else ''}); remove {emb.name} from the prompt")
            for enc in encoders:
                acts.setdefault(id(enc), Active({}, used)).by_tokens[ids] = (emb, None, why)
    if not acts:
        yield used
        return
    token = _ACTIVE.set({**(_ACTIVE.get() or {}), **acts})
    try:
        yield used
    finally:
        _ACTIVE.reset(token)
