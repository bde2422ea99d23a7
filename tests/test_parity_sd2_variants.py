"""Parity of the SD 2 variants with diffusers on tiny checkpoints in the released layouts (float32, CPU).

The same tiny file is loaded by our engine and converted for diffusers by its single-file converters (the helpers
of test_parity_pipeline.py, with the yaml fields these variants add: the x4 UNet's `num_classes` and
`disable_self_attentions`). Then a 6-step Euler generation with CFG runs in both from the same conditioning inputs,
initial noise and sigmas; the final latents must agree within 1e-4 of their largest magnitude.

- x4 upscaler: diffusers' `StableDiffusionUpscalePipeline` (low_res_scheduler.add_noise at the noise level, the
  level as `class_labels`, f4 VAE). Its generator draws the low-res noise first, as our convention does, so both
  sides get the same generator for that draw and the same starting noise (`latents`).
- depth-to-image: diffusers' `StableDiffusionDepth2ImgPipeline` given the same depth map (the L image / 255 as its
  `depth_map` tensor; both resize it bicubically to the latent and normalise it to [-1, 1]) and the same generator:
  its draws (the init image's posterior sample, then the noise) are in our order, so the latents match from the
  seed alone; the truncated schedule is diffusers' get_timesteps on our sigmas. Without a map, diffusers'
  depth_estimator is transformers' DPT-Hybrid holding the file's depth_model.* tensors and both sides get the same
  net input (the pinned MiDaS preprocessing; diffusers' DPTImageProcessor resizes with PIL instead).
- unCLIP (H, and L in a layout derived from H's list, tests/tiny.py): diffusers' `StableUnCLIPImg2ImgPipeline` given our image embedding as `image_embeds` (its own image
  encoder is transformers' CLIP vision model with a CLIPImageProcessor, not the reference's open_clip tower with
  kornia's resize, so both sides get the same embedding; the tower is open_clip's own VisionTransformer), the same
  generator (its first draw is the embedding noise, as ours) and the same starting noise: the squaredcos_cap_v2
  augmentation, the level embedding, zeros in the unconditional branch and the adm UNet input are compared.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler
from PIL import Image

import tests.test_parity_pipeline as tpp
from sd.pipeline import GenerateParams, generate, load_model
from sd.schedules import get_sigmas

from .test_parity_pipeline import diffusers_text, rel_err


def picture(w: int, h: int, seed: int = 4) -> Image.Image:
    """A smooth random RGB picture (a low-res image worth upscaling) of w x h."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 4), max(2, w // 4), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


def variant_parts(monkeypatch, path, spec):
    """diffusers' UNet, VAE and text encoder of a tiny variant file: the LDM yaml of test_parity_pipeline plus the
    x4 UNet's class count and disable_self_attentions (diffusers: num_class_embeds, only_cross_attention)."""
    base = tpp.ldm_yaml

    def yaml(s):
        y = base(s)
        params = y["model"]["params"]["unet_config"]["params"]
        if s.unet.num_classes:
            params["num_classes"] = s.unet.num_classes
        if any(s.unet.disable_self_attn):
            params["disable_self_attentions"] = list(s.unet.disable_self_attn)
        return y

    monkeypatch.setattr(tpp, "ldm_yaml", yaml)
    return tpp.diffusers_parts(path, spec)


def euler(spec_prediction: str, betas: tuple[float, float], sigmas: torch.Tensor) -> EulerDiscreteScheduler:
    """diffusers' Euler with our sigmas whatever the pipeline asks for ("leading": x0 = noise * sqrt(1 + s0^2))."""
    sched = EulerDiscreteScheduler(beta_start=betas[0], beta_end=betas[1], beta_schedule="scaled_linear",
                                   timestep_spacing="leading",
                                   prediction_type={"eps": "epsilon", "v": "v_prediction"}[spec_prediction])
    own = sched.set_timesteps
    sched.set_timesteps = lambda *a, device=None, **k: own(sigmas=sigmas.tolist(), device=device)
    return sched


