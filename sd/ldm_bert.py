"""LDM's text transformer (`BERTEmbedder`, Rombach et al. 2022, sec. 4.3.2) and its BERT WordPiece tokenizer.

txt2img-f8-large and text2img256 condition on a transformer trained from scratch with the LDM: the vendored
x-transformers `TransformerWrapper(Encoder(...))` of `ldm/modules/x_transformer.py` (lucidrains' x-transformers),
not a pretrained BERT; only BERT's uncased WordPiece vocabulary (bert-base-uncased `vocab.txt`, 30522 entries)
is borrowed for its tokenizer. Module names equal the checkpoint keys under `cond_stage_model.transformer.`:

    token_emb                              Embedding(vocab, D)
    pos_emb.emb                            Embedding(max_seq_len 77, D), absolute learned positions
    attn_layers.layers.{2i}.{0 LayerNorm, 1 Attention: to_q, to_k, to_v (no bias), to_out}
    attn_layers.layers.{2i+1}.{0 LayerNorm, 1 FeedForward: net.0.0 Linear + GELU, net.2 Linear}
    norm                                   the final LayerNorm; its output (B, 77, D) is the cross-attention context
    to_logits                              saved but unused (forward(return_embeddings=True) stops at `norm`)

Pre-norm residual blocks (x = x + f(LayerNorm(x))), heads of 64 channels (x-transformers' DEFAULT_DIM_HEAD: the
configs set no dim_head), exact GELU, no attention mask (BERTEmbedder passes none: [PAD] positions are attended to).
Tokens: transformers' BertTokenizer with lower-casing, `[CLS] ... [SEP]` then `[PAD]` (id of the vocabulary's
[PAD]) up to 77, truncated to 77 (BERTTokenizer of ldm/modules/encoders/modules.py).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextEncoderConfig

Tensor = torch.Tensor
Shapes = dict[str, tuple[int, ...]]

DIM_HEAD = 64                      # x-transformers DEFAULT_DIM_HEAD (BERTEmbedder sets no attn_dim_head)
VOCAB_NAMES = ("vocab.txt", "bert-base-uncased-vocab.txt")
VOCAB_FOLDERS = ("bert-base-uncased",)
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


def bert_config(shapes: Shapes, prefix: str) -> TextEncoderConfig:
    """The BERTEmbedder's numbers read from shapes (naming "ldm_bert"): width and vocabulary from token_emb,
    length from pos_emb, layers = attention/feed-forward pairs, heads = to_q rows / 64, feed-forward width."""
    vocab, width = shapes[prefix + "token_emb.weight"]
    lay = prefix + "attn_layers.layers."
    n = len({k[len(lay):].split(".", 1)[0] for k in shapes if k.startswith(lay)})
    return TextEncoderConfig(naming="ldm_bert", prefix=prefix, width=width, layers=n // 2,
                             heads=max(1, shapes[lay + "0.1.to_q.weight"][0] // DIM_HEAD),
                             mlp=shapes[lay + "1.1.net.0.0.weight"][0], act="gelu", vocab_size=vocab,
                             context_length=shapes[prefix + "pos_emb.emb.weight"][0], projection_dim=0, pad_token=0,
                             layer="last", final_ln=True)


class _PosEmb(nn.Module):
    """AbsolutePositionalEmbedding: emb(arange(T)) (1, T, D)."""

    def __init__(self, length: int, width: int, dd: dict):
        super().__init__()
        self.emb = nn.Embedding(length, width, **dd)


class _Attention(nn.Module):
    """Multi-head self-attention, softmax(q k^T / sqrt(64)) v, to_out with bias."""

    def __init__(self, width: int, heads: int, dd: dict):
        super().__init__()
        inner = heads * DIM_HEAD
        self.heads = heads
        self.to_q = nn.Linear(width, inner, bias=False, **dd)
        self.to_k = nn.Linear(width, inner, bias=False, **dd)
        self.to_v = nn.Linear(width, inner, bias=False, **dd)
        self.to_out = nn.Linear(inner, width, **dd)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q, k, v = (f(x).reshape(b, t, self.heads, DIM_HEAD).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v)                    # (B, heads, T, 64)
        return self.to_out(out.transpose(1, 2).reshape(b, t, -1))       # (B, T, D)


class _FeedForward(nn.Module):
    """net = [Sequential(Linear(D, mlp), GELU), Dropout, Linear(mlp, D)]."""

    def __init__(self, width: int, mlp: int, dd: dict):
        super().__init__()
        self.net = nn.Sequential(nn.Sequential(nn.Linear(width, mlp, **dd), nn.GELU()), nn.Dropout(0.0),
                                 nn.Linear(mlp, width, **dd))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _Layers(nn.Module):
    """x-transformers Encoder (AttentionLayers, pre_norm): layers.N = [LayerNorm, block] ('a', 'f' alternating)."""

    def __init__(self, cfg: TextEncoderConfig, dd: dict):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(cfg.layers):
            self.layers.append(nn.ModuleList([nn.LayerNorm(cfg.width, **dd), _Attention(cfg.width, cfg.heads, dd)]))
            self.layers.append(nn.ModuleList([nn.LayerNorm(cfg.width, **dd), _FeedForward(cfg.width, cfg.mlp, dd)]))

    def forward(self, x: Tensor) -> Tensor:
        for norm, block in self.layers:
            x = x + block(norm(x))                                       # (B, T, D)
        return x


class LDMBert(nn.Module):
    """The BERTEmbedder's TransformerWrapper. forward(tokens (B, T) long) -> context (B, T, D) after `norm`.
    `tokenizer` (a transformers BertTokenizer) is attached by the loader (sd.families.ldm.bert_text_parts)."""

    def __init__(self, cfg: TextEncoderConfig, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.cfg = cfg
        self.token_emb = nn.Embedding(cfg.vocab_size, cfg.width, **dd)
        self.pos_emb = _PosEmb(cfg.context_length, cfg.width, dd)
        self.attn_layers = _Layers(cfg, dd)
        self.norm = nn.LayerNorm(cfg.width, **dd)
        self.tokenizer = None

    def forward(self, tokens: Tensor, layer_index: int | None = None) -> tuple[Tensor, None]:
        t = tokens.shape[1]
        x = self.token_emb(tokens) + self.pos_emb.emb.weight[:t][None]   # (B, T, D)
        return self.norm(self.attn_layers(x)), None


# ----------------------------------------------------------------------------------------------- the vocabulary


def find_vocab(checkpoint: Path, given: str | None, folders: list[Path]) -> Path | None:
    """`given` (--bert-vocab: a vocab.txt or a folder with one), else vocab.txt / bert-base-uncased-vocab.txt (or
    bert-base-uncased/vocab.txt) beside the checkpoint, in `folders` (the text-encoder folders), or in the one or two
    folders above the checkpoint (the models folder, where `python -m sd download bert-vocab` puts it)."""
    if given:
        p = Path(given)
        if p.is_dir():
            hit = next((p / n for n in VOCAB_NAMES if (p / n).is_file()), None)
            if hit is None:
                raise FileNotFoundError(f"--bert-vocab {given}: the folder holds no vocab.txt")
            return hit
        if not p.is_file():
            raise FileNotFoundError(f"--bert-vocab {given}: no such file; give BERT's uncased vocab.txt")
        return p
    base = Path(checkpoint).parent
    dirs = [base, *folders, base.parent, base.parent.parent]
    for d in dirs:
        for sub in (d, *(d / f for f in VOCAB_FOLDERS)):
            for name in VOCAB_NAMES:
                if (sub / name).is_file():
                    return sub / name
    return None


def load_tokenizer(path: Path, vocab_size: int):
    """transformers' BertTokenizer (uncased WordPiece) over the vocabulary file at `path` (one token per line, id =
    line number, as BERT's load_vocab). ValueError (one line) when it is not a BERT vocabulary that fits the model."""
    from transformers import BertTokenizer

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{Path(path).name}: cannot be read as a BERT vocab.txt ({type(e).__name__})") from None
    vocab: dict[str, int] = {}
    for i, tok in enumerate(lines):
        vocab.setdefault(tok, i)
    missing = [s for s in SPECIAL if s not in vocab]
    if missing:
        raise ValueError(f"{Path(path).name}: not a BERT WordPiece vocabulary (no {', '.join(missing)}); give "
                         "bert-base-uncased's vocab.txt")
    if len(lines) > vocab_size:
        raise ValueError(f"{Path(path).name}: {len(lines)} tokens, but the model's token embedding has {vocab_size} "
                         "rows; give the vocabulary the model was trained with (bert-base-uncased's vocab.txt)")
    return BertTokenizer(vocab=vocab, do_lower_case=True)


def tokenize(tokenizer, texts: list[str], length: int) -> Tensor:
    """(B, length) long: [CLS] WordPieces [SEP] [PAD]..., truncated to `length` (BERTTokenizer of LDM)."""
    enc = tokenizer(list(texts), truncation=True, max_length=length, padding="max_length")
    return torch.tensor(enc["input_ids"], dtype=torch.long)


@torch.no_grad()
def encode(model: LDMBert, texts: list[str]) -> Tensor:
    """Texts -> the cross-attention context (B, 77, D) on the model's device."""
    p = model.token_emb.weight
    tokens = tokenize(model.tokenizer, texts, model.cfg.context_length).to(p.device)
    return model(tokens)[0]

