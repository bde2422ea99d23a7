"""Text encoders of SD1 / SD2 / SDXL (CLIP ViT-L/14, OpenCLIP ViT-H/14 and ViT-bigG/14) and prompt encoding.

One module, `TextEncoder`, whose state-dict names equal the released checkpoint keys once the
checkpoint prefix (`cfg.prefix`) is stripped:
  naming "hf"       CLIP-L as in SD1 / SDXL embedders.0: `text_model.embeddings.token_embedding.weight`,
                    `text_model.encoder.layers.N.self_attn.q_proj...`, `text_model.final_layer_norm`; run by
                    transformers' CLIPTextModel, built from an explicit CLIPTextConfig (never downloaded);
                    `text_projection.weight` (a bias-free Linear) when cfg.projection_dim > 0 (SD3 bundles).
  naming "openclip" OpenCLIP text towers (SD2 ViT-H, SDXL bigG), written here in plain torch with the
                    original attribute names: `token_embedding`, `positional_embedding`,
                    `transformer.resblocks.N.{ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj}`, `ln_final`,
                    `text_projection` (a matrix used as `x @ P`).
  naming "class"    LDM's `ClassEmbedder` (Rombach et al. 2022, cin256): `embedding` (n_classes, width), one
                    row per ImageNet class (+ the null class 1000 of cin256-v2); not a text tower, no prompts.
  naming "ldm_bert" LDM's x-transformers text transformer (txt2img-f8-large, text2img256): sd/ldm_bert.py's
                    LDMBert, built by `build_text_encoder`.
Optional keys in files (`*.position_ids`, `logit_scale`) are ignored by the loader.

`encode_prompt` turns a prompt into the cross-attention context the way AUTOMATIC1111 does: 75-token
chunks, per-token weights with the mean kept, chunks concatenated along the sequence, pooled output
from the first chunk.
"""
from __future__ import annotations

import contextlib
import dataclasses
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from sd.config import TextEncoderConfig
from sd.tokenizer import tokenize_weighted

Tensor = torch.Tensor

_IGNORED_LEAVES = ("position_ids", "logit_scale")


# ----------------------------------------------------------------------------- full-size configs


def clip_l_config(prefix: str, layer: str = "last", final_ln: bool = True, pad_token: int = 49407,
                  projection_dim: int = 0, output_pooled: bool = False) -> TextEncoderConfig:
    """OpenAI CLIP ViT-L/14 text tower (SD1: last layer + final LN; SDXL: penultimate, no LN)."""
    return TextEncoderConfig(naming="hf", prefix=prefix, width=768, layers=12, heads=12, mlp=3072,
                             act="quick_gelu", vocab_size=49408, context_length=77,
                             projection_dim=projection_dim, pad_token=pad_token, layer=layer,
                             final_ln=final_ln, output_pooled=output_pooled)


def openclip_h_config(prefix: str, layer: str = "penultimate", final_ln: bool = True, pad_token: int = 0,
                      projection_dim: int = 1024, output_pooled: bool = False) -> TextEncoderConfig:
    """OpenCLIP ViT-H/14 text tower (SD2: penultimate layer, then ln_final)."""
    return TextEncoderConfig(naming="openclip", prefix=prefix, width=1024, layers=24, heads=16, mlp=4096,
                             act="gelu", vocab_size=49408, context_length=77,
                             projection_dim=projection_dim, pad_token=pad_token, layer=layer,
                             final_ln=final_ln, output_pooled=output_pooled)


def openclip_bigg_config(prefix: str, layer: str = "penultimate", final_ln: bool = False, pad_token: int = 0,
                         projection_dim: int = 1280, output_pooled: bool = True) -> TextEncoderConfig:
    """OpenCLIP ViT-bigG/14 text tower (SDXL: penultimate without LN, plus the projected pooled output)."""
    return TextEncoderConfig(naming="openclip", prefix=prefix, width=1280, layers=32, heads=20, mlp=5120,
                             act="gelu", vocab_size=49408, context_length=77,
                             projection_dim=projection_dim, pad_token=pad_token, layer=layer,
                             final_ln=final_ln, output_pooled=output_pooled)


# ----------------------------------------------------------------------------- OpenCLIP tower pieces


def _activation(name: str):
    if name == "gelu":
        return F.gelu
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    raise ValueError(f"unknown text encoder activation {name!r}")