@torch.no_grad()
def test_x4_upscale_matches_diffusers(tiny_files, monkeypatch) -> None:
    from diffusers import StableDiffusionUpscalePipeline

    path = tiny_files("sd2_x4_upscaler")
    model = load_model(path)
    spec = model.spec
    assert spec.family == "sd2-x4-upscaler" and spec.prediction == "v" and spec.unsupported == ()
    assert spec.latent.factor == 4 and spec.unet.in_channels == 7 and spec.unet.disable_self_attn[1]
    unet, vae, texts = variant_parts(monkeypatch, path, spec)
    prompt, negative = "a sharp photo of a cat", "blurry"
    ctx, nctx = diffusers_text(texts, spec, prompt)[0], diffusers_text(texts, spec, negative)[0]
    low = picture(16, 12)
    w, h, steps, cfg, seed, level = 64, 48, 6, 6.0, 11, 40
    sigmas = get_sigmas("normal", model.sigmas, steps)
    # our convention: one generator; (1) the low-res noise (1, 3, 12, 16), (2) the starting noise (1, 4, 12, 16)
    g = torch.Generator("cpu").manual_seed(seed)
    torch.randn((1, 3, 12, 16), generator=g, dtype=torch.float32)
    noise = torch.randn((1, 4, 12, 16), generator=g, dtype=torch.float32)

    pipe = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=texts[0], tokenizer=None, unet=unet, scheduler=euler("v", (0.0001, 0.02), sigmas),
        low_res_scheduler=DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear"),
        max_noise_level=350)
    ref = pipe(image=low, noise_level=level, num_inference_steps=steps, guidance_scale=cfg, prompt_embeds=ctx,
               negative_prompt_embeds=nctx, latents=noise.clone(), generator=torch.Generator("cpu").manual_seed(seed),
               output_type="latent").images
    ours = generate(model, GenerateParams(prompt=prompt, negative_prompt=negative, width=w, height=h, steps=steps,
                                          cfg=cfg, seed=seed, sampler="euler", schedule="normal",
                                          inputs={"image": low, "noise_level": level}))
    assert ours.latents.shape == ref.shape == (1, 4, 12, 16)
    assert ours.images[0].size == (64, 48)
    assert ref.abs().max() > 0.1
    err = rel_err(ours.latents, ref)
    print(f"x4 upscaler: final latent max rel err {err:.2e}")
    assert err < 1e-4
    # the noise level matters (class label and augmentation): another level ends elsewhere
    other = generate(model, GenerateParams(prompt=prompt, negative_prompt=negative, width=w, height=h, steps=steps,
                                           cfg=cfg, seed=seed, sampler="euler", schedule="normal",
                                           inputs={"image": low, "noise_level": 300})).latents
    assert rel_err(other, ref) > 1e-2


