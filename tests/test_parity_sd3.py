"""SD3 / SD3.5 parity with diffusers (and transformers) on tiny checkpoints in the released layouts, float32 CPU.

The same tiny file is read by our modules and converted for diffusers by its own single-file converters
(`convert_sd3_transformer_checkpoint_to_diffusers`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`,
`convert_sd3_t5_checkpoint_to_diffusers`). Compared: the MMDiT output (skipped blocks too), the 16-channel VAE,
the text side (CLIP-L / CLIP-G / T5 outputs and the context / vector assembly of diffusers' `encode_prompt`), and
whole Euler + CFG generations (with and without skip-layer guidance) against `StableDiffusion3Pipeline` given the
same prompt embeddings, initial latent and sigmas: within 1e-4 of the largest magnitude. Also here: skip-layer
guidance's own rules (scale 0 / no layers = plain CFG exactly, the window, which blocks the extra pass skips).
"""
from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL as DAutoencoderKL
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5EncoderModel

from sd.denoiser import make_denoiser
from sd.guidance import cfg_denoiser
from sd.mmdit import load_mmdit, mmdit_net
from sd.samplers import sample_euler
from sd.schedules import flow_sigmas
from sd.sd3_text import (CLIP_G_PREFIX, CLIP_L_PREFIX, T5_PREFIX, clip_tokens, encode_clip, encode_sd3_prompt,
                         load_sd3_clip, sd3_context, sd3_vector)
from sd.slg import SkipLayerGuidance, slg_cfg_denoiser, step_index
from sd.t5 import encode_t5, hf_config, load_t5, load_t5_tokenizer, t5_config_for, t5_tokens
from sd.vae import AutoencoderKL

from .tiny_sd3 import LAYOUTS, TINY_VAE, tiny_clip_configs, tiny_text_tensors, write_tiny_sd3, write_tiny_spiece

SCALE, SHIFT = 1.5305, 0.0609


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-sd3")
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = write_tiny_sd3(name, root / f"{name}.safetensors")
        return cache[name]

    return get


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    return write_tiny_spiece(tmp_path_factory.mktemp("spiece") / "spiece.model")


def diffusers_transformer(ckpt: dict[str, torch.Tensor], cfg) -> SD3Transformer2DModel:
    sd = sfu.convert_sd3_transformer_checkpoint_to_diffusers(dict(ckpt))  # it pops what it converts
    model = SD3Transformer2DModel(
        sample_size=32, patch_size=cfg.patch_size, in_channels=cfg.in_channels, num_layers=cfg.depth,
        attention_head_dim=64, num_attention_heads=cfg.heads, joint_attention_dim=cfg.context_dim,
        caption_projection_dim=cfg.hidden, pooled_projection_dim=cfg.adm_in_channels, out_channels=cfg.out_channels,
        pos_embed_max_size=cfg.pos_embed_max_size, dual_attention_layers=cfg.x_block_self_attn_layers,
        qk_norm="rms_norm" if cfg.qk_norm else None)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def diffusers_vae(ckpt: dict[str, torch.Tensor]) -> DAutoencoderKL:
    v = TINY_VAE
    yaml = {"model": {"params": {"scale_factor": SCALE, "first_stage_config": {"params": {"ddconfig": {
        "ch": v.ch, "ch_mult": list(v.ch_mult), "in_channels": 3, "out_ch": 3, "z_channels": v.z_channels,
        "num_res_blocks": v.num_res_blocks}}}}}}
    vcfg = sfu.create_vae_diffusers_config_from_ldm(yaml, ckpt)
    vae = DAutoencoderKL(**vcfg, shift_factor=SHIFT, use_quant_conv=False, use_post_quant_conv=False)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(ckpt, vcfg), strict=True)
    return vae.eval()


def ours_text(ckpt):
    lcfg, gcfg = tiny_clip_configs()
    strip = lambda p: {k[len(p):]: v for k, v in ckpt.items() if k.startswith(p)}  # noqa: E731
    return (load_sd3_clip(strip(CLIP_L_PREFIX), lcfg), load_sd3_clip(strip(CLIP_G_PREFIX), gcfg),
            load_t5(strip(T5_PREFIX)))


