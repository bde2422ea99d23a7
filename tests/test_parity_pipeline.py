"""Whole-generation parity with diffusers on tiny checkpoints (float32, CPU).

The same tiny file is loaded by our engine and converted for diffusers by its own single-file converters
(`diffusers.loaders.single_file_utils`), with the diffusers configs derived by `create_*_diffusers_config_from_ldm`
from the LDM-style yaml our detected spec corresponds to. Then a 10-step Euler generation with CFG runs in both,
from the same initial latent and the same sigmas, and the final latents must agree within 1e-4 of their largest
magnitude. The text side is compared too: diffusers' converted text encoders on our token ids give our context.
"""
from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL as DAutoencoderKL
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sd.conditioning import SDXLSizes, encode_conditions, fourier
from sd.pipeline import GenerateParams, generate, initial_noise, load_model
from sd.schedules import get_sigmas
from sd.tokenizer import tokenize_weighted


def ldm_yaml(spec) -> dict:
    """The original yaml (as a dict) that the detected spec corresponds to, as diffusers' converters read it."""
    u, v = spec.unet, spec.vae
    unet = {
        "in_channels": u.in_channels, "out_channels": u.out_channels, "model_channels": u.model_channels,
        "attention_resolutions": [2**i for i, d in enumerate(u.transformer_depth) if d],
        "num_res_blocks": u.num_res_blocks, "channel_mult": list(u.channel_mult),
        "use_linear_in_transformer": u.use_linear_in_transformer,
        # the yaml's int form when every attention level (and the middle) has the same depth, else SGM's list
        "transformer_depth": (u.transformer_depth_middle if set(u.transformer_depth) - {0} == {u.transformer_depth_middle}
                              else list(u.transformer_depth)),
        "context_dim": u.context_dim,
    }
    if u.num_head_channels > 0:
        unet["num_head_channels"] = u.num_head_channels
    else:
        unet["num_heads"] = u.num_heads
    if u.adm_in_channels:
        unet["num_classes"], unet["adm_in_channels"] = "sequential", u.adm_in_channels
    ddconfig = {"ch": v.ch, "ch_mult": list(v.ch_mult), "in_channels": v.in_channels, "out_ch": v.out_channels,
                "z_channels": v.z_channels, "num_res_blocks": v.num_res_blocks}
    return {"model": {"params": {"unet_config": {"params": unet}, "scale_factor": spec.latent.scale,
                                 "first_stage_config": {"params": {"ddconfig": ddconfig}}}}}


def diffusers_parts(path, spec):
    ckpt = load_file(str(path))
    yaml = ldm_yaml(spec)
    ucfg = sfu.create_unet_diffusers_config_from_ldm(yaml, ckpt)
    if spec.family == "sdxl-base":  # diffusers recognises SDXL by its full context width; tiny files say so here
        ucfg.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=256)
    unet = UNet2DConditionModel(**ucfg)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(ckpt, ucfg), strict=True)
    vcfg = sfu.create_vae_diffusers_config_from_ldm(yaml, ckpt)
    vae = DAutoencoderKL(**vcfg)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(ckpt, vcfg), strict=True)
    texts = []
    for t in spec.text_encoders:
        # diffusers builds SD2's OpenCLIP-H without its last block (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE) and uses the
        # final hidden state; that equals our penultimate layer + final LN.
        sd2_style = t.naming == "openclip" and t.final_ln
        cfg = CLIPTextConfig(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp,
                             num_hidden_layers=t.layers - sd2_style, num_attention_heads=t.heads,
                             max_position_embeddings=t.context_length, hidden_act=t.act,
                             projection_dim=t.projection_dim or t.width)
        if t.naming == "hf":
            model = CLIPTextModel(cfg)
            sd = sfu.convert_ldm_clip_checkpoint(ckpt, remove_prefix=t.prefix)
            if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers >= 5 naming
                sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
        else:
            model = CLIPTextModelWithProjection(cfg)
            sd = sfu.convert_open_clip_checkpoint(model, ckpt, prefix=t.prefix)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        unused = ("position_ids", "text_projection") if sd2_style else ("position_ids",)  # SD2 uses no projection
        assert [k for k in missing + unexpected if not any(u in k for u in unused)] == []
        texts.append(model.eval())
    return unet.eval(), vae.eval(), texts


