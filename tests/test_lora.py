"""LoRA / LyCORIS (sd.lora, sd.networks): parity with diffusers' `load_lora_weights` (kohya and PEFT naming) on tiny
SD 1.x and SDXL checkpoints, LoHa / LoKr / LoCon-with-mid against the merged formula written out here, the prompt
syntax, the folder listing and its refusals, infotext, and two concurrent requests on one cached model.

Tolerance: 1e-4 of the largest magnitude of the reference output (float32, CPU).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sd.lora import (apply_loras, diffusers_to_ldm, format_hashes, lora_hash, load_lora, model_targets,
                     parse_hashes, parse_prompt)
from sd.models_dir import NotInModelsFolder, extra_files, resolve_extra
from sd.pipeline import GenerateParams, generate, load_model
from sd.pnginfo import build_parameters, parse_parameters, to_settings
from sd.tokenizer import tokenize_weighted

from .test_parity_pipeline import diffusers_parts, rel_err

R = 4  # rank of every tiny LoRA


def _factors(shape, g, conv_mid=False, std=0.3):
    """(down, up[, mid]) of rank R for a weight of `shape` (out, in[, k, k]); 3x3 convs get a 3x3 down (LoCon)."""
    out, inn = shape[0], shape[1]
    if std != 0.3:
        return tuple(None if f is None else f * (std / 0.3) for f in _factors(shape, g, conv_mid))
    if len(shape) == 4:
        k = shape[2:]
        if conv_mid and tuple(k) != (1, 1):
            return (0.3 * torch.randn(R, inn, 1, 1, generator=g), 0.3 * torch.randn(out, R, 1, 1, generator=g),
                    0.3 * torch.randn(R, R, *k, generator=g))
        return 0.3 * torch.randn(R, inn, *k, generator=g), 0.3 * torch.randn(out, R, 1, 1, generator=g), None
    return 0.3 * torch.randn(R, inn, generator=g), 0.3 * torch.randn(out, R, generator=g), None


def kohya_file(path: Path, unet: nn.Module | None, texts: list[tuple[str, nn.Module]], seed=0, alpha=2.0,
               unet_names=None) -> Path:
    """A kohya-named LoRA on every Linear / Conv2d of `unet` (diffusers names, or `unet_names`: our LDM names) and
    of each (prefix, transformers CLIP model) text tower."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def add(key, shape):
        down, up, _ = _factors(shape, g)
        sd[key + ".lora_down.weight"], sd[key + ".lora_up.weight"] = down, up
        sd[key + ".alpha"] = torch.tensor(alpha)

    if unet is not None:
        for name, m in unet.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and (unet_names is None or name in unet_names):
                add("lora_unet_" + name.replace(".", "_"), tuple(m.weight.shape))
    for prefix, model in texts:
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and "encoder.layers" in name:
                name = name if name.startswith("text_model.") else "text_model." + name
                add(prefix + name.replace(".", "_"), tuple(m.weight.shape))
    save_file(sd, str(path))
    return path


