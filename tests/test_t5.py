"""T5: loading from the single-file naming (bundle prefix, separate files, fp16 / bf16 / fp8 weights), the
sentencepiece tokenizer (spiece.model and tokenizer.json) and SD3's T5 tokenization convention."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import T5EncoderModel

from sd.sd3_text import T5_PREFIX
from sd.t5 import (EOS, MAX_CHARS, T5Config, encode_t5, hf_config, load_t5, load_t5_tokenizer, t5_config_for,
                   t5_tokens)

from .tiny_sd3 import reference_shapes, tiny_text_tensors, write_tiny_spiece, write_tokenizer_json


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5tok")
    sp = write_tiny_spiece(root / "spiece.model")
    (root / "json").mkdir()
    write_tokenizer_json(sp, root / "json" / "tokenizer.json")
    return sp


def _t5_tensors() -> dict[str, torch.Tensor]:
    return {k[len(T5_PREFIX):]: v for k, v in tiny_text_tensors().items() if k.startswith(T5_PREFIX)}


def _reference(tensors: dict[str, torch.Tensor]) -> T5EncoderModel:
    """transformers' own model, loaded the way diffusers loads a bundled T5 (convert_sd3_t5_checkpoint_to_diffusers)."""
    from diffusers.loaders.single_file_utils import convert_sd3_t5_checkpoint_to_diffusers

    sd = convert_sd3_t5_checkpoint_to_diffusers({T5_PREFIX + k: v for k, v in tensors.items()})
    model = T5EncoderModel(hf_config(_cfg(tensors))).eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert missing == ["encoder.embed_tokens.weight"] and unexpected == []  # tied to shared.weight
    model.tie_weights()
    assert torch.equal(model.encoder.embed_tokens.weight, sd["shared.weight"])
    return model


def _cfg(tensors) -> T5Config:
    return t5_config_for({k: tuple(v.shape) for k, v in tensors.items()}, "")


def test_config_read_from_the_released_shapes() -> None:
    cfg = t5_config_for(reference_shapes("sd3_medium"))
    assert cfg == T5Config()  # T5-XXL: 24 blocks of 4096, 64 heads, d_ff 10240, vocab 32128
    assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.vocab_size) == (
        24, 4096, 64, 64, 10240, 32128)
    hf = hf_config(cfg)
    assert (hf.is_gated_act, hf.dense_act_fn, hf.layer_norm_epsilon) == (True, "gelu_new", 1e-6)


@torch.no_grad()
def test_bundle_naming_loads_and_matches_transformers() -> None:
    tensors = _t5_tensors()
    assert "shared.weight" in tensors and "encoder.embed_tokens.weight" not in tensors
    ours = load_t5(tensors)
    ref = _reference(tensors)
    tokens = torch.tensor([[5, 9, 17, 3, 1] + [0] * 72, [7, 7, 30, 1] + [0] * 73])
    out = encode_t5(ours, tokens)
    want = ref(input_ids=tokens).last_hidden_state
    assert out.shape == (2, 77, 96)
    assert want.abs().max() > 0.1
    assert ((out - want).abs().max() / want.abs().max()) < 1e-6
    # no attention mask: the padding takes part (changing a pad id changes the outputs)
    tokens2 = tokens.clone()
    tokens2[0, 60] = 4
    assert (encode_t5(ours, tokens2)[0, :5] - out[0, :5]).abs().max() > 1e-4
    # the embedding stays tied
    assert ours.encoder.embed_tokens.weight is ours.shared.weight


@torch.no_grad()
def test_separate_file_naming_with_both_embedding_names() -> None:
    tensors = _t5_tensors()
    both = dict(tensors, **{"encoder.embed_tokens.weight": tensors["shared.weight"]})
    only_alias = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in tensors.items()}
    tokens = torch.tensor([[5, 9, 17, 3, 1] + [0] * 72])
    a = encode_t5(load_t5(tensors), tokens)
    assert torch.equal(encode_t5(load_t5(both), tokens), a)
    assert torch.equal(encode_t5(load_t5(only_alias), tokens), a)


