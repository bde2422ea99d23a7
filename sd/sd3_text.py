"""SD3 / SD3.5 text conditioning: CLIP-L + CLIP-G (+ T5-XXL) tokens, towers and the context / vector assembly.

Esser et al. 2024 ("Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", sec. 5.2 / fig. 2):
the two CLIP towers give a penultimate-layer sequence each and a pooled vector each; the CLIP sequences are joined
along the channels, zero-padded to T5's width and put in front of T5's sequence; the pooled vectors are joined
into the vector `y`. Conventions (those of Stability's SD3 reference code):

- CLIP tokens: the prompt split on spaces, each word BPE-tokenised alone, SOT + ids (at most 75) + EOT, padded to
  77 with EOT (49407) for CLIP-L and 0 for CLIP-G.
- hidden = the penultimate layer's output WITHOUT the final LayerNorm (both towers);
  pooled = final_layer_norm(last layer) at the first EOT; CLIP-L's pooled is NOT projected (a
  `text_projection.weight` in the file is unused, see `UNUSED_CLIP_L_PROJECTION`), CLIP-G's is
  (`text_projection`, x @ W^T).
- context = cat([pad(cat([clip_l, clip_g], -1), to the context width), t5], dim=-2) -> (B, 77 + L_t5, ctx);
  without T5, the padded CLIP part alone (B, 77, ctx). vector = cat([clip_l_pooled, clip_g_pooled], -1).

The towers are sd.text's `TextEncoder` in HF naming (`text_model.*`), under the prefixes
`text_encoders.clip_l.transformer.` / `text_encoders.clip_g.transformer.` of all-in-one files (or none in
separate `clip_l.safetensors` / `clip_g.safetensors` files); T5 comes from sd.t5.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sd.config import TextEncoderConfig
from sd.t5 import SentencePieceTokenizer, encode_t5, t5_tokens
from sd.text import TextEncoder, build_text_encoder, clip_l_config, load_text_encoder_weights
from sd.tokenizer import CHUNK_TOKENS, CONTEXT_LENGTH, EOT, SOT, encode

Tensor = torch.Tensor

CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
# A key some SD3 bundles carry that the convention never uses (CLIP-L's pooled output goes in unprojected);
# key accounting should list it as ignorable (a rule for sd/checkpoint.py IGNORE_RULES).
UNUSED_CLIP_L_PROJECTION = r"text_encoders\.clip_l\.transformer\.text_projection\.weight"


def clip_l_sd3_config(prefix: str = CLIP_L_PREFIX) -> TextEncoderConfig:
    """CLIP ViT-L/14 as SD3 uses it: penultimate layer without LN, unprojected pooled output, pads with EOT."""
    return clip_l_config(prefix, layer="penultimate", final_ln=False, pad_token=EOT, projection_dim=0,
                         output_pooled=True)


def clip_g_sd3_config(prefix: str = CLIP_G_PREFIX) -> TextEncoderConfig:
    """OpenCLIP ViT-bigG/14 in HF naming as SD3 bundles it: 32 layers of 1280, penultimate layer without LN,
    projected pooled output (text_projection.weight, a Linear), pads with 0."""
    return TextEncoderConfig(naming="hf", prefix=prefix, width=1280, layers=32, heads=20, mlp=5120, act="gelu",
                             vocab_size=49408, context_length=77, projection_dim=1280, pad_token=0,
                             layer="penultimate", final_ln=False, output_pooled=True)


def load_sd3_clip(tensors: dict[str, Tensor], cfg: TextEncoderConfig, device=None, dtype=None) -> TextEncoder:
    """Build one SD3 CLIP tower on the meta device and load its tensors (cfg.prefix already stripped), strictly.
    An unused CLIP-L `text_projection.weight` (cfg.projection_dim == 0) is dropped first."""
    if not cfg.projection_dim:
        tensors = {k: v for k, v in tensors.items() if k != "text_projection.weight"}
    module = build_text_encoder(cfg, device="meta", dtype=dtype)
    load_text_encoder_weights(module, tensors, cfg)
    return module.to(device) if device is not None else module


def clip_tokens(text: str, pad_token: int) -> Tensor:
    """SD3's CLIP tokens: words split on spaces, each BPE-encoded alone, SOT + ids (first 75) + EOT, then
    `pad_token` to 77. Returns (1, 77) long."""
    ids: list[int] = []
    for word in text.replace("\n", " ").split(" "):
        if word:
            ids.extend(encode(word))
    ids = ids[:CHUNK_TOKENS]
    seq = [SOT] + ids + [EOT] + [pad_token] * (CONTEXT_LENGTH - 2 - len(ids))
    return torch.tensor([seq], dtype=torch.long)


@torch.no_grad()
def encode_clip(encoder: TextEncoder, text: str) -> tuple[Tensor, Tensor]:
    """(hidden (1, 77, W) penultimate without LN, pooled (1, P)) of one SD3 CLIP tower."""
    device = next(encoder.parameters()).device
    hidden, pooled = encoder(clip_tokens(text, encoder.cfg.pad_token).to(device))
    return hidden, pooled


def sd3_context(clip_l_hidden: Tensor, clip_g_hidden: Tensor, t5_hidden: Tensor | None, width: int) -> Tensor:
    """cat(CLIP-L, CLIP-G) along channels (B, 77, Wl + Wg), zero-padded on the right to `width`, then T5's
    sequence (B, L, width) after it along the tokens: (B, 77 + L, width); without T5 (B, 77, width)."""
    clip = torch.cat([clip_l_hidden.float(), clip_g_hidden.float()], dim=-1)  # (B, 77, Wl + Wg)
    if clip.shape[-1] > width:
        raise ValueError(f"CLIP width {clip.shape[-1]} exceeds the context width {width}")
    clip = F.pad(clip, (0, width - clip.shape[-1]))  # (B, 77, width)
    if t5_hidden is None:
        return clip
    if t5_hidden.shape[-1] != width:
        raise ValueError(f"T5 width {t5_hidden.shape[-1]} != the context width {width}")
    return torch.cat([clip, t5_hidden.float().to(clip.device)], dim=-2)  # (B, 77 + L, width); T5 may sit elsewhere


def sd3_vector(clip_l_pooled: Tensor, clip_g_pooled: Tensor) -> Tensor:
    """The pooled vector y: cat(CLIP-L pooled, CLIP-G pooled projected) -> (B, Pl + Pg) float32."""
    return torch.cat([clip_l_pooled.float(), clip_g_pooled.float()], dim=-1)


@torch.no_grad()
def encode_sd3_prompt(text: str, clip_l: TextEncoder, clip_g: TextEncoder, context_dim: int, t5=None,
                      t5_tokenizer: SentencePieceTokenizer | None = None) -> dict[str, Tensor]:
    """A prompt -> {"crossattn": (1, 77 [+ L_t5], context_dim), "vector": (1, Pl + Pg)}, float32.

    context_dim is the MMDiT's (its `cfg.context_dim`, T5's width). t5 None: CLIP-only context."""
    l_hidden, l_pooled = encode_clip(clip_l, text)
    g_hidden, g_pooled = encode_clip(clip_g, text)
    t5_hidden = None
    if t5 is not None:
        if t5_tokenizer is None:
            raise ValueError("the T5 encoder needs its sentencepiece tokenizer (spiece.model or tokenizer.json)")
        t5_hidden = encode_t5(t5, t5_tokens(t5_tokenizer, text))
    return {"crossattn": sd3_context(l_hidden, g_hidden, t5_hidden, context_dim),
            "vector": sd3_vector(l_pooled, g_pooled)}



@torch.no_grad()
def encode_sd3_prompts(texts: list[str], clip_l, clip_g, context_dim: int, t5=None, use=None) -> list[dict[str, Tensor]]:
    """`encode_sd3_prompt` of several prompts, one tower at a time: every prompt through CLIP-L, then CLIP-G, then
    T5 (a T5Tower: .model, .tokenizer), each tower inside `use(tower)` (sd.text_encoders.use: its weights loaded for
    the block, dropped after), so at most one tower is in memory at once. The same numbers as `encode_sd3_prompt`."""
    from contextlib import nullcontext

    use = use or nullcontext
    with use(clip_l) as m:
        ls = [encode_clip(m, t) for t in texts]
    with use(clip_g) as m:
        gs = [encode_clip(m, t) for t in texts]
    t5s = [None] * len(texts)
    if t5 is not None:
        with use(t5) as m:
            t5s = [encode_t5(m.model, t5_tokens(m.tokenizer, t)) for t in texts]
    return [{"crossattn": sd3_context(lh, gh, th, context_dim), "vector": sd3_vector(lp, gp)}
            for (lh, lp), (gh, gp), th in zip(ls, gs, t5s)]