def _unet_call(unet, spec, diffusers: bool, x, t, ctx, g):
    if spec.unet.adm_in_channels:
        pooled = torch.randn(x.shape[0], spec.text_encoders[-1].projection_dim, generator=g)
        ids = torch.tensor([[64.0, 48, 0, 0, 64, 48]]).expand(x.shape[0], -1)
        if diffusers:
            return unet(x, t, encoder_hidden_states=ctx,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        from sd.conditioning import fourier

        y = torch.cat([pooled, torch.stack([fourier(r.tolist()) for r in ids])], dim=1)
        return unet(x, t, context=ctx, y=y)
    return unet(x, t, encoder_hidden_states=ctx).sample if diffusers else unet(x, t, context=ctx)


def _diffusers_pipe(unet, vae, texts):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    if len(texts) == 2:
        return StableDiffusionXLPipeline(vae=vae, text_encoder=texts[0], text_encoder_2=texts[1], tokenizer=None,
                                         tokenizer_2=None, unet=unet, scheduler=EulerDiscreteScheduler())
    return StableDiffusionPipeline(vae=vae, text_encoder=texts[0], tokenizer=None, unet=unet,
                                   scheduler=EulerDiscreteScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _text_hidden(model, tokens, ours: bool, layer: int, final_ln: bool = False):
    """hidden_states[layer] (then the final LayerNorm when final_ln: ours applies it by its config)."""
    if ours:
        return model(tokens, layer_index=layer)[0]
    h = model(tokens, output_hidden_states=True).hidden_states[layer]
    return getattr(model, "text_model", model).final_layer_norm(h) if final_ln else h


def _sdxl_unet_names(unet) -> set[str]:
    """Our LDM module names that kohya's SDXL files use and diffusers' SGM-name converter maps (attention blocks)."""
    return {n for n, m in unet.named_modules() if isinstance(m, nn.Linear) and ".transformer_blocks." in n}


@pytest.mark.parametrize("name", ["sd1", "sdxl_base"])
@torch.no_grad()
def test_kohya_lora_matches_diffusers(tiny_files, tmp_path, name) -> None:
    """UNet and every text tower's hidden states with a kohya LoRA equal diffusers' with load_lora_weights."""
    path = tiny_files(name)
    model = load_model(path, prediction="eps")
    spec = model.spec
    unet, vae, texts = diffusers_parts(path, spec)
    sdxl = len(texts) == 2
    prefixes = ["lora_te1_", "lora_te2_"] if sdxl else ["lora_te_"]
    lora = kohya_file(tmp_path / "k.safetensors", model.parts.unet if sdxl else unet, list(zip(prefixes, texts)),
                      unet_names=_sdxl_unet_names(model.parts.unet) if sdxl else None)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 6, 8, generator=g), torch.tensor([999.0, 321.5])
    ctx = torch.randn(2, 77, spec.unet.context_dim, generator=g)
    tokens = tokenize_weighted("a red (circle:1.2) on blue", 0)[0]
    base = [_text_hidden(m, tokens, True, -2) for m in model.parts.text_encoders]
    before = {k: v.clone() for k, v in model.parts.unet.state_dict().items()}

    pipe = _diffusers_pipe(unet, vae, texts)
    pipe.load_lora_weights(load_file(str(lora)))
    ref_u = _unet_call(unet, spec, True, x, t, ctx, torch.Generator().manual_seed(2))
    ref_t = [_text_hidden(m, tokens, False, -2, c.final_ln) for m, c in zip(texts, spec.text_encoders)]
    lf = load_lora(lora)
    with apply_loras(model.parts, [(lf, 1.0, 1.0)]) as applied:
        ours_u = _unet_call(model.parts.unet, spec, False, x, t, ctx, torch.Generator().manual_seed(2))
        ours_t = [_text_hidden(m, tokens, True, -2) for m in model.parts.text_encoders]
    # every patch landed; an OpenCLIP layer's q, k, v, out patches share its one MultiheadAttention
    shared = 3 * sum(c.layers for c in spec.text_encoders if c.naming == "openclip")
    assert applied.unmatched == {} and applied.modules == len(lf.patches) - shared
    assert rel_err(ours_u, ref_u) < 1e-4
    for o, r, b in zip(ours_t, ref_t, base):
        assert rel_err(o, r) < 1e-4
        assert (o - b).abs().max() > 1e-2 * b.abs().max()            # the LoRA changed the text side
    plain = _unet_call(model.parts.unet, spec, False, x, t, ctx, torch.Generator().manual_seed(2))
    assert (ours_u - plain).abs().max() > 1e-2 * plain.abs().max()      # and the UNet
    after = model.parts.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)        # base weights untouched
    assert all(not m._forward_hooks for m in model.parts.unet.modules())  # and no hook left behind