def reference_text(ckpt):
    """transformers' CLIP (with projection) and T5, loaded through diffusers' converters."""
    out = []
    for cfg in tiny_clip_configs():
        hf = CLIPTextConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp,
                            num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, hidden_act=cfg.act,
                            max_position_embeddings=77, projection_dim=cfg.width, eos_token_id=49407)
        model = CLIPTextModelWithProjection(hf).eval()
        sd = sfu.convert_ldm_clip_checkpoint(ckpt, remove_prefix=cfg.prefix)
        if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers >= 5 naming
            sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
        if not cfg.projection_dim:  # CLIP-L: diffusers puts an identity projection here (pooled unprojected)
            sd["text_projection.weight"] = torch.eye(cfg.width)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        assert [k for k in missing + unexpected if "position_ids" not in k] == []
        out.append(model)
    sd = sfu.convert_sd3_t5_checkpoint_to_diffusers(ckpt)
    t5 = T5EncoderModel(hf_config(t5_config_for({k: tuple(v.shape) for k, v in sd.items()}, ""))).eval()
    t5.load_state_dict(sd, strict=False)
    t5.tie_weights()
    return out[0], out[1], t5


# ---------------------------------------------------------------------------------------------- networks


@pytest.mark.parametrize("name", LAYOUTS)
@torch.no_grad()
def test_mmdit_matches_diffusers(files, name: str) -> None:
    ckpt = load_file(str(files(name)))
    ours = load_mmdit(ckpt)
    ref = diffusers_transformer(ckpt, ours.cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 14, 22, generator=g)  # 7 x 11 patches out of the 16 x 16 table: odd, off-centre crop
    t = torch.tensor([1000.0, 37.25])
    ctx = torch.randn(2, 154, ours.cfg.context_dim, generator=g)
    y = torch.randn(2, ours.cfg.adm_in_channels, generator=g)
    want = ref(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=y).sample
    got = ours(x, t, ctx, y)
    assert want.abs().max() > 0.1
    assert rel_err(got, want) < 1e-4
    # skipped blocks: the same ones diffusers skips
    skip = [1] if ours.cfg.depth > 2 else [0]
    want_skip = ref(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=y,
                    skip_layers=skip).sample
    assert rel_err(ours(x, t, ctx, y, skip_layers=skip), want_skip) < 1e-4
    assert rel_err(want_skip, want) > 1e-3


@torch.no_grad()
def test_vae_matches_diffusers(files) -> None:
    ckpt = load_file(str(files("sd3_medium")))
    ours = AutoencoderKL(TINY_VAE)
    ours.load_state_dict({k[len("first_stage_model."):]: v for k, v in ckpt.items()
                          if k.startswith("first_stage_model.")}, strict=True)
    ours.eval()
    assert not hasattr(ours, "quant_conv") and not hasattr(ours, "post_quant_conv")
    ref = diffusers_vae(ckpt)
    g = torch.Generator().manual_seed(1)
    img = torch.rand(1, 3, 48, 64, generator=g) * 2 - 1
    mean = ours.encode(img)
    assert mean.shape == (1, 16, 6, 8)
    assert rel_err(mean, ref.encode(img).latent_dist.mean) < 1e-4
    latent = torch.randn(1, 16, 6, 8, generator=g)
    # SD3's latent format: decode(latent / 1.5305 + 0.0609); diffusers' pipeline does the same with its config
    want = ref.decode(latent / ref.config.scaling_factor + ref.config.shift_factor).sample
    assert rel_err(ours.decode(latent / SCALE + SHIFT), want) < 1e-4


# ---------------------------------------------------------------------------------------------- text