class _OpenClipMLP(nn.Module):
    """`mlp.c_fc` -> act -> `mlp.c_proj` (OpenCLIP's Sequential, same names)."""

    def __init__(self, width: int, hidden: int, act: str, device=None, dtype=None):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden, device=device, dtype=dtype)
        self.c_proj = nn.Linear(hidden, width, device=device, dtype=dtype)
        self.act = _activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class _ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: TextEncoderConfig, device=None, dtype=None):
        super().__init__()
        w = cfg.width
        self.ln_1 = nn.LayerNorm(w, device=device, dtype=dtype)
        self.attn = nn.MultiheadAttention(w, cfg.heads, batch_first=True, device=device, dtype=dtype)
        self.ln_2 = nn.LayerNorm(w, device=device, dtype=dtype)
        self.mlp = _OpenClipMLP(w, cfg.mlp, cfg.act, device=device, dtype=dtype)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.ln_1(x)                                           # (B, T, W)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig, device=None, dtype=None):
        super().__init__()
        self.resblocks = nn.ModuleList(_ResidualAttentionBlock(cfg, device, dtype) for _ in range(cfg.layers))


# ----------------------------------------------------------------------------- the encoder


def _clip_text_config(cfg: TextEncoderConfig):
    """transformers CLIPTextConfig with every field set from ours (its defaults are ViT-B/32)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp,
        projection_dim=cfg.projection_dim or cfg.width, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, max_position_embeddings=cfg.context_length, hidden_act=cfg.act,
        layer_norm_eps=1e-5, attention_dropout=0.0, initializer_range=0.02, initializer_factor=1.0,
        pad_token_id=1, bos_token_id=49406, eos_token_id=49407)


class TextEncoder(nn.Module):
    """A CLIP / OpenCLIP text tower whose state-dict names are the released keys (prefix stripped).

    forward(tokens (B, 77) long, layer_index=None) -> (hidden (B, 77, width), pooled (B, P) or None)
      hidden: hidden_states[layer_index], where hidden_states[0] is the embedding output and
              hidden_states[i] the output of block i (so -1 = last block, -2 = penultimate); None means
              cfg.layer. cfg.final_ln applies the final LayerNorm to it.
      pooled: only when cfg.output_pooled: the last block's output after the final LayerNorm at the
              first EOT (argmax of the tokens), times the text projection when the file has one.
    """

    def __init__(self, cfg: TextEncoderConfig, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        if cfg.naming == "hf":
            from transformers import CLIPTextModel

            with torch.device(device) if device is not None else contextlib.nullcontext():
                model = CLIPTextModel(_clip_text_config(cfg))
            # transformers < 5 nests the tower one level deeper (CLIPTextModel.text_model).
            self.text_model = getattr(model, "text_model", model).to(dtype=dtype)
            if cfg.projection_dim:
                self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False, device=device, dtype=dtype)
        elif cfg.naming == "openclip":
            w = cfg.width
            self.token_embedding = nn.Embedding(cfg.vocab_size, w, device=device, dtype=dtype)
            self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, w, device=device, dtype=dtype))
            self.transformer = _Transformer(cfg, device, dtype)
            self.ln_final = nn.LayerNorm(w, device=device, dtype=dtype)
            if cfg.projection_dim:
                self.text_projection = nn.Parameter(torch.empty(w, cfg.projection_dim, device=device, dtype=dtype))
            if not self.token_embedding.weight.is_meta:
                nn.init.normal_(self.token_embedding.weight, std=0.02)
                nn.init.normal_(self.positional_embedding, std=0.01)
                if cfg.projection_dim:
                    nn.init.normal_(self.text_projection, std=w ** -0.5)
        elif cfg.naming == "class":  # LDM ClassEmbedder: class index -> (B, 1, width) crossattn
            self.embedding = nn.Embedding(cfg.vocab_size, cfg.width, device=device, dtype=dtype)
        else:
            raise ValueError(f"unknown text encoder naming {cfg.naming!r}")

    def _layer_index(self, layer_index: int | None) -> int:
        if layer_index is not None:
            return layer_index
        if self.cfg.layer == "last":
            return -1
        if self.cfg.layer == "penultimate":
            return -2
        raise ValueError(f"unknown text encoder layer {self.cfg.layer!r}")

    def forward(self, tokens: Tensor, layer_index: int | None = None) -> tuple[Tensor, Tensor | None]:
        idx = self._layer_index(layer_index)
        if self.cfg.naming == "hf":
            return self._forward_hf(tokens, idx)
        return self._forward_openclip(tokens, idx)

    def _pool(self, final: Tensor, tokens: Tensor) -> Tensor:
        """final (B, T, W) after the final LN -> (B, P): the first EOT's state, projected."""
        pooled = final[torch.arange(final.shape[0], device=final.device), tokens.argmax(dim=-1)]  # (B, W)
        if not self.cfg.projection_dim:
            return pooled
        if self.cfg.naming == "hf":
            return self.text_projection(pooled)
        return pooled @ self.text_projection

    def _forward_hf(self, tokens: Tensor, idx: int) -> tuple[Tensor, Tensor | None]:
        out = self.text_model(input_ids=tokens, output_hidden_states=True)
        hidden = out.hidden_states[idx]                               # (B, T, W)
        if self.cfg.final_ln:
            hidden = self.text_model.final_layer_norm(hidden)
        pooled = self._pool(out.last_hidden_state, tokens) if self.cfg.output_pooled else None
        return hidden, pooled

    def _forward_openclip(self, tokens: Tensor, idx: int) -> tuple[Tensor, Tensor | None]:
        n_blocks = len(self.transformer.resblocks)
        pos = idx if idx >= 0 else n_blocks + 1 + idx                 # index into [emb, block 1 .. block L]
        if not 0 <= pos <= n_blocks:
            raise IndexError(f"layer_index {idx} out of range for {n_blocks} blocks")
        run = n_blocks if self.cfg.output_pooled else pos
        T = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:T]  # (B, T, W)
        mask = torch.full((T, T), float("-inf"), device=x.device, dtype=x.dtype).triu(1)  # causal (T, T)
        hidden = x
        for i, block in enumerate(self.transformer.resblocks[:run]):
            x = block(x, mask)
            if i + 1 == pos:
                hidden = x
        if self.cfg.final_ln:
            hidden = self.ln_final(hidden)
        pooled = self._pool(self.ln_final(x), tokens) if self.cfg.output_pooled else None
        return hidden, pooled