@torch.no_grad()
def test_peft_naming_matches_diffusers(tiny_files, tmp_path) -> None:
    """diffusers / PEFT naming (`unet.*.lora_A.weight`, `text_encoder.*.lora_B.weight`), alpha = rank."""
    path = tiny_files("sd1")
    model = load_model(path)
    unet, vae, texts = diffusers_parts(path, model.spec)
    g = torch.Generator().manual_seed(3)
    sd = {}
    for part, root in (("unet", unet), ("text_encoder", texts[0])):
        for name, m in root.named_modules():
            if isinstance(m, nn.Linear) and ("attn" in name or "ff." in name or "mlp" in name):
                down, up, _ = _factors(tuple(m.weight.shape), g, std=0.2)
                sd[f"{part}.{name}.lora_A.weight"], sd[f"{part}.{name}.lora_B.weight"] = down, up
    save_file(sd, str(tmp_path / "peft.safetensors"))
    pipe = _diffusers_pipe(unet, vae, texts)
    pipe.load_lora_weights(sd)
    x, t, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([600.0]), torch.randn(1, 77, 64, generator=g)
    tokens = tokenize_weighted("peft", 49407)[0]
    ref_u, ref_t = unet(x, t, encoder_hidden_states=ctx).sample, _text_hidden(texts[0], tokens, False, -1, True)
    lf = load_lora(tmp_path / "peft.safetensors")
    with apply_loras(model.parts, [(lf, 1.0, 1.0)]) as applied:
        assert applied.unmatched == {} and applied.modules == len(sd) // 2
        ours_u, ours_t = model.parts.unet(x, t, context=ctx), _text_hidden(model.parts.text_encoders[0], tokens, True, -1)
    assert rel_err(ours_u, ref_u) < 1e-4 and rel_err(ours_t, ref_t) < 1e-4


def _merged_unet(model, changes: dict[str, torch.Tensor]):
    """A deep copy of the UNet with W + dW merged for {our dotted name: dW}."""
    import copy

    u = copy.deepcopy(model.parts.unet)
    for name, dw in changes.items():
        u.get_submodule(name).weight.data += dw
    return u