@torch.no_grad()
def test_text_towers_and_assembly_match_diffusers(files, spiece, monkeypatch) -> None:
    ckpt = load_file(str(files("sd3_medium")))
    clip_l, clip_g, t5 = ours_text(ckpt)
    ref_l, ref_g, ref_t5 = reference_text(ckpt)
    prompt = "a photo of an astronaut riding a horse"
    tok = load_t5_tokenizer(spiece)
    # CLIP: penultimate hidden state without the final LN; pooled = final LN at the first EOT (CLIP-G projected)
    for ours, ref, pad in ((clip_l, ref_l, 49407), (clip_g, ref_g, 0)):
        tokens = clip_tokens(prompt, pad)
        assert tokens[0, -1].item() == pad and (tokens[0] == 49407).sum() == (76 - 8 if pad == 49407 else 1)
        hidden, pooled = encode_clip(ours, prompt)
        out = ref(tokens, output_hidden_states=True)
        assert rel_err(hidden, out.hidden_states[-2]) < 1e-5
        assert rel_err(pooled, out.text_embeds) < 1e-5
        # and it is not the final-LN'd last layer
        assert rel_err(hidden, out.last_hidden_state) > 1e-2
    # T5: last hidden state, no mask
    t5_ids = t5_tokens(tok, prompt)
    assert rel_err(encode_t5(t5, t5_ids), ref_t5(input_ids=t5_ids).last_hidden_state) < 1e-5
    # assembly: diffusers' encode_prompt, fed our per-tower outputs, builds the same context and vector
    pipe = StableDiffusion3Pipeline(transformer=None, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    towers = {0: encode_clip(clip_l, prompt), 1: encode_clip(clip_g, prompt)}
    monkeypatch.setattr(pipe, "_get_clip_prompt_embeds", lambda *a, clip_model_index, **kw: towers[clip_model_index])
    monkeypatch.setattr(pipe, "_get_t5_prompt_embeds", lambda **kw: encode_t5(t5, t5_ids))
    ref_ctx, _, ref_vec, _ = pipe.encode_prompt(prompt, prompt, prompt, device="cpu", do_classifier_free_guidance=False)
    cond = encode_sd3_prompt(prompt, clip_l, clip_g, context_dim=96, t5=t5, t5_tokenizer=tok)
    assert cond["crossattn"].shape == (1, 154, 96) and cond["vector"].shape == (1, 64)
    assert torch.equal(cond["crossattn"], ref_ctx) and torch.equal(cond["vector"], ref_vec)
    assert torch.equal(cond["crossattn"][0, :77, 64:], torch.zeros(77, 32))  # the zero padding of the CLIP part
    # without T5: the padded CLIP part alone
    clip_only = encode_sd3_prompt(prompt, clip_l, clip_g, context_dim=96)
    assert clip_only["crossattn"].shape == (1, 77, 96)
    assert torch.equal(clip_only["crossattn"], cond["crossattn"][:, :77])
    with pytest.raises(ValueError, match="exceeds"):
        sd3_context(torch.zeros(1, 77, 64), torch.zeros(1, 77, 64), None, 96)
    assert sd3_vector(torch.ones(1, 2), torch.zeros(1, 3)).tolist() == [[1, 1, 0, 0, 0]]


def test_clip_tokens_convention() -> None:
    from sd.tokenizer import encode

    words = ["An", "astronaut,", "riding"]
    ids = [i for w in words for i in encode(w)]
    for pad in (49407, 0):
        t = clip_tokens("An  astronaut,\nriding", pad)[0].tolist()
        assert t[:len(ids) + 2] == [49406] + ids + [49407]
        assert t[len(ids) + 2:] == [pad] * (75 - len(ids)) and len(t) == 77
    long = clip_tokens(" ".join(["horse"] * 100), 0)[0].tolist()
    assert len(long) == 77 and long[-1] == 49407 and long[1:76] == encode("horse") * 75


# ---------------------------------------------------------------------------------------------- generation


def _conditions(ckpt, spiece):
    clip_l, clip_g, t5 = ours_text(ckpt)
    tok = load_t5_tokenizer(spiece)
    cond = encode_sd3_prompt("a red cat on the moon", clip_l, clip_g, 96, t5, tok)
    uncond = encode_sd3_prompt("", clip_l, clip_g, 96, t5, tok)
    return cond, uncond


@pytest.mark.parametrize("name,slg", [("sd3_medium", None), ("sd35_medium", None), ("sd35_medium", (1, 2))])
@torch.no_grad()
def test_euler_cfg_generation_matches_diffusers_pipeline(files, spiece, name: str, slg) -> None:
    ckpt = load_file(str(files(name)))
    text = ckpt if name == "sd3_medium" else tiny_text_tensors()  # 3.5 files carry no text encoders
    cond, uncond = _conditions(text, spiece)
    steps, cfg_scale, seed, shift = 10, 4.5, 11, 3.0
    sigmas = flow_sigmas(steps, shift)
    noise = torch.randn((1, 16, 16, 24), generator=torch.Generator("cpu").manual_seed(seed))

    model = load_mmdit(ckpt)
    denoise = make_denoiser(mmdit_net(model), "flow", None)
    if slg is None:
        guided = cfg_denoiser(denoise, cond, uncond, cfg_scale)
    else:  # window 0.01 .. 0.35 of 10 steps: steps 1, 2, 3
        guided = slg_cfg_denoiser(denoise, cond, uncond, cfg_scale, sigmas,
                                  SkipLayerGuidance(layers=slg, scale=2.5, start=0.01, end=0.35))
    ours = sample_euler(guided, noise.clone(), sigmas)

    # shift 1 in the scheduler: the sigmas given are already shifted; it appends the final 0 itself
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    vae = diffusers_vae(ckpt)
    pipe = StableDiffusion3Pipeline(transformer=diffusers_transformer(ckpt, model.cfg), scheduler=sched, vae=vae,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    extra = {} if slg is None else dict(skip_guidance_layers=list(slg), skip_layer_guidance_scale=2.5,
                                        skip_layer_guidance_start=0.01, skip_layer_guidance_stop=0.35)
    ref = pipe(prompt_embeds=cond["crossattn"], pooled_prompt_embeds=cond["vector"],
               negative_prompt_embeds=uncond["crossattn"], negative_pooled_prompt_embeds=uncond["vector"],
               latents=noise.clone(), sigmas=sigmas[:-1].tolist(), guidance_scale=cfg_scale, height=128, width=192,
               num_inference_steps=steps, output_type="latent", **extra).images
    assert torch.allclose(pipe.scheduler.sigmas, sigmas)
    assert ours.shape == ref.shape == (1, 16, 16, 24)
    assert ref.abs().max() > 0.1
    assert rel_err(ours, ref) < 1e-4
    if slg is not None:  # the guidance did something
        plain = sample_euler(cfg_denoiser(denoise, cond, uncond, cfg_scale), noise.clone(), sigmas)
        assert rel_err(plain, ours) > 1e-3
    # decoded with SD3's latent format, both VAEs agree on the final image
    ours_vae = AutoencoderKL(TINY_VAE).eval()
    ours_vae.load_state_dict({k[len("first_stage_model."):]: v for k, v in ckpt.items()
                              if k.startswith("first_stage_model.")})
    px = ours_vae.decode(ours / SCALE + SHIFT)
    assert px.shape == (1, 3, 128, 192)
    assert rel_err(px, vae.decode(ref / SCALE + SHIFT).sample) < 1e-4


# ---------------------------------------------------------------------------------------------- SLG rules


class _Recorder:
    """A fake denoiser: x * (1 + sum of cond) - 0.1 * len(skip_layers), recording every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, c, skip_layers=()):
        self.calls.append((x.shape[0], float(sigma[0]), tuple(skip_layers)))
        return x * (1 + c.reshape(c.shape[0], -1).sum(1).view(-1, 1, 1, 1)) - 0.1 * len(skip_layers)


def test_slg_scale_zero_or_no_layers_is_plain_cfg_exactly() -> None:
    sigmas = flow_sigmas(10, 3.0)
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    cond, uncond = {"c": torch.tensor([[0.3]])}, {"c": torch.tensor([[-0.2]])}
    for slg in (SkipLayerGuidance(scale=0.0), SkipLayerGuidance(layers=())):
        rec_a, rec_b = _Recorder(), _Recorder()
        a = slg_cfg_denoiser(rec_a, cond, uncond, 5.0, sigmas, slg)
        b = cfg_denoiser(rec_b, cond, uncond, 5.0)
        for s in sigmas[:-1]:
            assert torch.equal(a(x, s.expand(2)), b(x, s.expand(2)))
        assert rec_a.calls == rec_b.calls and all(call[2] == () for call in rec_a.calls)


def test_slg_window_and_skipped_blocks() -> None:
    steps = 28
    sigmas = flow_sigmas(steps, 3.0)
    x = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    cond, uncond = {"c": torch.tensor([[0.3]])}, {"c": torch.tensor([[-0.2]])}
    slg = SkipLayerGuidance()  # the 3.5 medium defaults
    assert (slg.layers, slg.scale, slg.start, slg.end) == ((7, 8, 9), 2.5, 0.01, 0.2)
    rec = _Recorder()
    guided = slg_cfg_denoiser(rec, cond, uncond, 5.0, sigmas, slg)
    plain = cfg_denoiser(_Recorder(), cond, uncond, 5.0)
    active = []
    for i, s in enumerate(sigmas[:-1]):
        assert step_index(s.reshape(1), sigmas) == i
        n = len(rec.calls)
        out = guided(x, s.reshape(1))
        skipped = [call for call in rec.calls[n:] if call[2]]
        if skipped:
            active.append(i)
            assert skipped == [(1, float(s), (7, 8, 9))]  # one extra pass, batch of the positive prompt only
            pos, skip = x * 1.3, x * 1.3 - 0.3
            assert torch.allclose(out, plain(x, s.reshape(1)) + (pos - skip) * 2.5)
        else:
            assert torch.equal(out, plain(x, s.reshape(1)))
    assert active == [1, 2, 3, 4, 5]  # 0.28 < step < 5.6
