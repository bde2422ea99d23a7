"""Textual-inversion embeddings (sd.embeddings): A1111 .pt (string_to_param), .safetensors (emb_params) and SDXL
(clip_l + clip_g) files give the conditioning of transformers' CLIP text models with the vectors added to their
vocabulary (what diffusers' load_textual_inversion does), within 1e-4 of the largest magnitude; chunking, refusals,
`TI hashes` infotext, and the base model untouched."""
from __future__ import annotations

import hashlib
import pickle

import pytest
import torch
from safetensors.torch import save_file

from sd.checkpoint import CheckpointError
from sd.embeddings import (embedding_hash, read_embedding, tokenize_with_embeddings, use_embeddings, Active,
                           load_embedding)
from sd.families.common import encode_text
from sd.pipeline import GenerateParams, generate, load_model
from sd.pnginfo import build_parameters, parse_parameters, to_settings
from sd.tokenizer import encode, tokenize_weighted

from .test_parity_pipeline import diffusers_parts, rel_err

VOCAB = 49408


def _hf_reference(texts, spec, tokens, fixes):
    """Context (and pooled) of transformers' CLIP models with one new vocabulary row per embedding vector, the
    prompt's placeholder positions given those new ids."""
    ids = tokens.clone()
    hidden, pooled = [], None
    for model, cfg, vecs in zip(texts, spec.text_encoders, fixes):
        tm = getattr(model, "text_model", model)
        table = tm.embeddings.token_embedding
        rows = [v for _, _, v in vecs]
        new = torch.cat([table.weight.data, *rows]) if rows else table.weight.data
        tm.embeddings.token_embedding = torch.nn.Embedding.from_pretrained(new, freeze=True)
        tm.eos_token_id = 49407                # pool at the first EOT (new ids are above it)
        ids = tokens.clone()
        nxt = VOCAB
        for row, pos, v in vecs:
            ids[row, pos:pos + v.shape[0]] = torch.arange(nxt, nxt + v.shape[0])
            nxt += v.shape[0]
        out = model(ids, output_hidden_states=True)
        sd2_style = cfg.naming == "openclip" and cfg.final_ln
        h = out.hidden_states[-1 if cfg.layer == "last" or sd2_style else -2]
        if cfg.final_ln:
            h = tm.final_layer_norm(h)
        hidden.append(h.reshape(1, -1, h.shape[-1]))
        if cfg.output_pooled:
            pooled = out.text_embeds[:1]
        tm.embeddings.token_embedding = table
    return torch.cat(hidden, -1), pooled


@torch.no_grad()
def test_pt_embedding_matches_clip_with_added_rows(tiny_files, tmp_path) -> None:
    """SD 1.x, an A1111 .pt with 3 vectors, used twice (once weighted 1.0 explicitly) in a prompt."""
    model = load_model(tiny_files("sd1"))
    spec = model.spec
    g = torch.Generator().manual_seed(0)
    vec = torch.randn(3, 64, generator=g)
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": vec}, "name": "mystyle",
                "step": 1000, "sd_checkpoint": None, "sd_checkpoint_name": None}, tmp_path / "mystyle.pt")
    prompt = "a photo in mystyle, a red car next to (mystyle:1.0) trees"
    base, _ = encode_text(model.parts.text_encoders, spec, prompt, 1)
    with use_embeddings(model.parts.text_encoders, [tmp_path / "mystyle.pt"], "SD 1.x") as used:
        ours, _ = encode_text(model.parts.text_encoders, spec, prompt, 1)
    assert used == {"mystyle": hashlib.sha256((tmp_path / "mystyle.pt").read_bytes()).hexdigest()[:12]}
    act = Active({tuple(encode("mystyle")): (read_embedding(tmp_path / "mystyle.pt"), vec, "")}, {})
    tokens, weights, fixes = tokenize_with_embeddings(prompt, 49407, act)
    n_plain = len(encode("a photo in , a red car next to  trees"))
    assert [(r, p) for r, p, _ in fixes] == [(0, 4), (0, 13)] and tokens.shape == (1, 77)
    assert int((tokens[0, 1:] != 49407).sum()) == n_plain + 6        # 6 placeholder positions, ids 0
    assert torch.equal(tokens[0, 4:7], torch.zeros(3, dtype=torch.long))
    unet, vae, texts = diffusers_parts(tiny_files("sd1"), spec)
    ref, _ = _hf_reference(texts, spec, tokens, [fixes])
    assert rel_err(ours, ref) < 1e-4
    assert (ours - base).abs().max() > 0.05 * base.abs().max()       # the embedding changed the context