@torch.no_grad()
def test_loha_lokr_and_locon_mid_match_the_merged_formulas(tiny_files, tmp_path) -> None:
    """LoHa: dW = (w1a w1b) * (w2a w2b) * alpha / r; LoKr: dW = kron(w1, w2a w2b) * alpha / r (4-d w2 for a conv:
    kron over (out, in) with the kernel from w2); LoCon with lora_mid: dW = up . mid . down (Tucker); each merged into
    a copy of the weights, times the multiplier 0.7."""
    model = load_model(tiny_files("sd1"))
    g = torch.Generator().manual_seed(4)
    lin = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"      # (32, 32)
    lin2 = "input_blocks.1.1.transformer_blocks.0.ff.net.2"       # (32, 128)
    conv = "input_blocks.1.0.in_layers.2"                        # (32, 32, 3, 3)
    conv2 = "output_blocks.0.0.in_layers.2"                      # (128, 256, 3, 3)
    W = {n: model.parts.unet.get_submodule(n).weight for n in (lin, lin2, conv, conv2)}
    key = {n: "lora_unet_" + n.replace(".", "_") for n in W}
    sd, dw, alpha, mult = {}, {}, 3.0, 0.7
    rnd = lambda *s: 0.3 * torch.randn(*s, generator=g)  # noqa: E731
    # LoHa on a Linear and on a 3x3 conv (w*_b of width in * k * k)
    for n in (lin, conv):
        out, flat = W[n].shape[0], W[n][0].numel()
        t = {"hada_w1_a": rnd(out, R), "hada_w1_b": rnd(R, flat), "hada_w2_a": rnd(out, R), "hada_w2_b": rnd(R, flat)}
        sd.update({f"{key[n]}.{s}": v for s, v in t.items()})
        sd[f"{key[n]}.alpha"] = torch.tensor(alpha)
        dw[n] = ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])).reshape(W[n].shape) * alpha / R
    # LoKr on a Linear: full w1 (4, 8), factored w2 (8 x 16 from rank R); on a conv: w1 (8, 16), full 4-d w2 (8, 8, 3, 3)
    w1, w2a, w2b = rnd(4, 8), rnd(8, R), rnd(R, 16)
    sd.update({f"{key[lin2]}.lokr_w1": w1, f"{key[lin2]}.lokr_w2_a": w2a, f"{key[lin2]}.lokr_w2_b": w2b,
               f"{key[lin2]}.alpha": torch.tensor(alpha)})
    dw[lin2] = torch.kron(w1, w2a @ w2b) * alpha / R
    o, i = W[conv2].shape[:2]
    c1, c2 = rnd(8, 16), rnd(o // 8, i // 16, 3, 3)
    sd.update({f"{key[conv2]}.lokr_w1": c1, f"{key[conv2]}.lokr_w2": c2})
    # the Kronecker product written out: dW[a o2 + c, b i2 + d] = w1[a, b] w2[c, d] (per kernel tap), scale 1
    dw[conv2] = torch.einsum("ab,cdkl->acbdkl", c1, c2).reshape(o, i, 3, 3)
    save_file(sd, str(tmp_path / "lyco.safetensors"))
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([400.0])
    ctx = torch.randn(1, 77, 64, generator=g)
    ref = _merged_unet(model, {n: d * mult for n, d in dw.items()})(x, t, context=ctx)
    with apply_loras(model.parts, [(load_lora(tmp_path / "lyco.safetensors"), 1.0, mult)]) as applied:
        assert applied.modules == 4 and applied.unmatched == {}
        ours = model.parts.unet(x, t, context=ctx)
    base = model.parts.unet(x, t, context=ctx)
    assert rel_err(ours, ref) < 1e-4 and (ref - base).abs().max() > 1e-2 * base.abs().max()
    # LoCon with a Tucker mid on a 3x3 conv: dW[o, i] = sum_rs up[o, r] mid[r, s] down[s, i]
    down, up, mid = _factors((32, 32, 3, 3), g, conv_mid=True)
    save_file({f"{key[conv]}.lora_down.weight": down, f"{key[conv]}.lora_up.weight": up,
               f"{key[conv]}.lora_mid.weight": mid, f"{key[conv]}.alpha": torch.tensor(2.0)},
              str(tmp_path / "mid.safetensors"))
    dwm = torch.einsum("or,rskl,si->oikl", up.flatten(1), mid, down.flatten(1)) * 2.0 / R
    ref = _merged_unet(model, {conv: dwm})(x, t, context=ctx)
    with apply_loras(model.parts, [(load_lora(tmp_path / "mid.safetensors"), 1.0, 1.0)]):
        ours = model.parts.unet(x, t, context=ctx)
    assert rel_err(ours, ref) < 1e-4 and (ref - base).abs().max() > 1e-3 * base.abs().max()


def test_diffusers_names_map_by_the_block_formula() -> None:
    """SD 1.x (2 res blocks per level): the A1111 formula's indices."""
    out_blocks = [[0]] * 2 + [[0, 1]] + [[0, 1, 2]] * 9
    cases = {
        "down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k": "input_blocks_2_1_transformer_blocks_0_attn2_to_k",
        "down_blocks_2_resnets_0_conv1": "input_blocks_7_0_in_layers_2",
        "down_blocks_1_downsamplers_0_conv": "input_blocks_6_0_op",
        "mid_block_resnets_1_time_emb_proj": "middle_block_2_emb_layers_1",
        "mid_block_attentions_0_proj_in": "middle_block_1_proj_in",
        "up_blocks_1_attentions_2_proj_out": "output_blocks_5_1_proj_out",
        "up_blocks_0_upsamplers_0_conv": "output_blocks_2_1_conv",
        "up_blocks_1_upsamplers_0_conv": "output_blocks_5_2_conv",
        "up_blocks_3_resnets_2_conv_shortcut": "output_blocks_11_0_skip_connection",
        "conv_in": "input_blocks_0_0", "time_embedding_linear_2": "time_embed_2",
        "input_blocks_4_1_proj_in": "input_blocks_4_1_proj_in",   # SDXL kohya: already LDM
    }
    for diffusers, ldm in cases.items():
        assert diffusers_to_ldm(diffusers, 2, out_blocks) == ldm


def test_prompt_syntax_and_hashes(tmp_path) -> None:
    text, refs = parse_prompt("a cat <lora:styleA:0.8>, <lora:b:1:0.25> <lora:c:unet=0.5:te=0> <lora:d>")
    assert text == "a cat ,   "
    assert [(r.name, r.te, r.unet) for r in refs] == [("styleA", 0.8, 0.8), ("b", 1.0, 0.25), ("c", 0.0, 0.5),
                                                      ("d", 1.0, 1.0)]
    with pytest.raises(ValueError, match="must be numbers"):
        parse_prompt("<lora:x:strong>")
    # A1111's short hash of a safetensors LoRA: sha256 of the bytes after the header, 12 hex digits
    import hashlib

    p = tmp_path / "h.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, str(p))
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert lora_hash(p) == hashlib.sha256(raw[8 + n:]).hexdigest()[:12]
    assert parse_hashes(format_hashes([("a", "0123456789ab"), ("b", "ba9876543210")])) == {
        "a": "0123456789ab", "b": "ba9876543210"}


def test_listing_resolution_and_refusals(tiny_files, tmp_path) -> None:
    """A1111 models/Lora and ComfyUI models/loras are listed; names resolve only to listed files."""
    root = tmp_path / "models"
    (root / "Lora" / "sub").mkdir(parents=True)
    (root / "loras").mkdir()
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, str(root / "Lora" / "sub" / "one.safetensors"))
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, str(root / "loras" / "two.safetensors"))
    (root / "loras" / "notes.txt").write_text("x")
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    files = extra_files("LoRA", models_dir=root)
    assert sorted(files) == ["sub/one.safetensors", "two.safetensors"]
    assert resolve_extra("one", files, "LoRA") == root / "Lora" / "sub" / "one.safetensors"
    msgs = set()
    for bad in ("../outside", str(tmp_path / "outside.safetensors"), "three", "../../etc/passwd", ""):
        with pytest.raises(NotInModelsFolder) as e:
            resolve_extra(bad, files, "LoRA")
        msgs.add(str(e.value).split(":", 1)[0])
    assert msgs == {"no such LoRA in the LoRA folders"}