@pytest.mark.parametrize("file_dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn])
@torch.no_grad()
def test_low_precision_files_are_upcast(tmp_path, file_dtype) -> None:
    tensors = _t5_tensors()
    path = tmp_path / "t5xxl.safetensors"
    save_file({k: v.to(file_dtype).contiguous() for k, v in tensors.items()}, str(path))
    stored = load_file(str(path))
    assert stored["encoder.block.0.layer.0.SelfAttention.q.weight"].dtype == file_dtype
    model = load_t5(stored, dtype=torch.float32)
    q = model.encoder.block[0].layer[0].SelfAttention.q.weight
    assert q.dtype == torch.float32
    rounded = {k: v.to(file_dtype).float() for k, v in tensors.items()}  # the same rounding, done by hand
    assert torch.equal(q, rounded["encoder.block.0.layer.0.SelfAttention.q.weight"])
    tokens = torch.tensor([[5, 9, 17, 3, 1] + [0] * 72])
    out = encode_t5(model, tokens)
    assert torch.equal(out, encode_t5(load_t5(rounded), tokens))
    full = encode_t5(load_t5(tensors), tokens)
    err = ((out - full).abs().max() / full.abs().max()).item()
    assert 0 < err < (0.3 if file_dtype == torch.float8_e4m3fn else 0.05)  # rounded, not garbage


LINEARS = ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o", "DenseReluDense.wi_0",
           "DenseReluDense.wi_1", "DenseReluDense.wo")


@torch.no_grad()
def test_comfyui_scaled_fp8_file_loads_by_the_formula(tmp_path) -> None:
    """t5xxl_fp8_e4m3fn_scaled.safetensors as ComfyUI writes it: a `scaled_fp8` marker (an empty float8 tensor), each
    Linear weight stored as float8(w / s) with s = amax(|w|) / 448 in `NAME.scale_weight` (float32, one number), a
    `scale_input` on some; norms and the embedding in fp16. Loaded weight = float32(fp8) * scale_weight, exactly."""
    from sd.text_encoders import find_file

    tensors = _t5_tensors()
    stored, scales = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, {}
    for k, v in tensors.items():
        if k.endswith(".weight") and any(f".{n}." in k for n in LINEARS):
            s = (v.abs().max() / 448).float()
            stored[k] = (v / s).to(torch.float8_e4m3fn)
            stored[k[: -len("weight")] + "scale_weight"] = s.reshape(())
            scales[k] = s
        else:
            stored[k] = v.half()
    stored["encoder.block.0.layer.0.SelfAttention.q.scale_input"] = torch.tensor(1.0)
    assert len(scales) == 2 * len(LINEARS)   # two blocks
    path = tmp_path / "text_encoders" / "t5xxl_fp8_e4m3fn_scaled.safetensors"
    path.parent.mkdir()
    save_file({k: v.contiguous() for k, v in stored.items()}, str(path))
    assert find_file("t5xxl", [path.parent]) == path
    model = load_t5(load_file(str(path)), dtype=torch.float32)
    q = "encoder.block.1.layer.0.SelfAttention.q.weight"
    want = stored[q].float() * scales[q]
    assert want.abs().max() > 0 and torch.equal(model.state_dict()[q], want)
    by_hand = {k: (stored[k].float() * scales[k] if k in scales else stored[k].float()) for k in tensors}
    tokens = torch.tensor([[5, 9, 17, 3, 1] + [0] * 72])
    out = encode_t5(model, tokens)
    assert torch.equal(out, encode_t5(load_t5(by_hand), tokens))
    full = encode_t5(load_t5(tensors), tokens)
    err = ((out - full).abs().max() / full.abs().max()).item()
    assert 0 < err < 0.3   # fp8 rounding, not garbage (an unscaled load of the fp8 values would be off by 1/s)
    unscaled = encode_t5(load_t5({k: v for k, v in stored.items() if "scale" not in k}), tokens)
    assert ((unscaled - full).abs().max() / full.abs().max()).item() > 0.5
    with pytest.raises(ValueError, match="encoder.block.0.layer.0.SelfAttention.q.scale_weight scales a missing"):
        load_t5({k: v for k, v in stored.items() if k != "encoder.block.0.layer.0.SelfAttention.q.weight"})