def build_text_encoder(cfg: TextEncoderConfig, device=None, dtype=None) -> TextEncoder:
    """A TextEncoder in eval mode; device="meta" builds it without allocating (then load with assign)."""
    if cfg.naming == "ldm_bert":   # LDM's x-transformers text transformer (txt2img-f8-large): sd/ldm_bert.py
        from sd.ldm_bert import LDMBert

        return LDMBert(cfg, device=device, dtype=dtype).eval()
    return TextEncoder(cfg, device=device, dtype=dtype).eval()


# ----------------------------------------------------------------------------- keys and loading


def ignorable_key(name: str) -> bool:
    """True for keys some files carry that the network does not need (position_ids, logit_scale)."""
    return name.rsplit(".", 1)[-1] in _IGNORED_LEAVES


@lru_cache(maxsize=32)
def _expected_keys(cfg: TextEncoderConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    module = build_text_encoder(dataclasses.replace(cfg, prefix=""), device="meta")
    return tuple((k, tuple(v.shape)) for k, v in module.state_dict().items())


def expected_keys(cfg: TextEncoderConfig) -> dict[str, tuple[int, ...]]:
    """Required tensor names (prefix stripped, spelled as in the released files) -> shapes, computed on
    the meta device. The optional keys (`ignorable_key`) are not listed."""
    return dict(_expected_keys(cfg))


def _released_names(tensors: dict[str, Tensor], cfg: TextEncoderConfig) -> dict[str, Tensor]:
    """Drop optional keys; for "hf" accept old files without the `text_model.` level."""
    out = {}
    for name, t in tensors.items():
        if ignorable_key(name):
            continue
        if cfg.naming == "hf" and not name.startswith("text_model.") and name != "text_projection.weight":
            name = "text_model." + name
        out[name] = t
    return out


def load_text_encoder_weights(module: TextEncoder, tensors: dict[str, Tensor], cfg: TextEncoderConfig) -> None:
    """Load one tower's tensors (cfg.prefix already stripped) into `module`, strictly.

    Raises ValueError naming missing, unexpected or mis-shaped keys. Tensors are cast to the module's
    dtype. A module built on "meta" takes the tensors themselves (their device); otherwise they are
    copied into the module's parameters (its device).
    """
    state = _released_names(tensors, cfg)
    want = {k: v for k, v in module.state_dict().items()}
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    bad_shape = sorted(f"{k} {tuple(state[k].shape)} != {tuple(want[k].shape)}"
                       for k in set(want) & set(state) if tuple(state[k].shape) != tuple(want[k].shape))
    if missing or unexpected or bad_shape:
        raise ValueError(f"text encoder ({cfg.naming}, prefix {cfg.prefix!r}) keys do not match: "
                         f"missing {missing}, unexpected {unexpected}, wrong shape {bad_shape}")
    on_meta = any(v.is_meta for v in want.values())
    state = {k: v.to(dtype=want[k].dtype) for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=on_meta)
    if cfg.naming == "hf":
        # position_ids is a non-persistent buffer: recreate it (meta after assign; some files carry a
        # float or damaged copy, which is never used).
        emb = module.text_model.embeddings
        device = emb.token_embedding.weight.device
        emb.position_ids = torch.arange(cfg.context_length, device=device).expand(1, -1)


# ----------------------------------------------------------------------------- prompts


def text_cleaning(cfg: TextEncoderConfig) -> str:
    """How the tower's own tokenizer cleans text (sd.tokenizer.clean_text): an OpenCLIP tower ("openclip" naming:
    SD 2.x ViT-H, SDXL bigG) as open_clip does (HTML unescaped), a transformers CLIP-L ("hf") as CLIPTokenizer does."""
    return "openclip" if cfg.naming == "openclip" else "hf"


@torch.no_grad()
def encode_prompt(encoder: TextEncoder, text: str, clip_skip: int = 1,
                  opt_in: bool = False) -> tuple[Tensor, Tensor | None]:
    """Prompt -> (hidden (1, 77 * n_chunks, width), pooled (1, P) or None), AUTOMATIC1111 semantics.

    Weighted 75-token chunks (sd.tokenizer.tokenize_chunks: A1111's comma backtrack and BREAK; padding with
    encoder.cfg.pad_token; the text cleaned as the tower's tokenizer does, text_cleaning) are
    encoded; in each chunk every token's hidden state is multiplied by its weight and the chunk is then
    rescaled so its mean equals the unweighted mean. Chunks are concatenated along the sequence; pooled
    comes from chunk 0. clip_skip k > 1 takes hidden_states[-k] (then the final LN iff cfg.final_ln) for
    encoders whose cfg.layer is "last"; encoders fixed to "penultimate" ignore it, except that with `opt_in` (the
    request's A1111 "Clip skip SDXL") a tower whose cfg.clip_skip_opt_in is set takes hidden_states[-k] for every k
    (1 = the last layer; SDXL's CLIP-L, which has no final LN, as A1111's sd_hijack_clip). Textual-inversion
    embeddings this thread's request activated (sd.embeddings.use_embeddings) take their token positions.
    """
    cfg = encoder.cfg
    from sd.embeddings import active_for, inserted, tokenize_with_embeddings   # textual inversion (this request's)

    tokens, weights, fixes = tokenize_with_embeddings(text, cfg.pad_token, active_for(encoder),  # (N, 77), (N, 77)
                                                      text_cleaning(cfg))
    device = next(encoder.parameters()).device
    if opt_in and cfg.clip_skip_opt_in:
        layer_index = -clip_skip
    else:
        layer_index = -clip_skip if (clip_skip > 1 and cfg.layer == "last") else None
    with inserted(encoder, fixes):   # embedding vectors at their token positions (no fixes: the plain forward)
        hidden, pooled = encoder(tokens.to(device), layer_index=layer_index)  # (N, 77, W), (N, P)
    z = hidden.float()
    w = weights.to(device)[:, :, None]                                # (N, 77, 1)
    mean_before = z.mean(dim=(1, 2), keepdim=True)                    # (N, 1, 1)
    z = z * w
    z = z * (mean_before / z.mean(dim=(1, 2), keepdim=True))
    hidden = z.to(hidden.dtype).reshape(1, -1, z.shape[-1])          # (1, 77 N, W)
    return hidden, (pooled[:1] if pooled is not None else None)