@torch.no_grad()
def test_sdxl_safetensors_embedding_both_towers(tiny_files, tmp_path) -> None:
    """SDXL {clip_l, clip_g}: each tower gets its own vectors; context and pooled equal the added-rows reference."""
    model = load_model(tiny_files("sdxl_base"))
    spec = model.spec
    g = torch.Generator().manual_seed(1)
    vl, vg = torch.randn(2, 64, generator=g), torch.randn(2, 64, generator=g)
    save_file({"clip_l": vl, "clip_g": vg}, str(tmp_path / "xlthing.safetensors"))
    prompt = "xlthing on a hill"
    with use_embeddings(model.parts.text_encoders, [tmp_path / "xlthing.safetensors"], "SDXL") as used:
        ours, pooled = encode_text(model.parts.text_encoders, spec, prompt, 1)
    assert list(used) == ["xlthing"]
    emb = read_embedding(tmp_path / "xlthing.safetensors")
    assert torch.equal(emb.vectors["clip_l"], vl) and torch.equal(emb.vectors["clip_g"], vg)
    tokens, _, fl = tokenize_with_embeddings(prompt, 0, Active({tuple(encode("xlthing")): (emb, vl, "")}, {}))
    _, _, fg = tokenize_with_embeddings(prompt, 0, Active({tuple(encode("xlthing")): (emb, vg, "")}, {}))
    assert [(r, p) for r, p, _ in fl] == [(0, 1)]
    _, _, texts = diffusers_parts(tiny_files("sdxl_base"), spec)
    # the towers pad differently (CLIP-L with EOT, bigG with 0): the same positions either way
    tok_l = tokenize_with_embeddings(prompt, 49407, Active({tuple(encode("xlthing")): (emb, vl, "")}, {}))[0]
    ref_l, _ = _hf_reference(texts[:1], type(spec)(**{**spec.__dict__, "text_encoders": spec.text_encoders[:1]}),
                             tok_l, [fl])
    ref_g, ref_pooled = _hf_reference(texts[1:], type(spec)(**{**spec.__dict__, "text_encoders": spec.text_encoders[1:]}),
                                      tokens, [fg])
    ref = torch.cat([ref_l, ref_g], -1)
    assert rel_err(ours, ref) < 1e-4 and rel_err(pooled, ref_pooled) < 1e-4


def test_tokenizing_without_embeddings_is_unchanged_and_chunks_move(tmp_path) -> None:
    prompt = "a (red:1.3) car BREAK on a road, " + "tree " * 80
    t, w, f = tokenize_with_embeddings(prompt, 49407, None)
    t0, w0 = tokenize_weighted(prompt, 49407)
    assert torch.equal(t, t0) and torch.equal(w, w0) and f == []
    # 74 plain tokens, then a 3-vector embedding: it does not fit the first chunk (75), so it starts the second
    vec = torch.zeros(3, 8)
    save_file({"emb_params": vec}, str(tmp_path / "zzemb.safetensors"))
    act = Active({tuple(encode("zzemb")): (read_embedding(tmp_path / "zzemb.safetensors"), vec, "")}, {})
    t, w, f = tokenize_with_embeddings("cat " * 74 + "zzemb dog", 49407, act)
    assert t.shape == (2, 77) and [(r, p) for r, p, _ in f] == [(1, 1)]
    assert int((t[0, 1:] != 49407).sum()) == 74 and t[0, 75].item() == 49407   # chunk 1 padded after 74
    assert t[1, 1:4].tolist() == [0, 0, 0] and t[1, 4].item() == encode("dog")[0]


