"""The LDM text-to-image models (issue 11): txt2img-f8-large's text transformer (sd/ldm_bert.py, the x-transformers
layout of LDM's BERTEmbedder) against diffusers' LDMBertModel with the keys mapped, BERT uncased WordPiece ids of a
tiny vocabulary written here, where vocab.txt is looked for, and a tiny txt2img-f8-large generating through the CLI;
a missing or wrong vocabulary and an unreachable hub are one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd.checkpoint import CheckpointError
from sd.config import TextEncoderConfig
from sd.ldm_bert import LDMBert, bert_config, encode, find_vocab, load_tokenizer, tokenize
from sd.pipeline import GenerateParams, generate, load_model

torch.set_num_threads(1)
TEXT = "cond_stage_model.transformer."
# a tiny uncased WordPiece vocabulary: id = line number, BERT's special tokens at 0 and 2..5 as in bert-base-uncased
VOCAB = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "##s", "the", "red",
         "house", ",", "."]


def write_vocab(path: Path, tokens=VOCAB) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return path


def write_txt2img(path: Path, seed: int = 0) -> Path:
    """Tiny txt2img-f8-large (tests/tiny.py: text 64 wide, 1 head of 64, the same 32 layer pairs) with a token
    embedding of the tiny vocabulary's size (the logits head, unused and ignored by rule, as small)."""
    from safetensors.torch import save_file

    from .tiny import tiny_state_dict

    sd = tiny_state_dict("ldm_txt2img_f8_large", seed)
    g = torch.Generator().manual_seed(seed + 1)
    sd[TEXT + "token_emb.weight"] = 0.5 * torch.randn(len(VOCAB), 64, generator=g)
    sd[TEXT + "to_logits.weight"] = torch.zeros(len(VOCAB), 64)
    sd[TEXT + "to_logits.bias"] = torch.zeros(len(VOCAB))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def test_wordpiece_ids_of_the_tiny_vocabulary(tmp_path: Path) -> None:
    tok = load_tokenizer(write_vocab(tmp_path / "vocab.txt"), 16)
    # lower-cased, "cats" -> cat ##s, punctuation split, unknown words [UNK] (2), [CLS] 3 ... [SEP] 4, [PAD] 0
    assert tokenize(tok, ["A photo of Cats, the zebra."], 13).tolist() == [[3, 6, 7, 8, 9, 10, 14, 11, 2, 15, 4, 0, 0]]
    assert tokenize(tok, [""], 5).tolist() == [[3, 4, 0, 0, 0]]
    long = tokenize(tok, ["red " * 100], 77)
    assert long.shape == (1, 77) and long[0, 0] == 3 and long[0, -1] == 4 and set(long[0, 1:-1].tolist()) == {12}
    with pytest.raises(ValueError, match=r"not a BERT WordPiece vocabulary \(no \[CLS\]\)") as e:
        load_tokenizer(write_vocab(tmp_path / "bad.txt", [t for t in VOCAB if t != "[CLS]"]), 16)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="16 tokens, but the model's token embedding has 8 rows"):
        load_tokenizer(tmp_path / "vocab.txt", 8)


def _random_bert(cfg: TextEncoderConfig, seed: int = 0) -> LDMBert:
    m = LDMBert(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0)
                    + 0.2 * torch.randn(p.shape, generator=g))
    return m