def diffusers_text(texts, spec, prompt):
    """Context (and pooled) from diffusers' converted encoders on our token ids, with each family's layer rule."""
    hidden, pooled = [], None
    for model, t in zip(texts, spec.text_encoders):
        tokens, _ = tokenize_weighted(prompt, t.pad_token)
        out = model(tokens, output_hidden_states=True)
        sd2_style = t.naming == "openclip" and t.final_ln
        h = out.hidden_states[-1 if t.layer == "last" or sd2_style else -2]
        if t.final_ln:
            h = getattr(model, "text_model", model).final_layer_norm(h)
        hidden.append(h)
        if t.output_pooled:
            pooled = out.text_embeds
    return torch.cat(hidden, -1), pooled


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name,prediction", [("sd1", "eps"), ("sd2_768_v", "v"), ("sdxl_base", "eps")])
@torch.no_grad()
def test_euler_cfg_generation_matches_diffusers(tiny_files, name: str, prediction: str) -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = tiny_files(name)
    model = load_model(path, prediction=prediction)
    spec = model.spec
    unet, vae, texts = diffusers_parts(path, spec)
    prompt, negative = "a small red circle (on a blue:1.0) background", "blurry"
    ctx, pooled = diffusers_text(texts, spec, prompt)
    nctx, npooled = diffusers_text(texts, spec, negative)
    w, h, steps, cfg, seed = 64, 48, 10, 5.0, 7
    shape = (1, 4, h // 8, w // 8)
    noise = initial_noise(seed, shape)
    sigmas = get_sigmas("normal", model.sigmas, steps)
    # Custom sigmas make timestep_spacing irrelevant for the schedule; "leading" makes diffusers scale the initial
    # latent by sqrt(1 + sigma_0^2), our pinned convention ("linspace" would scale by sigma_0 alone).
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   timestep_spacing="leading",
                                   prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction])
    common = dict(guidance_scale=cfg, latents=noise.clone(), sigmas=sigmas.tolist(), output_type="latent",
                  height=h, width=w, prompt_embeds=ctx, negative_prompt_embeds=nctx)
    if name == "sdxl_base":
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=texts[0], text_encoder_2=texts[1], tokenizer=None,
                                         tokenizer_2=None, unet=unet, scheduler=sched)
        ref = pipe(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=npooled, **common).images
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=texts[0], tokenizer=None, unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        ref = pipe(**common).images
    ours = generate(model, GenerateParams(prompt=prompt, negative_prompt=negative, width=w, height=h, steps=steps,
                                          cfg=cfg, seed=seed, sampler="euler", schedule="normal"))
    assert ours.latents.shape == ref.shape
    assert ref.abs().max() > 0.1
    assert rel_err(ours.latents, ref) < 1e-4
    # the decoded pixels agree too (diffusers' VAE on the same latent)
    px = vae.decode(ref / spec.latent.scale).sample
    ours_px = model.parts.vae.decode(ours.latents / spec.latent.scale)
    assert rel_err(ours_px, px) < 1e-4


@pytest.mark.parametrize("name", ["sd1", "sd2_768_v", "sdxl_base", "sdxl_refiner"])
@torch.no_grad()
def test_components_match_diffusers(tiny_files, name: str) -> None:
    """UNet, VAE encode/decode and text encoders of the tiny file agree with diffusers' converted models."""
    # our side reads the .ckpt (weights-only pickle) for one layout, diffusers always converts the .safetensors twin
    path = tiny_files(name, ".ckpt" if name == "sdxl_refiner" else ".safetensors")
    model = load_model(path, prediction="eps")
    spec = model.spec
    unet, vae, texts = diffusers_parts(tiny_files(name), spec)
    g = torch.Generator().manual_seed(0)
    # text: context (each family's layer rule) and pooled output from the same prompt
    prompt = "an astronaut riding a horse"
    cond, _ = encode_conditions(model.parts.text_encoders, spec, prompt, "", 1, sizes=SDXLSizes((48, 64)))
    ref_ctx, ref_pooled = diffusers_text(texts, spec, prompt)
    assert rel_err(cond["context"], ref_ctx) < 1e-4
    if ref_pooled is not None:
        assert rel_err(cond["y"][:, : ref_pooled.shape[1]], ref_pooled) < 1e-4
    # UNet on a 9 x 7 latent (any multiple-of-8 image size works)
    x = torch.randn(2, 4, 9, 7, generator=g)
    t = torch.tensor([999.0, 37.25])
    ctx = torch.randn(2, 77, spec.unet.context_dim, generator=g)
    if spec.family == "sdxl-base":
        pooled = torch.randn(2, spec.text_encoders[-1].projection_dim, generator=g)
        ids = torch.tensor([[1024.0, 768, 0, 32, 1024, 768], [512, 512, 16, 0, 512, 512]])
        y = torch.cat([pooled, torch.stack([fourier(r.tolist()) for r in ids])], dim=1)
        ref = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    elif spec.unet.adm_in_channels:
        y = torch.randn(2, spec.unet.adm_in_channels, generator=g)
        ref = unet(x, t, encoder_hidden_states=ctx, class_labels=y).sample
    else:
        y = None
        ref = unet(x, t, encoder_hidden_states=ctx).sample
    ours = model.parts.unet(x, t, context=ctx, y=y)
    assert rel_err(ours, ref) < 1e-4
    # VAE encode (mean) and decode
    img = torch.rand(1, 3, 48, 64, generator=g) * 2 - 1
    assert rel_err(model.parts.vae.encode(img), vae.encode(img).latent_dist.mean) < 1e-4
    z = torch.randn(1, 4, 6, 8, generator=g)
    assert rel_err(model.parts.vae.decode(z), vae.decode(z).sample) < 1e-4