def test_refusals_name_the_file(tiny_files, tmp_path) -> None:
    """An SDXL LoRA on SD 1.x, a checkpoint given as a LoRA, a LoRA name that is not in the folder."""
    model = load_model(tiny_files("sd1"))
    g = torch.Generator().manual_seed(9)
    # what a tiny SDXL kohya file holds: LDM names, a 128-wide context (64 + 64), a second tower's keys
    blk = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_"
    sdxl_lora = tmp_path / "xl_style.safetensors"
    save_file({f"{blk}to_k.lora_down.weight": torch.randn(R, 128, generator=g),
               f"{blk}to_k.lora_up.weight": torch.randn(64, R, generator=g),
               f"{blk}to_q.lora_down.weight": torch.randn(R, 64, generator=g),
               f"{blk}to_q.lora_up.weight": torch.randn(64, R, generator=g)}, str(sdxl_lora))
    with pytest.raises(ValueError, match=r"^xl_style.safetensors: a LoRA for another model \(128-wide text "
                                         r"conditioning\), SD 1.x has 64: choose a LoRA made for SD 1.x$"):
        with apply_loras(model.parts, [(load_lora(sdxl_lora), 1, 1)], label="SD 1.x"):
            pass
    te2 = tmp_path / "xl_te.safetensors"
    save_file({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(R, 64, generator=g),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(128, R, generator=g)},
              str(te2))
    with pytest.raises(ValueError, match=r"^xl_te.safetensors: a LoRA for a model with two text encoders \(SDXL\), "
                                         r"SD 1.x has one"):
        with apply_loras(model.parts, [(load_lora(te2), 1, 1)], label="SD 1.x"):
            pass
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(ValueError, match="^broken.safetensors: .*damaged|^broken.safetensors: not a safetensors"):
        load_lora(tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match="sd1.safetensors: not a LoRA or LyCORIS file"):
        load_lora(tiny_files("sd1"))
    folder = tmp_path / "loras"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="no such LoRA in the LoRA folders: 'missing'"):
        generate(model, GenerateParams(prompt="x <lora:missing:1>", width=64, height=64, steps=1,
                                       loras_dir=str(folder)))


