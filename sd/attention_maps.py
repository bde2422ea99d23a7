"""Cross-attention maps of one generation, per prompt token (DAAM: Tang et al. 2022, "What the DAAM: Interpreting
Stable Diffusion Using Cross Attention").

For a UNet (SD1 / SD2 / SDXL) every `attn2` (the cross-attention of each BasicTransformerBlock) gives, per image
position, softmax(q k^T / sqrt(d)) over the context tokens; DAAM sums those probabilities over the heads and the
layers (each layer's map upsampled bilinearly to the latent size) and averages them over the denoiser evaluations,
of the conditional branch only. For an MMDiT (SD3 / 3.5) the attention is joint: each image query's softmax runs
over [text tokens; image tokens]; its image-to-text part is the map of each text token, and the mass the query
gives the image tokens is kept as one extra entry "(image tokens)", so the entries still sum to the total.

Recording is off unless asked for: `record(model, params)` registers forward hooks on the model's attention
modules for the duration of the `with` block only, and they act only on the thread that opened it (a request of
another thread on the same cached model is not recorded and not mixed in). A hook only reads: it recomputes q and
k from the module's own inputs (through the module's own projections, so LoRA deltas of this thread are included)
and returns nothing, so the generation is bit-identical with or without recording; without it no hook exists and
the attention code runs exactly as it does today.

Which rows of a network call are the conditional branch follows `sd.guidance.cfg_denoiser` (and `sd.slg`): a
batched call stacks [cond; uncond] (2B rows: the first B are cond); unguided calls (CFG 1) are cond; when the two
branches cannot be stacked (contexts of different lengths) the cond call comes first and the uncond call follows on
the same x, so the context length and the repeated x identify them. SD3.5's skip-layer pass (`skip_layers` given)
is not recorded.
"""
from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Tensor = torch.Tensor

IMAGE_ENTRY = "(image tokens)"   # MMDiT: the extra entry holding the mass given to image tokens


@dataclass(frozen=True)
class Word:
    """A prompt word made of one or more consecutive BPE tokens, with its A1111 weight."""

    text: str
    positions: tuple[int, ...]   # indices into AttentionMaps.tokens
    weight: float


@dataclass
class AttentionMaps:
    """The recorded maps of one run. `maps` (B, T, h, w) at the latent size; at every position the T entries sum
    to `total` (the number of (layer, head) pairs recorded), up to float rounding."""

    maps: Tensor                     # (B, T, h, w) float32, CPU
    tokens: list[str]                # (T,) what each context position holds: "<start>", "red", "<end>", "<pad>", ...
    weights: list[float]             # (T,) the A1111 weight of each position (1.0 for start / end / padding)
    words: list[Word]
    total: float                     # sum over the T entries at every position
    evaluations: int                 # conditional network calls averaged over (one per denoiser evaluation)
    layers: int                      # attention layers recorded
    network: str = "unet"
    notes: list[str] = field(default_factory=list)

    def token_map(self, index: int, batch: int = 0) -> Tensor:
        """(h, w) map of one context position."""
        return self.maps[batch, index]

    def word_map(self, word: Word, batch: int = 0) -> Tensor:
        """(h, w): the sum of the word's token maps (the attention mass the word receives)."""
        return self.maps[batch, list(word.positions)].sum(0)

    def prompt_entries(self) -> list[int]:
        """Positions of prompt tokens (not start / end / padding / T5 / the image entry)."""
        return [i for w in self.words for i in w.positions]

    def summary(self) -> dict:
        """JSON-ready description: tokens with their weights, words with their positions and weights."""
        return {"network": self.network, "total": self.total, "evaluations": self.evaluations, "layers": self.layers,
                "tokens": [{"index": i, "token": t, "weight": round(w, 6)} for i, (t, w) in
                           enumerate(zip(self.tokens, self.weights))],
                "words": [{"word": w.text, "positions": list(w.positions), "weight": round(w.weight, 6)}
                          for w in self.words], "notes": self.notes}


# ----------------------------------------------------------------------------------------------------
# recording