def test_text_transformer_matches_diffusers_ldmbert() -> None:
    """The x-transformers forward (pre-norm attention / GELU feed-forward pairs, absolute positions, final norm)
    equals diffusers' LDMBertModel's last_hidden_state, the keys mapped as in the reference notes (token_emb ->
    embed_tokens, pos_emb.emb -> embed_positions, layers 2i -> self_attn*, 2i+1 -> fc1 / fc2 / final_layer_norm)."""
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    shapes = {TEXT + "token_emb.weight": (16, 48), TEXT + "pos_emb.emb.weight": (77, 48)}
    for i in range(3):
        a, f = f"{TEXT}attn_layers.layers.{2 * i}.", f"{TEXT}attn_layers.layers.{2 * i + 1}."
        shapes.update({a + "1.to_q.weight": (128, 48), f + "1.net.0.0.weight": (96, 48)})
    cfg = bert_config(shapes, TEXT)
    assert (cfg.width, cfg.layers, cfg.heads, cfg.mlp, cfg.vocab_size, cfg.context_length) == (48, 3, 2, 96, 16, 77)
    ours = _random_bert(cfg)
    ref = LDMBertModel(LDMBertConfig(vocab_size=16, max_position_embeddings=77, encoder_layers=3, encoder_ffn_dim=96,
                                     encoder_attention_heads=2, head_dim=64, d_model=48, dropout=0.0)).eval()
    src = ours.state_dict()
    out = {"model.embed_tokens.weight": src["token_emb.weight"], "model.embed_positions.weight": src["pos_emb.emb.weight"],
           "model.layer_norm.weight": src["norm.weight"], "model.layer_norm.bias": src["norm.bias"],
           "to_logits.weight": torch.zeros(16, 48), "to_logits.bias": torch.zeros(16)}
    for i in range(3):
        a, f, d = f"attn_layers.layers.{2 * i}.", f"attn_layers.layers.{2 * i + 1}.", f"model.layers.{i}."
        for ours_name, theirs in (("0.weight", "self_attn_layer_norm.weight"), ("0.bias", "self_attn_layer_norm.bias"),
                                  ("1.to_q.weight", "self_attn.q_proj.weight"),
                                  ("1.to_k.weight", "self_attn.k_proj.weight"),
                                  ("1.to_v.weight", "self_attn.v_proj.weight"),
                                  ("1.to_out.weight", "self_attn.out_proj.weight"),
                                  ("1.to_out.bias", "self_attn.out_proj.bias")):
            out[d + theirs] = src[a + ours_name]
        for ours_name, theirs in (("0.weight", "final_layer_norm.weight"), ("0.bias", "final_layer_norm.bias"),
                                  ("1.net.0.0.weight", "fc1.weight"), ("1.net.0.0.bias", "fc1.bias"),
                                  ("1.net.2.weight", "fc2.weight"), ("1.net.2.bias", "fc2.bias")):
            out[d + theirs] = src[f + ours_name]
    ref.load_state_dict(out, strict=True)
    tokens = torch.randint(0, 16, (2, 77), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = ours(tokens)[0]
        want = ref(tokens).last_hidden_state
    assert got.shape == (2, 77, 48)
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


def test_where_the_vocabulary_is_found(tmp_path: Path) -> None:
    """--bert-vocab (a file or a folder with one) first, then beside the checkpoint, the text-encoder folders, the
    folders above (the models folder, where `download bert-vocab` puts it)."""
    ckpt = tmp_path / "models" / "checkpoints" / "x.safetensors"
    ckpt.parent.mkdir(parents=True)
    assert find_vocab(ckpt, None, []) is None
    top = write_vocab(tmp_path / "models" / "vocab.txt")
    assert find_vocab(ckpt, None, []) == top
    te = write_vocab(tmp_path / "models" / "text_encoders" / "vocab.txt")
    assert find_vocab(ckpt, None, [te.parent]) == te
    beside = write_vocab(ckpt.parent / "bert-base-uncased" / "vocab.txt")
    assert find_vocab(ckpt, None, [te.parent]) == beside
    given = write_vocab(tmp_path / "elsewhere" / "vocab.txt")
    assert find_vocab(ckpt, str(given), [te.parent]) == given
    assert find_vocab(ckpt, str(given.parent), [te.parent]) == given
    with pytest.raises(FileNotFoundError, match="--bert-vocab .*: no such file"):
        find_vocab(ckpt, str(tmp_path / "nope.txt"), [])


@pytest.fixture(scope="module")
def txt2img(tmp_path_factory):
    root = tmp_path_factory.mktemp("txt")
    return write_txt2img(root / "models" / "txt2img-f8-large.safetensors")


def test_txt2img_generates_through_the_cli_and_refuses_without_a_vocabulary(txt2img, tmp_path: Path, capsys) -> None:
    from sd.__main__ import main

    common = ["--width", "64", "--height", "64", "--steps", "2", "--sampler", "ddim", "--schedule", "ddim_uniform",
              "--seed", "7", "--cfg", "5"]
    # no vocab.txt anywhere near: one line saying what is missing and how to get it, exit 2, nothing written
    bad = tmp_path / "bad.png"
    assert main(["generate", "--checkpoint", str(txt2img), "--prompt", "a red house", *common,
                 "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vocab.txt" in err and "--bert-vocab" in err and not bad.exists()
    # --bert-vocab PATH
    vocab = write_vocab(tmp_path / "v" / "vocab.txt")
    out = tmp_path / "out.png"
    assert main(["generate", "--checkpoint", str(txt2img), "--prompt", "a red house", "--bert-vocab", str(vocab),
                 *common, "--out", str(out)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["family"] == "ldm-txt2img-f8-large"
    model = load_model(txt2img, sources=__import__("sd.text_encoders", fromlist=["TextSources"]).TextSources(
        bert_vocab=str(vocab)))
    assert model.spec.latent.scale == 0.18215 and model.spec.unet.context_dim == 64
    p = GenerateParams(prompt="a red house", width=64, height=64, steps=2, sampler="ddim", schedule="ddim_uniform",
                       seed=7, cfg=5.0)
    want = generate(model, p)
    img = np.asarray(Image.open(out))
    assert np.array_equal(img, np.asarray(want.images[0])) and img.std() > 1
    # the context is the transformer's output of the BERT ids; the unconditional branch the encoded ""
    from sd.families import get_family

    cond, uncond = get_family("ldm-txt2img-f8-large").condition(model.parts, model.spec, p, None)
    enc = model.parts.text_encoders[0]
    ids = torch.tensor([[3, 6, 12, 13, 4] + [0] * 72])
    assert torch.equal(cond["crossattn"], enc(ids)[0]) and cond["crossattn"].shape == (1, 77, 64)
    assert torch.equal(uncond["crossattn"], encode(enc, [""]))
    other = generate(model, GenerateParams(**{**p.__dict__, "prompt": "the cat"}))
    assert not torch.equal(other.latents, want.latents)


def test_a_vocabulary_that_is_not_berts_is_one_line(txt2img, tmp_path: Path) -> None:
    from sd.text_encoders import TextSources

    vocab = write_vocab(tmp_path / "vocab.txt", ["<pad>", "<s>", "</s>", "a"])
    with pytest.raises(CheckpointError, match=r"vocab.txt: not a BERT WordPiece vocabulary") as e:
        load_model(txt2img, sources=TextSources(bert_vocab=str(vocab)))
    assert "\n" not in str(e.value)


def test_download_bert_vocab_without_a_hub_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    import huggingface_hub.constants

    from sd.__main__ import main

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)   # as with no network: nothing reachable
    assert main(["download", "bert-vocab", "--models-dir", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "google-bert/bert-base-uncased/vocab.txt" in err and "by hand" in err
    assert "text_encoders" in err and not (tmp_path / "m" / "text_encoders" / "vocab.txt").exists()


def test_the_app_adds_the_vocabulary_to_the_cache_sources(tmp_path: Path) -> None:
    """--bert-vocab beside --keep-text-encoders / --t5-device: the load keeps those and adds the vocabulary."""
    from types import SimpleNamespace

    import app
    import app_extras
    from sd.text_encoders import TextSources

    own = TextSources(keep=True, t5_device="cpu")
    ctx = SimpleNamespace(cache=SimpleNamespace(sources=own), extras=app_extras.Extras())
    assert app.text_sources(ctx) is None                        # no vocabulary: the cache's own sources
    ctx.extras = app_extras.Extras(bert_vocab=tmp_path / "vocab.txt")
    assert app.text_sources(ctx) == TextSources(keep=True, t5_device="cpu", bert_vocab=str(tmp_path / "vocab.txt"))
    ctx.cache.sources = None
    assert app.text_sources(ctx) == TextSources(bert_vocab=str(tmp_path / "vocab.txt"))
