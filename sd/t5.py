"""T5-XXL text encoder of SD3 / SD3.5: the network, loading from single files, the sentencepiece tokenizer, and
SD3's T5 tokenization convention.

The network is transformers' `T5EncoderModel` (Raffel et al. 2020, "Exploring the Limits of Transfer Learning
with a Unified Text-to-Text Transformer"; the v1.1 encoder SD3 uses: relative position bias in block 0 shared by
all blocks, RMSNorm without bias, gated-GELU feed-forward, no 1/sqrt(d) attention scaling), built from a
`T5Config` written here field by field (never downloaded); sizes are read from the file's shapes.

State-dict names are transformers' (`shared.weight`, `encoder.block.N.layer.0.SelfAttention.q.weight`, ...,
`encoder.final_layer_norm.weight`), which is how the files spell them under their prefix:
`text_encoders.t5xxl.transformer.` in an all-in-one SD3 checkpoint, nothing in a separate `t5xxl_*.safetensors`.
The embedding may come as `shared.weight`, `encoder.embed_tokens.weight` or both (tied: one tensor is used).
Weights stored as float16, bfloat16 or float8 (`t5xxl_fp8_e4m3fn`) are cast to the requested dtype on load.
ComfyUI's scaled float8 files (`t5xxl_fp8_e4m3fn_scaled`: a `scaled_fp8` marker tensor and, per quantized Linear,
a float32 `NAME.scale_weight`) are dequantized on load: weight = float32(NAME.weight) * scale_weight, as ComfyUI's
scaled-fp8 ops compute it (comfy/ops.py); their `NAME.scale_input` (only used by fp8 matmuls) is dropped.

Tokens (SD3 convention, as Stability's reference tokenizer wrapper): the first 226 characters of the prompt, split
on spaces, each word encoded by the sentencepiece model on its own, then EOS (1), padded with 0 to at least 77;
longer prompts are not cut. No attention mask: the encoder sees the padding, and its last hidden state is used.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

Tensor = torch.Tensor

EOS = 1                # </s>
PAD = 0                # <pad>
MIN_TOKENS = 77        # sequences are padded to at least this many tokens
MAX_CHARS = 226        # the prompt is cut to this many characters before tokenising


# ----------------------------------------------------------------------------- config and network


@dataclass(frozen=True)
class T5Config:
    """T5 v1.1 encoder sizes; defaults are T5-XXL (SD3's `t5xxl`)."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64                 # per-head width (heads * d_kv = inner attention width)
    d_ff: int = 10240              # gated-GELU hidden width (wi_0, wi_1)
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128   # not visible in shapes: fixed for T5 v1.1


def t5_config_for(shapes: dict[str, tuple[int, ...]], prefix: str = "text_encoders.t5xxl.transformer.") -> T5Config:
    """T5Config read from {key: shape} under `prefix`. Raises ValueError when the keys are not a T5 encoder."""
    def shape(name: str) -> tuple[int, ...]:
        if prefix + name not in shapes:
            raise ValueError(f"not a T5 encoder: {prefix + name} is missing")
        return tuple(shapes[prefix + name])

    emb = shapes.get(prefix + "shared.weight") or shapes.get(prefix + "encoder.embed_tokens.weight")
    if emb is None:
        raise ValueError(f"not a T5 encoder: no {prefix}shared.weight or {prefix}encoder.embed_tokens.weight")
    buckets, heads = shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    inner = shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    n = len({k[len(prefix):].split(".")[2] for k in shapes if k.startswith(prefix + "encoder.block.")})
    return T5Config(vocab_size=emb[0], d_model=emb[1], d_kv=inner // heads,
                    d_ff=shape("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0], num_layers=n,
                    num_heads=heads, relative_attention_num_buckets=buckets)


def hf_config(cfg: T5Config):
    """transformers T5Config with every field that matters set from ours (no download)."""
    from transformers import T5Config as HFT5Config

    return HFT5Config(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
                      num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                      relative_attention_num_buckets=cfg.relative_attention_num_buckets,
                      relative_attention_max_distance=cfg.relative_attention_max_distance,
                      feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
                      initializer_factor=1.0, is_encoder_decoder=False, use_cache=False,
                      tie_word_embeddings=False, pad_token_id=PAD, eos_token_id=EOS)


def build_t5(cfg: T5Config, device=None, dtype=None):
    """A transformers T5EncoderModel of these sizes in eval mode; device="meta" allocates nothing."""
    from transformers import T5EncoderModel

    with torch.device(device) if device is not None else torch.device("cpu"):
        model = T5EncoderModel(hf_config(cfg))
    return model.to(dtype=dtype).eval() if dtype is not None else model.eval()


def load_t5(tensors: dict[str, Tensor], device=None, dtype=torch.float32):
    """Build the T5 encoder the tensors describe and load them strictly (keys already stripped of their prefix).

    The embedding may be named `shared.weight` and/or `encoder.embed_tokens.weight`. Every tensor is cast to
    `dtype` (float8 / float16 / bfloat16 files are upcast) and moved to `device`; with dtype float16 the
    feed-forward output projections (`wo`) stay in float32, as transformers keeps them, since T5's activations
    overflow float16 there. Raises ValueError naming missing, unexpected or mis-shaped keys."""
    state, scales = split_scaled_fp8(tensors)
    emb = state.pop("shared.weight", None)
    alias = state.pop("encoder.embed_tokens.weight", None)
    if emb is None:
        emb = alias
    if emb is None:
        raise ValueError("T5 keys do not match: missing ['shared.weight'] (or encoder.embed_tokens.weight)")
    cfg = t5_config_for({**{k: tuple(v.shape) for k, v in state.items()}, "shared.weight": tuple(emb.shape)}, "")
    model = build_t5(cfg, device="meta")
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    state["shared.weight"] = emb
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    bad = sorted(f"{k} {tuple(state[k].shape)} != {want[k]}" for k in set(want) & set(state)
                 if tuple(state[k].shape) != want[k])
    if missing or unexpected or bad:
        raise ValueError(f"T5 keys do not match: missing {missing}, unexpected {unexpected}, wrong shape {bad}")

    def cast(name: str, t: Tensor) -> Tensor:
        to = torch.float32 if dtype == torch.float16 and name.endswith("DenseReluDense.wo.weight") else dtype
        if name in scales:   # scaled fp8: float32(weight) * scale_weight, one tensor at a time
            return (t.to(device=device).float() * scales[name].to(device=device).float()).to(to)
        return t.to(device=device).to(to)  # float8 -> float32 / bf16 / fp16 is a plain cast

    state = {k: cast(k, v) for k, v in state.items()}
    state["encoder.embed_tokens.weight"] = state["shared.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.encoder.embed_tokens = model.shared  # keep the tie (assign replaced both parameters)
    return model.eval()


def split_scaled_fp8(tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(weights, {weight key: its scale}) of a state dict: ComfyUI's scaled fp8 layout (`scaled_fp8` marker,
    `NAME.scale_weight` per Linear, `NAME.scale_input` optional) split into the plain keys and the scales by which
    each `NAME.weight` is to be multiplied; a file without the marker comes back as it is with no scales. A
    `scale_weight` without its weight, or a scale that is not one number, is a ValueError naming the key."""
    state = dict(tensors)
    if "scaled_fp8" not in state:   # without the marker, scale keys are unexpected (strict loading names them)
        return state, {}
    state.pop("scaled_fp8", None)
    scales = {}
    for k in [k for k in state if k.endswith((".scale_weight", ".scale_input"))]:
        v = state.pop(k)
        if k.endswith(".scale_input"):
            continue
        w = k[: -len("scale_weight")] + "weight"
        if w not in state:
            raise ValueError(f"T5 keys do not match: {k} scales a missing {w}")
        if v.numel() != 1:
            raise ValueError(f"T5 keys do not match: {k} has shape {list(v.shape)}, expected one number")
        scales[w] = v.reshape(())
    return state, scales


@torch.no_grad()
def encode_t5(model, tokens: Tensor) -> Tensor:
    """tokens (B, L) long -> last hidden state (B, L, d_model), no attention mask (padding is attended)."""
    device = model.shared.weight.device
    return model(input_ids=tokens.to(device)).last_hidden_state


# ----------------------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class SentencePieceTokenizer:
    """A T5 sentencepiece vocabulary: `spiece.model` (the sentencepiece library) or a `tokenizer.json`
    (the tokenizers library, special tokens not added). `encode(word)` -> ids without EOS."""

    path: Path

    def encode(self, text: str) -> list[int]:
        return list(_backend(str(self.path))(text))


def _backend(path: str):
    return _BACKENDS.get(path) or _BACKENDS.setdefault(path, _open(path))


_BACKENDS: dict[str, object] = {}


def _open(path: str):
    if path.endswith(".json"):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(path)
        return lambda text: tok.encode(text, add_special_tokens=False).ids
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=path)
    return lambda text: sp.encode(text, out_type=int)


def load_t5_tokenizer(path: str | Path) -> SentencePieceTokenizer:
    """The T5 tokenizer from `spiece.model` or `tokenizer.json` (or a folder holding one of them)."""
    p = Path(path)
    if p.is_dir():
        for name in ("spiece.model", "tokenizer.json"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise FileNotFoundError(f"{path}: no spiece.model or tokenizer.json in this folder")
    if not p.is_file():
        raise FileNotFoundError(f"T5 tokenizer file not found: {p}")
    _backend(str(p))  # fail now, not at the first prompt
    return SentencePieceTokenizer(p)


def t5_tokens(tokenizer: SentencePieceTokenizer, text: str) -> Tensor:
    """SD3's T5 tokens of a prompt: (1, max(77, n + 1)) long.

    The first 226 characters, split on spaces (newlines count as spaces), each word encoded on its own, then
    EOS; padded with 0 to 77. Longer sequences are kept whole."""
    ids: list[int] = []
    for word in text[:MAX_CHARS].replace("\n", " ").split(" "):
        if word:
            ids.extend(tokenizer.encode(word))
    ids.append(EOS)
    ids += [PAD] * (MIN_TOKENS - len(ids))
    return torch.tensor([ids], dtype=torch.long)
