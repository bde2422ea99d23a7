"""The CLIP byte-level BPE tokenizer, offline, and AUTOMATIC1111's prompt-weighting syntax.

One tokenizer serves CLIP-L, OpenCLIP ViT-H and ViT-bigG: the 49408-entry vocabulary built from the
merges file that open_clip bundles (`open_clip/bpe_simple_vocab_16e6.txt.gz`), found on disk without
importing open_clip. Text is cleaned the way the tower's own tokenizer does it (`clean_text`): "hf" as
transformers' CLIPTokenizer (ftfy, collapsed whitespace, lower case; no HTML unescape), the CLIP-L towers
of SD 1.x / SDXL / SD3 as A1111 and SGM tokenize them; "openclip" as open_clip's tokenizer (ftfy, HTML
unescape twice, collapsed whitespace, lower case), the OpenCLIP towers of SD 2.x / SDXL bigG as A1111
tokenizes them. Then it is split with CLIP's regex, and each piece is byte-encoded and merged by BPE rank.

Prompts follow the AUTOMATIC1111 webui conventions:
  (word)       weight x 1.1          [word]      weight / 1.1
  (word:1.5)   weight x 1.5          nested brackets multiply
  \\( \\) \\[ \\] \\\\  literal characters    BREAK       ends the current 75-token chunk
and long prompts are cut into 75-token chunks, each sent as SOT + 75 tokens + EOT (+ padding) = 77, by
A1111's rule (`sd_hijack_clip.tokenize_line`): when a token arrives at a full chunk whose last comma is at
most 20 tokens back, the chunk ends after that comma and the tokens after it open the next chunk; BREAK
ends the chunk. Deviations from the webui: BREAK inside brackets still breaks, and an embedding moved by
the comma backtrack keeps its vectors (A1111 leaves its fix in the old chunk).
"""
from __future__ import annotations

import gzip
import html
import importlib.util
import os
import re
from functools import lru_cache
from typing import Callable

import ftfy
import regex
import torch

SOT = 49406                # <start_of_text>
EOT = 49407                # <end_of_text>
CONTEXT_LENGTH = 77        # tokens per sequence the text towers take
CHUNK_TOKENS = CONTEXT_LENGTH - 2  # prompt tokens per chunk (SOT and EOT take the other two)
BREAK_WEIGHT = -1.0        # weight marking a BREAK entry in parse_prompt_attention's output
COMMA = 267                # ",</w>"
COMMA_BACKTRACK = 20       # A1111's opts.comma_padding_backtrack default
CLEANINGS = ("hf", "openclip")

# CLIP's pre-tokenizer: common English contractions, letter runs, single digits, other symbol runs.
_SPLIT = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)


def _vocab_file() -> str:
    """Path of the gzipped BPE merges list shipped inside the open_clip package (not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip_torch is not installed: the CLIP BPE vocabulary comes with it")
    return os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")


def _byte_alphabet() -> dict[int, str]:
    """Reversible map byte -> printable unicode char (GPT-2 / CLIP). The printable bytes map to themselves
    and come first; the other 68 bytes follow in byte order as chars 256, 257, ... The insertion order
    is the id order of the first 256 vocabulary entries."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + k) for k, b in enumerate(others)})
    return table


