"""Tests of sd/text.py and sd/tokenizer.py: released key layouts, the CLIP BPE tokenizer, A1111 prompt
weighting, and parity of the text towers with transformers models loaded through diffusers' single-file
converters, on tiny random weights (width 64, 2 layers) in the released key naming."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from sd.config import TextEncoderConfig
from sd.text import (build_text_encoder, clip_l_config, encode_prompt, expected_keys, ignorable_key,
                     load_text_encoder_weights, openclip_bigg_config, openclip_h_config)
from sd.tokenizer import (EOT, SOT, encode, parse_prompt_attention, tokenize, tokenize_weighted)

from .tiny import REFERENCE_DIR as KEYS_DIR

SENTENCE = "A photo of an astronaut riding a horse, 4k!"
SENTENCE_IDS = [320, 1125, 539, 550, 18376, 6765, 320, 4558, 267, 275, 330, 256]   # open_clip.tokenize
LONG_PROMPT = " ".join(["red cat blue dog green tree small house big sky"] * 10)     # 100 words


# ----------------------------------------------------------------------------- helpers


def released(name: str, prefix: str) -> dict[str, tuple[int, ...]]:
    """The released tensors of one tower, prefix stripped."""
    tensors = json.loads((KEYS_DIR / name).read_text())["tensors"]
    return {k[len(prefix):]: tuple(v) for k, v in tensors.items() if k.startswith(prefix)}


def tiny(cfg: TextEncoderConfig, projection_dim: int | None = None) -> TextEncoderConfig:
    """A tiny tower of the same kind; the vocabulary stays 49408 so the real tokenizer works."""
    proj = (64 if cfg.projection_dim else 0) if projection_dim is None else projection_dim
    return dataclasses.replace(cfg, width=64, layers=2, heads=2, mlp=128, projection_dim=proj)


def random_tensors(cfg: TextEncoderConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for every released key of cfg (prefix stripped); LayerNorm gains near 1."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_keys(cfg).items():
        t = torch.randn(shape, generator=g) * 0.1
        if ("norm" in name or "ln_" in name) and name.endswith("weight"):
            t = t + 1.0
        out[name] = t
    return out


def prompt_tokens(pad: int) -> torch.Tensor:
    """(2, 77): the sentence and an empty prompt."""
    return torch.stack([tokenize(SENTENCE, pad), tokenize("", pad)])


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    assert a.shape == b.shape, (a.shape, b.shape)
    return bool((a - b).abs().max() <= rel * b.abs().max())


# ----------------------------------------------------------------------------- layouts


LAYOUTS = [
    ("sd1.json", clip_l_config("cond_stage_model.transformer."), {"text_model.embeddings.position_ids"}),
    ("sd2_768_v.json", openclip_h_config("cond_stage_model.model."), {"logit_scale"}),
    ("sdxl_base.json", clip_l_config("conditioner.embedders.0.transformer.", "penultimate", False),
     {"text_model.embeddings.position_ids"}),
    ("sdxl_base.json", openclip_bigg_config("conditioner.embedders.1.model."), {"logit_scale"}),
    ("sdxl_refiner.json", openclip_bigg_config("conditioner.embedders.0.model."), {"logit_scale"}),
]


@pytest.mark.parametrize("name,cfg,optional", LAYOUTS, ids=[f"{n}:{c.prefix}" for n, c, _ in LAYOUTS])
def test_expected_keys_match_released_files(name, cfg, optional):
    ref = released(name, cfg.prefix)
    assert {k for k in ref if ignorable_key(k)} == optional
    required = {k: v for k, v in ref.items() if not ignorable_key(k)}
    ours = expected_keys(cfg)
    assert sorted(set(ours) - set(required)) == [] and sorted(set(required) - set(ours)) == []
    assert ours == required
    assert len(ours) == {"hf": 4 + 16 * 12, "openclip": 5 + 12 * cfg.layers}[cfg.naming]


def test_full_size_config_numbers():
    h, g = openclip_h_config("x."), openclip_bigg_config("y.")
    assert (h.width, h.layers, h.heads, h.mlp, h.act, h.pad_token, h.projection_dim) == (1024, 24, 16, 4096, "gelu", 0, 1024)
    assert (g.width, g.layers, g.heads, g.mlp, g.layer, g.final_ln, g.output_pooled) == (1280, 32, 20, 5120, "penultimate", False, True)
    l1 = clip_l_config("z.")
    assert (l1.width, l1.heads, l1.act, l1.pad_token, l1.layer, l1.final_ln) == (768, 12, "quick_gelu", EOT, "last", True)


def test_ignorable_key():
    assert ignorable_key("text_model.embeddings.position_ids") and ignorable_key("embeddings.position_ids")
    assert ignorable_key("logit_scale")
    assert not ignorable_key("text_projection") and not ignorable_key("positional_embedding")


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_known_ids_and_open_clip():
    assert encode(SENTENCE) == SENTENCE_IDS
    import open_clip

    for text in [SENTENCE, "Héllo wörld &amp; CamelCase it's 1234, (weird)  spacing\n\ttabs 🐱", ""]:
        ref = open_clip.tokenize([text])[0]              # pads with 0
        assert tokenize(text, 0).tolist() == ref.tolist()


def test_tokenize_padding_rules():
    n = len(SENTENCE_IDS)
    clip_l = tokenize(SENTENCE, EOT).tolist()
    assert clip_l[: n + 2] == [SOT] + SENTENCE_IDS + [EOT] and clip_l[n + 2:] == [EOT] * (75 - n)
    oc = tokenize(SENTENCE, 0).tolist()
    assert oc[: n + 2] == clip_l[: n + 2] and oc[n + 2:] == [0] * (75 - n) and len(oc) == 77
    empty, w = tokenize_weighted("", 0)
    assert empty.tolist() == [[SOT, EOT] + [0] * 75] and w.tolist() == [[1.0] * 77]


def test_parse_prompt_attention_cases():
    got = parse_prompt_attention("a (b:1.5) [c] ((d))")
    assert [f for f, _ in got] == ["a ", "b", " ", "c", " ", "d"]
    assert [w for _, w in got] == pytest.approx([1.0, 1.5, 1.0, 1 / 1.1, 1.0, 1.21])
    assert parse_prompt_attention("((a:2) b)") == [("a", pytest.approx(2.2)), (" b", pytest.approx(1.1))]
    assert parse_prompt_attention("[[x]]")[0][1] == pytest.approx(1 / 1.21)
    assert parse_prompt_attention(r"\(x\) \[y\] a\\b") == [("(x) [y] a\\b", 1.0)]
    assert parse_prompt_attention("a) b] c: d") == [("a) b] c: d", 1.0)]
    assert parse_prompt_attention("(open end") == [("open end", pytest.approx(1.1))]
    assert parse_prompt_attention("") == [("", 1.0)]
    assert parse_prompt_attention("one BREAK two") == [("one", 1.0), ("BREAK", -1.0), ("two", 1.0)]
    assert parse_prompt_attention("breaking BREAKS") == [("breaking BREAKS", 1.0)]


def test_weighted_tokens_and_break():
    tokens, weights = tokenize_weighted("a (red:1.5) [cat]", EOT)
    a, red, cat = encode("a"), encode("red"), encode("cat")
    assert tokens.shape == (1, 77)
    assert tokens[0, :5].tolist() == [SOT] + a + red + cat + [EOT]
    assert weights[0, :5].tolist() == pytest.approx([1.0, 1.0, 1.5, 1 / 1.1, 1.0]) and weights[0, 5:].eq(1).all()

    tokens, weights = tokenize_weighted("a cat BREAK (a dog:0.5)", 0)
    assert tokens.shape == (2, 77)
    assert tokens[0, :4].tolist() == [SOT] + encode("a cat") + [EOT] and tokens[0, 4:].eq(0).all()
    assert tokens[1, :4].tolist() == [SOT] + encode("a dog") + [EOT]
    assert weights[1, 1:3].tolist() == [0.5, 0.5] and weights[0].eq(1).all()


def test_long_prompt_chunks():
    ids = encode(LONG_PROMPT)
    assert len(ids) == 100                                   # one token per word
    tokens, weights = tokenize_weighted(LONG_PROMPT, EOT)
    assert tokens.shape == (2, 77) and weights.shape == (2, 77)
    assert tokens[:, 0].tolist() == [SOT, SOT] and tokens[0, 76].item() == EOT
    assert tokens[0, 1:76].tolist() == ids[:75]
    rest = ids[75:]
    assert tokens[1, 1:1 + len(rest)].tolist() == rest and tokens[1, 1 + len(rest):].eq(EOT).all()
    exactly, _ = tokenize_weighted(" ".join(["cat"] * 75), EOT)
    assert exactly.shape == (1, 77)                          # 75 tokens still fit one chunk
    more, _ = tokenize_weighted(" ".join(["cat"] * 76), EOT)
    assert more.shape == (2, 77) and more[1, :3].tolist() == [SOT, encode("cat")[0], EOT]


# ----------------------------------------------------------------------------- parity with transformers via diffusers


def hf_reference(cfg: TextEncoderConfig, checkpoint: dict, with_projection: bool):
    """transformers CLIPTextModel(WithProjection) from an explicit config, loaded by diffusers' converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, hidden_size=cfg.width, intermediate_size=cfg.mlp,
                            projection_dim=cfg.projection_dim or cfg.width, num_hidden_layers=cfg.layers,
                            num_attention_heads=cfg.heads, max_position_embeddings=77, hidden_act=cfg.act,
                            layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=SOT, eos_token_id=EOT)
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()
    if cfg.naming == "hf":
        state = convert_ldm_clip_checkpoint(checkpoint)
    else:
        state = convert_open_clip_checkpoint(model, checkpoint, prefix=cfg.prefix)
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    if not hasattr(model, "text_model"):                     # transformers >= 5 flattened CLIPTextModel
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model