def _lora_for(model, path, seed, names):
    return kohya_file(path, model.parts.unet, [("lora_te_", model.parts.text_encoders[0].text_model)], seed=seed,
                      unet_names=names)


def test_generate_with_tags_infotext_and_concurrency(tiny_files, tmp_path) -> None:
    """Two threads at once (LoRA A, LoRA B, and none) each equal their single run; the cached model's state_dict is
    bit-identical afterwards; the tags are removed before tokenizing; Lora hashes round-trip through infotext."""
    model = load_model(tiny_files("sd1"))
    names = {n for n, m in model.parts.unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    folder = tmp_path / "models" / "loras"
    folder.mkdir(parents=True)
    a = _lora_for(model, folder / "styleA.safetensors", 10, names)
    _lora_for(model, folder / "styleB.safetensors", 11, names)
    before = {k: v.clone() for k, v in model.parts.unet.state_dict().items()}
    before_te = {k: v.clone() for k, v in model.parts.text_encoders[0].state_dict().items()}
    common = dict(width=64, height=64, steps=3, seed=5, models_dir=str(tmp_path / "models"))
    prompts = {"A": "a house <lora:styleA:0.9>", "B": "a house <lora:styleB:1:0.6>", "none": "a house"}
    single = {k: generate(model, GenerateParams(prompt=v, **common)).latents for k, v in prompts.items()}
    assert (single["A"] - single["none"]).abs().max() > 1e-3 and (single["B"] - single["A"]).abs().max() > 1e-3
    # the tag is not part of the text: a LoRA of weight 0 gives the plain result exactly
    zero = generate(model, GenerateParams(prompt="a house <lora:styleA:0>", **common))
    assert torch.equal(zero.latents, single["none"])
    results, errors = {}, []
    barrier = threading.Barrier(3)

    def run(k):
        try:
            barrier.wait()
            for _ in range(2):
                results.setdefault(k, []).append(generate(model, GenerateParams(prompt=prompts[k], **common)).latents)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in prompts]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for k, outs in results.items():
        for o in outs:
            assert torch.equal(o, single[k]), k
    after = model.parts.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(before_te[k], v) for k, v in model.parts.text_encoders[0].state_dict().items())
    res = generate(model, GenerateParams(prompt=prompts["A"], **common))
    assert res.info["infotext"] == {"Lora hashes": f"styleA: {lora_hash(a)}"}
    text = build_parameters(prompt=prompts["A"], negative_prompt="", steps=3, sampler="euler", schedule="normal",
                            cfg=7, seed=5, width=64, height=64, model_name="sd1", model_hash=None,
                            extra_fields=res.info["infotext"])
    parsed = to_settings(parse_parameters(text))
    assert parsed["lora_hashes"] == {"styleA": lora_hash(a)} and parsed["prompt"] == prompts["A"]


def test_hook_cost_is_small(tiny_files, tmp_path) -> None:
    """The measured cost of the hooked forward is printed (pytest -s); with no LoRA active nothing is hooked."""
    import time

    model = load_model(tiny_files("sd1"))
    names = {n for n, m in model.parts.unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    lf = load_lora(_lora_for(model, tmp_path / "c.safetensors", 1, names))
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([500.0]), torch.randn(1, 77, 64)

    def timed(n=5):
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(n):
                model.parts.unet(x, t, context=ctx)
        return (time.perf_counter() - t0) / n

    timed(1)
    plain = timed()
    with apply_loras(model.parts, [(lf, 1, 1)]) as applied:
        hooked = timed()
    print(f"\ntiny UNet forward: {plain * 1e3:.1f} ms plain, {hooked * 1e3:.1f} ms with a rank-{R} LoRA on all "
          f"{applied.modules} layers ({hooked / plain:.2f}x)")
    te = sum(isinstance(m, nn.Linear) and "encoder.layers" in n for n, m in model.parts.text_encoders[0].named_modules())
    assert applied.modules == len(names) + te and not any(m._forward_hooks for m in model.parts.unet.modules())
    assert hooked < 4 * plain