def test_refusals_and_file_kinds(tiny_files, tmp_path) -> None:
    model = load_model(tiny_files("sd1"))
    save_file({"emb_params": torch.randn(2, 32)}, str(tmp_path / "narrow.safetensors"))
    save_file({"clip_l": torch.randn(1, 64), "clip_g": torch.randn(1, 64)}, str(tmp_path / "xlonly.safetensors"))
    encs, spec = model.parts.text_encoders, model.spec
    with use_embeddings(encs, [tmp_path / "narrow.safetensors", tmp_path / "xlonly.safetensors"], "SD 1.x"):
        encode_text(encs, spec, "a narrowing road", 1)      # substring only: not the name's tokens, not refused
        with pytest.raises(ValueError, match=r"^narrow.safetensors: an embedding of 32-wide vectors, the text tower "
                                             r"of SD 1.x is 64 wide"):
            encode_text(encs, spec, "a narrow road", 1)
        with pytest.raises(ValueError, match=r"^xlonly.safetensors: an embedding for clip_g, clip_l, which SD 1.x "
                                             r"does not have \(1 text tower\)"):
            encode_text(encs, spec, "xlonly", 1)
    assert read_embedding(tmp_path / "narrow.safetensors").vectors[""].shape == (2, 32)
    torch.save({"<tok>": torch.randn(64)}, tmp_path / "learned_embeds.bin")          # diffusers' one-token file
    assert read_embedding(tmp_path / "learned_embeds.bin").vectors[""].shape == (1, 64)
    with pytest.raises(CheckpointError, match="^sd1.safetensors: not a textual-inversion embedding"):
        read_embedding(tiny_files("sd1"))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"string_to_param": {"*": Evil()}}, protocol=2))
    with pytest.raises(CheckpointError, match="^evil.pt: refused: the pickle asks to run code"):
        load_embedding(tmp_path / "evil.pt")


def test_generate_uses_the_folder_and_writes_ti_hashes(tiny_files, tmp_path) -> None:
    model = load_model(tiny_files("sd1"))
    folder = tmp_path / "models" / "embeddings"
    folder.mkdir(parents=True)
    save_file({"emb_params": 2 * torch.randn(4, 64, generator=torch.Generator().manual_seed(3))},
              str(folder / "badhands.safetensors"))
    before = {k: v.clone() for k, v in model.parts.text_encoders[0].state_dict().items()}
    common = dict(width=64, height=64, steps=2, seed=1)
    plain = generate(model, GenerateParams(prompt="a hand", negative_prompt="badhands", **common))
    res = generate(model, GenerateParams(prompt="a hand", negative_prompt="badhands",
                                         models_dir=str(tmp_path / "models"), **common))
    assert (res.latents - plain.latents).abs().max() > 1e-3
    assert res.info["infotext"] == {"TI hashes": f"badhands: {embedding_hash(folder / 'badhands.safetensors')}"}
    none = generate(model, GenerateParams(prompt="a hand", models_dir=str(tmp_path / "models"), **common))
    assert torch.equal(none.latents, generate(model, GenerateParams(prompt="a hand", **common)).latents)
    assert "infotext" not in none.info
    assert all(torch.equal(before[k], v) for k, v in model.parts.text_encoders[0].state_dict().items())
    text = build_parameters(prompt="a hand", negative_prompt="badhands", steps=2, sampler="euler",
                            schedule="normal", cfg=7, seed=1, width=64, height=64, model_name="sd1", model_hash=None,
                            extra_fields=res.info["infotext"])
    assert to_settings(parse_parameters(text))["ti_hashes"] == {"badhands": embedding_hash(folder / "badhands.safetensors")}