def test_clip_l_parity_with_diffusers_converter():
    cfg = tiny(clip_l_config("cond_stage_model.transformer."))
    weights = random_tensors(cfg)
    checkpoint = {cfg.prefix + k: v for k, v in weights.items()}
    checkpoint[cfg.prefix + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    ref = hf_reference(cfg, checkpoint, with_projection=False)

    enc = build_text_encoder(cfg, device="meta")
    load_text_encoder_weights(enc, weights, cfg)
    tokens = prompt_tokens(cfg.pad_token)
    with torch.no_grad():
        out = ref(input_ids=tokens, output_hidden_states=True)
        last, pooled = enc(tokens)
    assert pooled is None
    assert close(last, out.last_hidden_state)
    assert last.abs().max() > 0.5                            # a real signal, not zeros

    sdxl_cfg = dataclasses.replace(cfg, layer="penultimate", final_ln=False, output_pooled=True)
    enc_xl = build_text_encoder(sdxl_cfg, device="meta")
    load_text_encoder_weights(enc_xl, weights, sdxl_cfg)
    with torch.no_grad():
        pen, pooled = enc_xl(tokens)
        skip2, _ = encode_prompt(enc, SENTENCE, clip_skip=2)
        skip1, _ = encode_prompt(enc, SENTENCE)
    assert close(pen, out.hidden_states[-2])
    assert not close(pen, out.hidden_states[-1], 1e-2)
    assert close(pooled, out.pooler_output)                  # no projection in SD1/SDXL CLIP-L files
    # A1111 clip skip 2 on SD1: penultimate layer, then the final LayerNorm.
    final_ln = getattr(ref, "text_model", ref).final_layer_norm
    with torch.no_grad():
        assert close(skip2[0], final_ln(out.hidden_states[-2])[0])
    assert close(skip1[0], out.last_hidden_state[0])


@pytest.mark.parametrize("prefix", ["conditioner.embedders.1.model.", "conditioner.embedders.0.model."])
def test_openclip_parity_with_diffusers_converter(prefix):
    cfg = tiny(openclip_bigg_config(prefix))
    assert (cfg.act, cfg.layer, cfg.final_ln, cfg.output_pooled, cfg.projection_dim) == ("gelu", "penultimate", False, True, 64)
    weights = random_tensors(cfg, seed=1)
    checkpoint = {prefix + k: v for k, v in weights.items()}
    checkpoint[prefix + "logit_scale"] = torch.tensor(4.6)
    ref = hf_reference(cfg, checkpoint, with_projection=True)

    enc = build_text_encoder(cfg, device="meta")
    load_text_encoder_weights(enc, {k[len(prefix):]: v for k, v in checkpoint.items()}, cfg)
    tokens = prompt_tokens(cfg.pad_token)
    with torch.no_grad():
        out = ref(input_ids=tokens, output_hidden_states=True)
        pen, pooled = enc(tokens)
        last, _ = enc(tokens, layer_index=-1)
        emb, _ = enc(tokens, layer_index=0)
    assert pen.shape == (2, 77, 64) and pooled.shape == (2, 64)
    assert close(pen, out.hidden_states[-2])
    assert close(last, out.hidden_states[-1])
    assert close(emb, out.hidden_states[0])
    assert close(pooled, out.text_embeds)
    assert pooled.abs().max() > 0.1

    # SD2 use: penultimate, then ln_final; no pooled output.
    sd2_cfg = dataclasses.replace(cfg, final_ln=True, output_pooled=False)
    sd2 = build_text_encoder(sd2_cfg)
    load_text_encoder_weights(sd2, weights, sd2_cfg)
    with torch.no_grad():
        h, p = sd2(tokens)
        want = ref.text_model.final_layer_norm(out.hidden_states[-2])
    assert p is None and close(h, want)


# ----------------------------------------------------------------------------- loader


def test_loader_accepts_old_names_and_position_ids_variants():
    cfg = tiny(clip_l_config("cond_stage_model.transformer."))
    weights = random_tensors(cfg, seed=2)
    tokens = prompt_tokens(EOT)
    results = []
    variants = [
        dict(weights),                                                        # no position_ids
        {**weights, "text_model.embeddings.position_ids": torch.arange(77)[None]},
        {**weights, "text_model.embeddings.position_ids": torch.arange(77.0)[None] - 0.01},  # float, damaged
        {k.removeprefix("text_model."): v for k, v in weights.items()},     # old files without text_model.
    ]
    for tensors in variants:
        enc = build_text_encoder(cfg, device="meta")
        load_text_encoder_weights(enc, tensors, cfg)
        with torch.no_grad():
            results.append(enc(tokens)[0])
    assert enc.text_model.embeddings.position_ids.tolist() == [list(range(77))]
    for r in results[1:]:
        assert torch.equal(r, results[0])


def test_loader_strict_errors_and_dtype():
    cfg = tiny(openclip_h_config("cond_stage_model.model."))
    weights = random_tensors(cfg)
    enc = build_text_encoder(cfg, device="meta", dtype=torch.float64)
    missing = {k: v for k, v in weights.items() if k != "ln_final.bias"}
    with pytest.raises(ValueError, match="missing \\['ln_final.bias'\\]"):
        load_text_encoder_weights(enc, missing, cfg)
    with pytest.raises(ValueError, match="unexpected \\['transformer.resblocks.2.ln_1.weight'\\]"):
        load_text_encoder_weights(enc, {**weights, "transformer.resblocks.2.ln_1.weight": torch.ones(64)}, cfg)
    with pytest.raises(ValueError, match="wrong shape"):
        load_text_encoder_weights(enc, {**weights, "text_projection": torch.ones(64, 32)}, cfg)
    load_text_encoder_weights(enc, {**weights, "logit_scale": torch.tensor(1.0)}, cfg)
    assert all(p.dtype == torch.float64 and not p.is_meta for p in enc.parameters())
    assert torch.equal(enc.text_projection, weights["text_projection"].double())


# ----------------------------------------------------------------------------- prompt encoding


def test_encode_prompt_weighting_and_chunks():
    cfg = tiny(openclip_bigg_config("conditioner.embedders.1.model."))
    enc = build_text_encoder(cfg)
    load_text_encoder_weights(enc, random_tensors(cfg, seed=3), cfg)

    plain, pooled_plain = encode_prompt(enc, "a red cat")
    weighted, pooled_w = encode_prompt(enc, "a (red:1.5) cat")
    tokens = tokenize("a red cat", 0)[None]
    with torch.no_grad():
        raw, pooled_raw = enc(tokens)
    assert torch.equal(plain, raw) and torch.equal(pooled_plain, pooled_raw)
    # A1111: z * w, then rescaled so the mean is kept.
    w = torch.ones(77)
    w[2] = 1.5
    z = raw[0] * w[:, None]
    z = z * (raw.mean() / z.mean())
    assert close(weighted[0], z, 1e-6)
    assert weighted.mean().item() == pytest.approx(raw.mean().item(), rel=1e-5, abs=1e-7)
    assert torch.equal(pooled_w, pooled_raw)                 # pooled is never weighted

    hidden, pooled = encode_prompt(enc, LONG_PROMPT)
    chunks, _ = tokenize_weighted(LONG_PROMPT, 0)
    with torch.no_grad():
        per_chunk = [enc(chunks[i:i + 1]) for i in range(2)]
    assert hidden.shape == (1, 154, 64) and pooled.shape == (1, 64)
    assert close(hidden[0, :77], per_chunk[0][0][0], 1e-5) and close(hidden[0, 77:], per_chunk[1][0][0], 1e-5)
    assert close(pooled, per_chunk[0][1], 1e-5)

    empty, empty_pooled = encode_prompt(enc, "")
    assert empty.shape == (1, 77, 64) and torch.isfinite(empty).all() and empty_pooled.shape == (1, 64)