def depth_picture(w: int, h: int) -> Image.Image:
    """A depth map (mode L, white = near) of w x h: a ramp with a near square."""
    d = np.tile(np.linspace(30, 200, w, dtype=np.float32)[None], (h, 1))
    d[h // 4: h // 2, w // 4: w // 2] = 250
    return Image.fromarray(d.astype(np.uint8), "L")


@torch.no_grad()
def test_depth2img_matches_diffusers(tiny_files, monkeypatch) -> None:
    from diffusers import StableDiffusionDepth2ImgPipeline

    path = tiny_files("sd2_depth")
    model = load_model(path)
    spec = model.spec
    assert spec.family == "sd2-depth" and spec.prediction == "eps" and spec.unet.in_channels == 5
    unet, vae, texts = variant_parts(monkeypatch, path, spec)
    prompt, negative = "a wooden house", "blurry"
    ctx, nctx = diffusers_text(texts, spec, prompt)[0], diffusers_text(texts, spec, negative)[0]
    w, h, steps, cfg, seed, strength = 64, 48, 8, 6.0, 13, 0.7
    image, depth = picture(w, h, seed=2), depth_picture(40, 30)    # the map at another size than the image
    sigmas = get_sigmas("normal", model.sigmas, steps)
    pipe = StableDiffusionDepth2ImgPipeline(vae=vae, text_encoder=texts[0], tokenizer=None, unet=unet,
                                            scheduler=euler("eps", (0.00085, 0.012), sigmas), depth_estimator=None,
                                            feature_extractor=None)
    d = torch.from_numpy(np.asarray(depth, dtype=np.float32) / 255.0)[None]   # (1, 30, 40)
    ref = pipe(image=image, depth_map=d, strength=strength, num_inference_steps=steps, guidance_scale=cfg,
               prompt_embeds=ctx, negative_prompt_embeds=nctx, generator=torch.Generator("cpu").manual_seed(seed),
               output_type="latent").images
    ours = generate(model, GenerateParams(prompt=prompt, negative_prompt=negative, width=w, height=h, steps=steps,
                                          cfg=cfg, seed=seed, sampler="euler", schedule="normal",
                                          inputs={"image": image, "depth_map": depth, "strength": strength}))
    assert ours.latents.shape == ref.shape == (1, 4, 6, 8)
    assert ours.steps_done == int(strength * steps) == 5
    assert ref.abs().max() > 0.1
    err = rel_err(ours.latents, ref)
    print(f"depth2img: final latent max rel err {err:.2e}")
    assert err < 1e-4
    # the depth concat matters: the map upside down ends elsewhere
    flipped = generate(model, GenerateParams(prompt=prompt, negative_prompt=negative, width=w, height=h,
                                             steps=steps, cfg=cfg, seed=seed, sampler="euler", schedule="normal",
                                             inputs={"image": image, "depth_map": depth.transpose(Image.FLIP_TOP_BOTTOM),
                                                     "strength": strength})).latents
    assert rel_err(flipped, ref) > 1e-3


class MidasPreprocess:
    """A stand-in for the pipeline's `feature_extractor`: the pinned preprocessing (sd.midas.midas_input, the SD 2
    reference's keep-aspect resize to multiples of 32 around the net's size, mean/std 0.5). diffusers' own
    DPTImageProcessor resizes with PIL's bicubic (a = -0.5, antialiased), not the reference's cv2 INTER_CUBIC, so
    both sides get the same net input and the estimator, the resize to the latent and the normalisation are compared."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, images, return_tensors="pt"):
        from types import SimpleNamespace

        from sd.inpaint import image_to_tensor
        from sd.midas import midas_input

        return SimpleNamespace(pixel_values=torch.cat([midas_input(image_to_tensor(i), self.size) for i in images]))


@torch.no_grad()
def test_depth2img_with_the_estimated_map_matches_diffusers(tiny_files, monkeypatch) -> None:
    """No depth map given: our MiDaS estimate vs diffusers' pipeline whose depth_estimator is transformers'
    DPTForDepthEstimation (hybrid) holding the same depth_model.* tensors (tests/test_midas.py's key map)."""
    from diffusers import StableDiffusionDepth2ImgPipeline
    from safetensors.torch import load_file

    from sd.midas import PREFIX

    from .test_midas import hf_dpt

    path = tiny_files("sd2_depth")
    model = load_model(path)
    spec = model.spec
    cfg = dict(spec.extra)["midas"]
    estimator = hf_dpt(cfg, {k[len(PREFIX):]: v for k, v in load_file(str(path)).items() if k.startswith(PREFIX)})
    unet, vae, texts = variant_parts(monkeypatch, path, spec)
    prompt, negative = "a stone bridge", ""
    ctx, nctx = diffusers_text(texts, spec, prompt)[0], diffusers_text(texts, spec, negative)[0]
    w, h, steps, cfg_scale, seed, strength = 64, 48, 8, 5.0, 21, 0.8
    image = picture(w, h, seed=7)
    sigmas = get_sigmas("normal", model.sigmas, steps)
    pipe = StableDiffusionDepth2ImgPipeline(vae=vae, text_encoder=texts[0], tokenizer=None, unet=unet,
                                            scheduler=euler("eps", (0.00085, 0.012), sigmas),
                                            depth_estimator=estimator, feature_extractor=MidasPreprocess(cfg.size))
    ref = pipe(image=image, strength=strength, num_inference_steps=steps, guidance_scale=cfg_scale,
               prompt_embeds=ctx, negative_prompt_embeds=nctx, generator=torch.Generator("cpu").manual_seed(seed),
               output_type="latent").images
    ours = generate(model, GenerateParams(prompt=prompt, negative_prompt=negative, width=w, height=h, steps=steps,
                                          cfg=cfg_scale, seed=seed, sampler="euler", schedule="normal",
                                          inputs={"image": image, "strength": strength}))
    assert ours.latents.shape == ref.shape == (1, 4, 6, 8)
    assert ref.abs().max() > 0.1
    err = rel_err(ours.latents, ref)
    print(f"depth2img, estimated map: final latent max rel err {err:.2e}")
    assert err < 1e-4
    (what, shown), = ours.info["shown"]
    assert what == "depth map used (MiDaS estimate)" and shown.size == (w, h) and shown.mode == "L"
    # the estimate matters: a given flat-ish ramp instead ends elsewhere
    other = generate(model, GenerateParams(prompt=prompt, negative_prompt=negative, width=w, height=h, steps=steps,
                                           cfg=cfg_scale, seed=seed, sampler="euler", schedule="normal",
                                           inputs={"image": image, "strength": strength,
                                                   "depth_map": depth_picture(40, 30)})).latents
    assert rel_err(other, ref) > 1e-3


@pytest.mark.parametrize("name,family", [("sd21_unclip_h", "sd2-unclip-h"), ("sd21_unclip_l", "sd2-unclip-l")])
@torch.no_grad()
def test_unclip_matches_diffusers(tiny_files, monkeypatch, name: str, family: str) -> None:
    from diffusers import StableUnCLIPImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

    from sd.clip_vision import image_embedding
    from sd.families.sd2 import unclip_pixels

    path = tiny_files(name)
    model = load_model(path)
    spec = model.spec
    assert spec.family == family and spec.prediction == "v" and spec.unsupported == ()
    assert dict(spec.extra)["vision"].quick_gelu == (family == "sd2-unclip-l")   # OpenAI's ViT-L/14: QuickGELU
    unet, vae, texts = variant_parts(monkeypatch, path, spec)
    prompt, negative = "a painting", "blurry"
    ctx, nctx = diffusers_text(texts, spec, prompt)[0], diffusers_text(texts, spec, negative)[0]
    w, h, steps, cfg, seed, level = 64, 48, 6, 7.0, 17, 250
    image = picture(100, 70, seed=3)                                  # shrunk to 64x64 by the family
    e = image_embedding(model.parts.extras["image_encoder"], unclip_pixels(image))    # (1, D)
    assert e.shape == (1, spec.unet.adm_in_channels // 2) and e.abs().max() > 1e-3
    g = torch.Generator("cpu").manual_seed(seed)
    torch.randn(e.shape, generator=g, dtype=torch.float32)            # (1) the embedding noise
    noise = torch.randn((1, 4, h // 8, w // 8), generator=g, dtype=torch.float32)   # (2) the starting noise
    sigmas = get_sigmas("normal", model.sigmas, steps)
    pipe = StableUnCLIPImg2ImgPipeline(
        feature_extractor=None, image_encoder=StableUnCLIPImageNormalizer(1),   # unused: image_embeds are given
        image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=e.shape[1]),
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"), tokenizer=None,
        text_encoder=texts[0], unet=unet, scheduler=euler("v", (0.00085, 0.012), sigmas), vae=vae)
    ref = pipe(image_embeds=e, noise_level=level, height=h, width=w, num_inference_steps=steps, guidance_scale=cfg,
               prompt_embeds=ctx, negative_prompt_embeds=nctx,
               # this pipeline uses given latents as they are (prepare_latents, which scales by init_noise_sigma,
               # runs only without them): give it our start, noise * sqrt(1 + sigma_0^2)
               latents=noise * (1 + sigmas[0] ** 2).sqrt(),
               generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
    ours = generate(model, GenerateParams(prompt=prompt, negative_prompt=negative, width=w, height=h, steps=steps,
                                          cfg=cfg, seed=seed, sampler="euler", schedule="normal",
                                          inputs={"image": image, "noise_level": level}))
    assert ours.latents.shape == ref.shape == (1, 4, 6, 8)
    assert ref.abs().max() > 0.1
    err = rel_err(ours.latents, ref)
    print(f"{family}: final latent max rel err {err:.2e}")
    assert err < 1e-4
    # the image matters: another picture ends elsewhere
    other = generate(model, GenerateParams(prompt=prompt, negative_prompt=negative, width=w, height=h, steps=steps,
                                           cfg=cfg, seed=seed, sampler="euler", schedule="normal",
                                           inputs={"image": picture(100, 70, seed=9), "noise_level": level})).latents
    assert rel_err(other, ref) > 2e-4     # far above the parity error (measured 5e-4 for L, 1e-2 for H)