@lru_cache(maxsize=1)
def _tables() -> tuple[dict[str, int], dict[tuple[str, str], int], dict[int, str]]:
    """(symbol -> id, merge pair -> rank, byte -> char), read once from the merges file.

    Ids: 256 byte chars, the same 256 with the word-end marker `</w>`, 48894 merges in rank order,
    then <start_of_text> = 49406 and <end_of_text> = 49407.
    """
    with gzip.open(_vocab_file(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    n_merges = 49408 - 2 * 256 - 2
    merges = [tuple(line.split()) for line in lines[1:1 + n_merges]]  # line 0 is a version header
    byte_chars = _byte_alphabet()
    symbols = list(byte_chars.values())
    symbols = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    symbols += ["<start_of_text>", "<end_of_text>"]
    ids = {s: i for i, s in enumerate(symbols)}
    assert ids["<start_of_text>"] == SOT and ids["<end_of_text>"] == EOT, "unexpected BPE vocabulary"
    ranks = {pair: r for r, pair in enumerate(merges)}
    return ids, ranks, byte_chars


@lru_cache(maxsize=65536)
def _bpe_word(word: str) -> tuple[int, ...]:
    """Token ids of one pre-tokenized, byte-encoded word: start from characters (the last one carrying
    `</w>`) and keep merging the adjacent pair of lowest rank, all its occurrences left to right."""
    ids, ranks, _ = _tables()
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = {(a, b) for a, b in zip(parts, parts[1:])}
        best = min(pairs, key=lambda p: ranks.get(p, len(ranks)))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return tuple(ids[p] for p in parts)


def clean_text(text: str, cleaning: str = "hf") -> str:
    """The text normalisation of the tower's tokenizer. "hf" (transformers CLIPTokenizer with ftfy, as A1111's
    SD 1.x CLIP-L): ftfy.fix_text, whitespace runs to one space, lower case. "openclip" (open_clip's
    `_clean_lower`, as A1111's OpenCLIP towers): ftfy.fix_text, HTML unescaped twice, whitespace, lower case.
    ftfy itself unescapes entities unless the text holds a "<", so the two differ on text like "a <b> &amp; c"."""
    if cleaning not in CLEANINGS:
        raise ValueError(f"unknown text cleaning {cleaning!r}: expected one of {', '.join(CLEANINGS)}")
    text = ftfy.fix_text(text)
    if cleaning == "openclip":
        text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


def encode(text: str, cleaning: str = "hf") -> list[int]:
    """BPE token ids of `text`, without SOT/EOT, cleaned as `cleaning` says. An empty or blank text gives []."""
    _, _, byte_chars = _tables()
    out: list[int] = []
    for piece in _SPLIT.findall(clean_text(text, cleaning)):
        out.extend(_bpe_word("".join(byte_chars[b] for b in piece.encode("utf-8"))))
    return out


def tokenize(text: str, pad_token: int, cleaning: str = "hf") -> torch.Tensor:
    """Plain (unweighted, no syntax) tokenization into one sequence: SOT, tokens (truncated to 75), EOT,
    then `pad_token` up to 77. Returns (77,) long."""
    body = encode(text, cleaning)[:CHUNK_TOKENS]
    seq = [SOT] + body + [EOT] + [pad_token] * (CHUNK_TOKENS - len(body))
    return torch.tensor(seq, dtype=torch.long)


_WEIGHT_CLOSE = re.compile(r":\s*([+-]?[.\d]+)\s*\)")   # ":1.2)" closing an explicit-weight group
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")
_SPECIAL = "\\()[]:"


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (fragment, weight) pairs, AUTOMATIC1111 syntax.

    `(x)` multiplies the weight of x by 1.1, `[x]` divides it by 1.1, `(x:w)` multiplies it by w;
    groups nest and multiply; an unclosed group applies to the rest of the prompt. `\\(`, `\\)`,
    `\\[`, `\\]`, `\\\\` are literal characters (a lone backslash is dropped). A closing bracket with no
    open group is literal text. The word BREAK (own word, upper case) gives an entry ("BREAK", -1.0).
    Adjacent fragments of equal weight are merged; empty fragments are dropped; an empty prompt gives
    [("", 1.0)].
        parse_prompt_attention("a (b:1.5) [c]") == [("a ", 1.0), ("b", 1.5), (" ", 1.0), ("c", 1/1.1)]
    """
    res: list[list] = []            # [fragment, weight]; weight BREAK_WEIGHT marks a BREAK
    round_open: list[int] = []      # index into res where each open "(" group starts
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for item in res[start:]:
            if item[1] != BREAK_WEIGHT:
                item[1] *= factor

    def add_text(s: str) -> None:
        for k, part in enumerate(_BREAK_WORD.split(s)):
            if k > 0:
                res.append(["BREAK", BREAK_WEIGHT])
            res.append([part, 1.0])

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            nxt = text[i + 1] if i + 1 < n else ""
            if nxt and nxt in "()[]\\":
                res.append([nxt, 1.0])
                i += 2
            else:
                i += 1
        elif c == "(":
            round_open.append(len(res))
            i += 1
        elif c == "[":
            square_open.append(len(res))
            i += 1
        elif c == ":":
            m = _WEIGHT_CLOSE.match(text, i)
            factor = _to_float(m.group(1)) if m else None
            if m and round_open and factor is not None:
                scale(round_open.pop(), factor)
                i = m.end()
            elif m:
                add_text(m.group(0))
                i = m.end()
            else:
                add_text(":")
                i += 1
        elif c == ")":
            if round_open:
                scale(round_open.pop(), 1.1)
            else:
                add_text(")")
            i += 1
        elif c == "]":
            if square_open:
                scale(square_open.pop(), 1 / 1.1)
            else:
                add_text("]")
            i += 1
        else:
            j = i
            while j < n and text[j] not in _SPECIAL:
                j += 1
            add_text(text[i:j])
            i = j

    for start in round_open:
        scale(start, 1.1)
    for start in square_open:
        scale(start, 1 / 1.1)

    merged: list[list] = []
    for frag, w in res:
        if merged and merged[-1][1] == w and w != BREAK_WEIGHT:
            merged[-1][0] += frag
        else:
            merged.append([frag, w])
    out = [(frag, float(w)) for frag, w in merged if frag]
    return out or [("", 1.0)]


def _to_float(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


# special(ids, i) -> None, or (tokens consumed, vectors (n, width)): an embedding named at ids[i:] (sd.embeddings)
Special = Callable[[list[int], int], "tuple[int, torch.Tensor] | None"]


def tokenize_chunks(text: str, pad_token: int, cleaning: str = "hf", special: Special | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, torch.Tensor]]]:
    """Tokenize a prompt with weights into 77-token chunks, A1111's `tokenize_line`.

    Each fragment of parse_prompt_attention is tokenized on its own; its tokens carry its weight. A chunk holds
    75 prompt tokens: when a (non-comma) token arrives at a full chunk and the chunk's last comma is at most
    COMMA_BACKTRACK (20) tokens back, the chunk ends after the comma and the tokens after it move to the next
    chunk (padded: the moved tokens' slots become padding); otherwise the chunk is closed where it is. BREAK
    closes the chunk. Chunks are SOT, tokens, EOT, then `pad_token` to 77; SOT, EOT and padding weigh 1.0. An
    empty prompt is one chunk. `special` finds embeddings: their n vectors take n placeholder slots (token 0) in
    one chunk (a chunk without room for them is closed first).
    Returns tokens (n_chunks, 77) long, weights (n_chunks, 77) float32, fixes [(chunk, position, vectors)].
    """
    chunks_t: list[list[int]] = []
    chunks_w: list[list[float]] = []
    fixes: list[tuple[int, int, torch.Tensor]] = []
    cur_t: list[int] = []
    cur_w: list[float] = []
    cur_fix: list[tuple[int, torch.Tensor]] = []   # (offset in the chunk, vectors)
    last_comma = -1

    def close() -> None:
        nonlocal last_comma
        fill = CHUNK_TOKENS - len(cur_t)
        fixes.extend((len(chunks_t), 1 + off, vec) for off, vec in cur_fix)   # +1: after SOT
        chunks_t.append([SOT] + cur_t + [EOT] + [pad_token] * fill)
        chunks_w.append([1.0] + cur_w + [1.0] + [1.0] * fill)
        cur_t.clear()
        cur_w.clear()
        cur_fix.clear()
        last_comma = -1

    def backtrack() -> None:
        """End the full chunk after its last comma; what follows the comma opens the next chunk."""
        cut = last_comma + 1
        moved = (cur_t[cut:], cur_w[cut:], [(o - cut, v) for o, v in cur_fix if o >= cut])
        del cur_t[cut:], cur_w[cut:]
        cur_fix[:] = [(o, v) for o, v in cur_fix if o < cut]
        close()
        cur_t.extend(moved[0])
        cur_w.extend(moved[1])
        cur_fix.extend(moved[2])

    for frag, weight in parse_prompt_attention(text):
        if weight == BREAK_WEIGHT and frag == "BREAK":
            close()
            continue
        ids = encode(frag, cleaning)
        i = 0
        while i < len(ids):
            if ids[i] == COMMA:
                last_comma = len(cur_t)
            elif len(cur_t) == CHUNK_TOKENS and last_comma != -1 and len(cur_t) - last_comma <= COMMA_BACKTRACK:
                backtrack()
            if len(cur_t) == CHUNK_TOKENS:
                close()
            hit = special(ids, i) if special is not None else None
            if hit is None:
                cur_t.append(ids[i])
                cur_w.append(weight)
                i += 1
                continue
            consumed, vec = hit
            n = vec.shape[0]
            if len(cur_t) + n > CHUNK_TOKENS:                              # does not fit: pad, next chunk
                close()
            cur_fix.append((len(cur_t), vec))
            cur_t.extend([0] * n)
            cur_w.extend([weight] * n)
            i += consumed
    if cur_t or not chunks_t:
        close()
    return torch.tensor(chunks_t, dtype=torch.long), torch.tensor(chunks_w, dtype=torch.float32), fixes


def tokenize_weighted(text: str, pad_token: int, cleaning: str = "hf") -> tuple[torch.Tensor, torch.Tensor]:
    """tokenize_chunks without embeddings: tokens (n_chunks, 77) long and weights (n_chunks, 77) float32."""
    tokens, weights, _ = tokenize_chunks(text, pad_token, cleaning)
    return tokens, weights