@torch.no_grad()
def test_half_precision_model_keeps_wo_in_float32() -> None:
    model = load_t5(_t5_tensors(), dtype=torch.float16)
    ff = model.encoder.block[0].layer[1].DenseReluDense
    assert ff.wi_0.weight.dtype == torch.float16 and ff.wo.weight.dtype == torch.float32
    bf = load_t5(_t5_tensors(), dtype=torch.bfloat16)
    tokens = torch.tensor([[5, 9, 17, 3, 1] + [0] * 72])
    full = encode_t5(load_t5(_t5_tensors()), tokens)
    assert ((encode_t5(bf, tokens).float() - full).abs().max() / full.abs().max()) < 0.05


def test_strict_loading_names_the_keys() -> None:
    tensors = _t5_tensors()
    broken = {k: v for k, v in tensors.items() if k != "encoder.block.1.layer.1.DenseReluDense.wo.weight"}
    with pytest.raises(ValueError, match=r"encoder\.block\.1\.layer\.1\.DenseReluDense\.wo\.weight"):
        load_t5(broken)
    with pytest.raises(ValueError, match="unexpected"):
        load_t5(dict(tensors, **{"encoder.block.0.layer.0.SelfAttention.scale_weight": torch.ones(())}))
    with pytest.raises(ValueError, match="shared.weight"):
        load_t5({k: v for k, v in tensors.items() if k != "shared.weight"})


def test_tokens_follow_the_sd3_convention(spiece) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spiece))
    tok = load_t5_tokenizer(spiece)
    prompt = "a red  cat\non the moon"
    want = [i for w in ["a", "red", "cat", "on", "the", "moon"] for i in sp.encode(w)] + [EOS]
    got = t5_tokens(tok, prompt)
    assert got.shape == (1, 77) and got.dtype == torch.long
    assert got[0, :len(want)].tolist() == want
    assert set(got[0, len(want):].tolist()) == {0}
    # words are encoded one by one: "astronaut riding" is not re-segmented across the space
    assert t5_tokens(tok, "astronaut riding")[0, :-1].tolist()[:len(sp.encode("astronaut"))] == sp.encode("astronaut")
    # the first 226 characters only; a longer token sequence is not cut to 77
    long = " ".join(["astronaut"] * 40)  # 399 characters
    ids = t5_tokens(tok, long)[0].tolist()
    cut = long[:MAX_CHARS].split(" ")
    want_long = [i for w in cut for i in sp.encode(w)] + [EOS]
    assert len(want_long) > 77 and ids == want_long
    assert t5_tokens(tok, "")[0].tolist() == [EOS] + [0] * 76


def test_tokenizer_json_and_folder_give_the_same_ids(spiece) -> None:
    a = load_t5_tokenizer(spiece)
    b = load_t5_tokenizer(spiece.parent / "json" / "tokenizer.json")
    c = load_t5_tokenizer(spiece.parent)  # a folder: spiece.model found in it
    b2 = load_t5_tokenizer(spiece.parent / "json")
    prompt = "a painting of the city at night, zebra Moon"
    assert t5_tokens(b, prompt).tolist() == t5_tokens(a, prompt).tolist() == t5_tokens(c, prompt).tolist()
    assert t5_tokens(b2, prompt).tolist() == t5_tokens(a, prompt).tolist()
    assert len([i for i in t5_tokens(a, prompt)[0].tolist() if i]) > 10
    with pytest.raises(FileNotFoundError, match="spiece.model or tokenizer.json"):
        load_t5_tokenizer(spiece.parent.parent)