class _Recorder:
    """Hooks and accumulators of one recording (no state outside this object)."""

    def __init__(self, net: torch.nn.Module, network: str, batch: int, guided: bool, latent_hw: tuple[int, int],
                 patch: int = 1):
        self.net, self.network, self.batch, self.guided = net, network, batch, guided
        self.hw = latent_hw
        self.patch = patch
        self.owner = threading.get_ident()
        self.rows: slice | None = None      # cond rows of the current network call; None: do not record it
        self.cond_len: int | None = None    # context length of the cond branch when it runs unstacked
        self.last_x: Tensor | None = None   # the x of the last unstacked cond call (its uncond call follows on it)
        self.acc: dict[tuple[int, int], Tensor] = {}   # (h_l, w_l) -> (B, T, h_l, w_l) float64 sums
        self.evaluations = 0
        self.layers: set[int] = set()
        self.handles: list = []
        self.skipped = 0

    # the network call: decide which rows are the conditional branch
    def _pre(self, module, args, kwargs) -> None:
        if threading.get_ident() != self.owner:
            return
        x = args[0]
        ctx = kwargs.get("context", args[2] if len(args) > 2 else None)
        self.rows = None
        if ctx is None or tuple(x.shape[-2:]) != self.hw or kwargs.get("skip_layers"):
            self.skipped += ctx is not None and tuple(x.shape[-2:]) != self.hw
            return
        n, b = x.shape[0], self.batch
        if n == 2 * b and self.guided:
            self.rows = slice(0, b)
        elif n == b:
            if self.guided:   # unstacked branches: the cond call comes first (its length names it afterwards),
                if self.cond_len is None:   # then the uncond one on the same x
                    self.cond_len = ctx.shape[1]
                if ctx.shape[1] != self.cond_len or (self.last_x is not None and torch.equal(x, self.last_x)):
                    self.last_x = None
                    return
                self.last_x = x.detach()
            self.rows = slice(0, b)
        else:
            return
        self.evaluations += 1

    def _add(self, layer: int, probs_sum: Tensor, grid: tuple[int, int]) -> None:
        """probs_sum (B, L, T) summed over heads, L = grid h * w."""
        b, _, t = probs_sum.shape
        m = probs_sum.transpose(1, 2).reshape(b, t, *grid).double().cpu()   # (B, T, h_l, w_l), summed in float64
        if grid in self.acc:
            if self.acc[grid].shape[1] != t:
                raise ValueError("the context length changed during the run; attention maps cannot be recorded")
            self.acc[grid] += m
        else:
            self.acc[grid] = m
        self.layers.add(layer)

    def _grid_of(self, length: int) -> tuple[int, int] | None:
        """The UNet level (h_l, w_l) whose size is `length`: each level halves, rounding up (stride-2 conv) or
        down (the average pooling of resblock_updown UNets)."""
        level = {self.hw}
        while level:
            for h, w in level:
                if h * w == length:
                    return h, w
            level = {(f(h), f(w)) for h, w in level if h * w > 1
                     for f in (lambda v: -(-v // 2), lambda v: max(1, v // 2))}
        return None

    def _attn2(self, layer: int):
        def hook(module, args, out) -> None:
            if threading.get_ident() != self.owner or self.rows is None:
                return
            x, ctx = args[0], args[1] if len(args) > 1 else None
            if ctx is None:
                return
            grid = self._grid_of(x.shape[1])
            if grid is None:
                return
            with torch.no_grad():
                q = module.to_q(x[self.rows])                     # (B, L, H*d)
                k = module.to_k(ctx[self.rows].to(x.dtype))       # (B, T, H*d)
                heads = module.heads
                d = q.shape[-1] // heads
                q = q.float().reshape(q.shape[0], q.shape[1], heads, d)   # (B, L, H, d)
                k = k.float().reshape(k.shape[0], k.shape[1], heads, d)   # (B, T, H, d)
                total = None
                for h in range(heads):   # one head at a time bounds the memory to (B, L, T)
                    p = (q[:, :, h] @ k[:, :, h].transpose(1, 2) / math.sqrt(d)).softmax(-1)   # (B, L, T)
                    total = p if total is None else total + p
                self._add(layer, total, grid)
        return hook

    def _joint(self, layer: int):
        def hook(module, args, out) -> None:
            if threading.get_ident() != self.owner or self.rows is None:
                return
            context, x, c = args[0], args[1], args[2]
            gh, gw = -(-self.hw[0] // self.patch), -(-self.hw[1] // self.patch)
            with torch.no_grad():
                (_, kc, _), _ = module.context_block.pre(context[self.rows], c[self.rows])   # (B, Lc, H, d)
                (qx, kx, _), _ = module.x_block.pre(x[self.rows], c[self.rows])              # (B, Lx, H, d)
                lc = kc.shape[1]
                k = torch.cat([kc, kx], dim=1).float()                                        # (B, Lc + Lx, H, d)
                q = qx.float()
                d = q.shape[-1]
                total = None
                for h in range(q.shape[2]):
                    p = (q[:, :, h] @ k[:, :, h].transpose(1, 2) / math.sqrt(d)).softmax(-1)  # (B, Lx, Lc + Lx)
                    p = torch.cat([p[..., :lc], p[..., lc:].sum(-1, keepdim=True)], dim=-1)    # (B, Lx, Lc + 1)
                    total = p if total is None else total + p
                self._add(layer, total, (gh, gw))
        return hook

    def __enter__(self) -> "_Recorder":
        if self.network == "mmdit":
            blocks = list(self.net.joint_blocks)
            for i, blk in enumerate(blocks):
                self.handles.append(blk.register_forward_hook(self._joint(i)))
        else:
            attn = [m for name, m in self.net.named_modules() if name.endswith(".attn2")]
            if not attn:
                raise ValueError("this network has no cross-attention (attn2) layers: no attention maps to record")
            for i, m in enumerate(attn):
                self.handles.append(m.register_forward_hook(self._attn2(i)))
        self.handles.append(self.net.register_forward_pre_hook(self._pre, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def maps(self) -> Tensor:
        """(B, T, h, w) at the latent size, summed over layers and heads, averaged over evaluations."""
        if not self.acc or not self.evaluations:
            raise ValueError("no attention was recorded (the run made no conditional network call)")
        out = None
        for grid, m in self.acc.items():
            up = m if grid == self.hw else F.interpolate(m, size=self.hw, mode="bilinear", align_corners=False)
            out = up if out is None else out + up
        return (out / self.evaluations).float()


def _heads_total(net: torch.nn.Module, network: str) -> int:
    """Sum over the recorded layers of their heads: what the entries sum to at every position."""
    if network == "mmdit":
        return sum(b.x_block.attn.heads for b in net.joint_blocks)
    return sum(m.heads for name, m in net.named_modules() if name.endswith(".attn2"))


@contextlib.contextmanager
def record(model, p):
    """Record the attention of every generation of `model` (a LoadedModel) with request `p` that this thread runs
    inside the block. Yields a callable returning the AttentionMaps once the run is done."""
    spec = model.spec
    network = spec.network
    f = spec.latent.factor
    patch = getattr(spec.unet, "patch_size", 1)
    rec = _Recorder(model.parts.unet, network, p.batch_size, guided=p.cfg != 1.0,
                    latent_hw=(p.height // f, p.width // f), patch=patch)
    with rec:
        def result() -> AttentionMaps:
            maps = rec.maps()
            tokens, weights = token_labels(model, p, maps.shape[1])
            notes = []
            if rec.skipped:
                notes.append(f"{rec.skipped} network calls on tiles were not recorded")
            return AttentionMaps(maps=maps, tokens=tokens, weights=weights, words=words_of(tokens, weights),
                                 total=float(_heads_total(model.parts.unet, network)),
                                 evaluations=rec.evaluations, layers=len(rec.layers), network=network, notes=notes)
        yield result


def generate_with_maps(model, p, callback=None, stop=None):
    """sd.pipeline.generate with the attention recorded: (GenerateResult, AttentionMaps)."""
    from .pipeline import generate

    with record(model, p) as result:
        res = generate(model, p, callback=callback, stop=stop)
    return res, result()


# ----------------------------------------------------------------------------------------------------
# tokens and words


@lru_cache(maxsize=1)
def _symbols() -> dict[int, str]:
    """BPE id -> its text (bytes decoded, `</w>` kept as a trailing marker)."""
    from .tokenizer import _tables

    ids, _, byte_chars = _tables()
    back = {c: b for b, c in byte_chars.items()}
    out = {}
    for sym, i in ids.items():
        end = sym.endswith("</w>")
        core = sym[:-4] if end else sym
        try:
            text = bytes(back[ch] for ch in core).decode("utf-8", errors="replace")
        except KeyError:
            text = core
        out[i] = text + ("</w>" if end else "")
    return out


def token_text(token_id: int) -> str:
    """The text of one BPE token, `</w>` marking a word end."""
    return _symbols().get(int(token_id), f"#{int(token_id)}")


def _label_chunk(ids: list[int], ws: list[float]) -> tuple[list[str], list[float]]:
    from .tokenizer import EOT, SOT

    out, ended = [], False
    for t in ids:
        if ended:
            out.append("<pad>")
        elif t == SOT:
            out.append("<start>")
        elif t == EOT:
            out.append("<end>")
            ended = True
        else:
            out.append(token_text(t))
    return out, list(ws)


def token_labels(model, p, length: int) -> tuple[list[str], list[float]]:
    """Labels and A1111 weights of the `length` context positions of the request's prompt (its `<lora:...>` tags
    removed, as the run removes them). UNet families: the weighted 75-token chunks of sd.tokenizer; MMDiT: SD3's
    CLIP tokens (sd.sd3_text.clip_tokens, unweighted) then the T5 positions, then the image entry. A context from
    another text model, or one these labels do not fit, gets numbered positions "#0", "#1", ..."""
    from .lora import parse_prompt
    from .tokenizer import EOT, tokenize_weighted

    text = parse_prompt(p.prompt or "")[0]
    labels: list[str] = []
    weights: list[float] = []
    if model.spec.network == "mmdit":
        from .sd3_text import clip_tokens

        lab, w = _label_chunk(clip_tokens(text, EOT)[0].tolist(), [1.0] * 77)
        labels, weights = lab, w
        while len(labels) < length - 1:
            labels.append(f"T5 #{len(labels) - 77}")
            weights.append(1.0)
        labels.append(IMAGE_ENTRY)
        weights.append(1.0)
    elif clip_towers(model):
        pad = model.parts.text_encoders[0].cfg.pad_token
        tokens, ws = tokenize_weighted(text, pad)
        for ids, w in zip(tokens.tolist(), ws.tolist()):
            lab, w = _label_chunk(ids, w)
            labels += lab
            weights += w
    weights = [round(float(w), 6) for w in weights]   # float32 weights (1.2 -> 1.2000000476...) as written
    if len(labels) != length:   # another tokenizer (LDM's BERT), or a prompt the BPE labels do not fit: numbers
        labels = [f"#{i}" for i in range(length)]
        weights = [1.0] * length
    return labels, weights


def clip_towers(model) -> bool:
    """True when the context comes from CLIP / OpenCLIP towers (their BPE tokens label its positions); other text
    models (LDM's BERT) get numbered positions instead."""
    encs = model.parts.text_encoders
    return bool(encs) and all(getattr(getattr(e, "cfg", None), "naming", None) in ("hf", "openclip") for e in encs)


def words_of(tokens: list[str], weights: list[float]) -> list[Word]:
    """Prompt words from the token labels: consecutive tokens up to one ending in `</w>` make a word."""
    words: list[Word] = []
    cur: list[int] = []
    for i, t in enumerate(tokens):
        if t.startswith("#"):   # numbered positions (no BPE labels): each its own entry
            words.append(Word(t, (i,), float(weights[i])))
            continue
        if t.startswith("<") and t.endswith(">") or t.startswith("T5 #") or t == IMAGE_ENTRY:
            cur = []
            continue
        cur.append(i)
        if t.endswith("</w>"):
            text = "".join(tokens[j].removesuffix("</w>") for j in cur)
            words.append(Word(text, tuple(cur), float(weights[cur[0]])))
            cur = []
    return words


def display_token(t: str) -> str:
    return t.removesuffix("</w>")


def choices(maps: AttentionMaps) -> list[str]:
    """What a user picks from: each word (its weight, its tokens when several), then each prompt token."""
    out = []
    for k, w in enumerate(maps.words):
        toks = f", tokens {'+'.join(display_token(maps.tokens[i]) for i in w.positions)}" if len(w.positions) > 1 else ""
        out.append(f"word {k}: {w.text} (weight {w.weight:.2f}{toks})")
    for i in maps.prompt_entries():
        out.append(f"token {i}: {display_token(maps.tokens[i])} (weight {maps.weights[i]:.2f})")
    return out


def map_for_choice(maps: AttentionMaps, choice: str, batch: int = 0) -> Tensor:
    """(h, w) map of a `choices` entry ("word K: ..." or "token I: ..."); ValueError for anything else."""
    kind, _, rest = str(choice).partition(" ")
    num = rest.split(":", 1)[0]
    if kind in ("word", "token") and num.isdigit():
        k = int(num)
        if kind == "word" and k < len(maps.words):
            return maps.word_map(maps.words[k], batch)
        if kind == "token" and k < len(maps.tokens):
            return maps.token_map(k, batch)
    raise ValueError(f"{str(choice)[:60]!r} is not a word or token of this prompt; pick one from the list")


# ----------------------------------------------------------------------------------------------------
# pictures


def upsample(m: Tensor, size: tuple[int, int]) -> Tensor:
    """(h, w) -> (H, W) bilinear (a convex mix of neighbours: sums over tokens are kept)."""
    return F.interpolate(m[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]


# a "jet"-like colormap: blue -> cyan -> green -> yellow -> red at 0, .25, .5, .75, 1
_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_COLORS = np.array([[0, 0, 143], [0, 160, 255], [40, 220, 80], [255, 220, 0], [220, 20, 20]], dtype=np.float64)


def colorize(m: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8 through the colormap above (linear between its stops)."""
    m = np.clip(m, 0, 1)
    rgb = np.stack([np.interp(m, _STOPS, _COLORS[:, c]) for c in range(3)], axis=-1)
    return np.round(rgb).astype(np.uint8)


def heat_map(m: Tensor, size: tuple[int, int]) -> Image.Image:
    """The map upsampled to `size` (W, H) and scaled by its maximum, as a colour image."""
    up = upsample(m, (size[1], size[0])).numpy()
    top = float(up.max())
    return Image.fromarray(colorize(up / top if top > 0 else up))


def overlay(image: Image.Image, m: Tensor, alpha: float = 0.5) -> Image.Image:
    """The heat map of `m` blended over `image` (alpha of the heat map)."""
    heat = heat_map(m, image.size)
    return Image.blend(image.convert("RGB"), heat, alpha)


# ----------------------------------------------------------------------------------------------------
# files (python -m sd generate ... --attention-maps DIR)


def check_folder(path) -> None:
    """Refuse, before anything runs, a --attention-maps path that exists and is not a folder."""
    from pathlib import Path

    if Path(path).exists() and not Path(path).is_dir():
        raise ValueError(f"--attention-maps {Path(path).name}: not a folder; give a folder for the maps")


def _safe(text: str) -> str:
    keep = "".join(c if c.isalnum() else "_" for c in text).strip("_")
    return keep[:40] or "token"


def save_maps(maps: AttentionMaps, image: Image.Image, folder) -> list[str]:
    """One PNG per prompt token (its heat map over the image, `token-II-TEXT.png`) and `tokens.json` (every
    position's token and weight, the words, the total). Returns the PNG paths."""
    import json
    from pathlib import Path

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in maps.prompt_entries():
        path = out / f"token-{i:02d}-{_safe(display_token(maps.tokens[i]))}.png"
        overlay(image, maps.token_map(i)).save(path)
        paths.append(str(path))
    (out / "tokens.json").write_text(json.dumps(maps.summary(), indent=1))
    return paths
