"""Inpainting parity with diffusers on tiny 9-channel checkpoints (float32, CPU): SD 1.x and SDXL in their layouts
with a 9-channel `input_blocks.0.0.weight` (no released key list), SD 2 in the released `sd2_inpaint` layout.

Our engine runs `generate` with the image and mask as declared inputs; diffusers' `StableDiffusionInpaintPipeline` /
`StableDiffusionXLInpaintPipeline` run on the same weights loaded through its single-file converters (as in
test_parity_pipeline.py). diffusers draws its random tensors in another order than our pinned convention (ours: one
CPU generator from the seed, first the masked image's VAE posterior sample, then the starting noise), so both sides
are fed the same tensors: the masked-image latent and the initial noise are drawn here by our convention and given
to diffusers as `masked_image_latents` and `latents`; the mask, the image and the sigmas are the same. The final
latents must agree within 1e-4 of their largest magnitude. The posterior sample itself is checked against
diffusers' VAE (`latent_dist.mean + latent_dist.std * eps`) with the same eps.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import EulerDiscreteScheduler
from PIL import Image

from sd.families.common import vae_posterior_sample
from sd.inpaint import image_to_tensor, mask_to_tensor
from sd.pipeline import GenerateParams, generate, load_model
from sd.schedules import get_sigmas

from .test_parity_pipeline import diffusers_parts, diffusers_text, rel_err

CASES = {"sd1_inpaint": "sd1-inpaint", "sd2_inpaint": "sd2-inpaint", "sdxl_inpaint": "sdxl-inpaint"}


def pictures(w: int, h: int) -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(4)
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    m = np.zeros((h, w), np.uint8)
    m[8:30, 20:52] = 255
    m[30:40, 20:30] = 140   # >= 0.5 after / 255: repainted too
    m[0:6, 0:64] = 110      # < 0.5: kept
    return image, Image.fromarray(m)


@pytest.mark.parametrize("name", sorted(CASES))
@torch.no_grad()
def test_inpaint_generation_matches_diffusers(tiny_files, name: str) -> None:
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline

    path = tiny_files(name)
    model = load_model(path)
    spec = model.spec
    assert spec.family == CASES[name] and spec.unet.in_channels == 9 and spec.unsupported == ()
    xl = spec.family == "sdxl-inpaint"
    # diffusers_parts recognises SDXL's added conditioning by the family name it was written for
    unet, vae, texts = diffusers_parts(path, replace(spec, family="sdxl-base") if xl else spec)
    prompt, negative = "a small red circle (on a blue:1.0) background", "blurry"
    ctx, pooled = diffusers_text(texts, spec, prompt)
    nctx, npooled = diffusers_text(texts, spec, negative)
    w, h, steps, cfg, seed = 64, 48, 10, 5.0, 7
    image, mask = pictures(w, h)

    # the tensors of our convention: one generator; (1) the posterior sample of the masked image, (2) the noise
    x = image_to_tensor(image)                                   # (1, 3, 48, 64) in [-1, 1]
    m = mask_to_tensor(mask)                                     # (1, 1, 48, 64) in {0, 1}
    assert 0.2 < m.mean() < 0.5
    g = torch.Generator("cpu").manual_seed(seed)
    z = vae_posterior_sample(model.parts.vae, x * (m < 0.5), spec.latent, g)    # (1, 4, 6, 8)
    noise = torch.randn((1, 4, h // 8, w // 8), generator=g, dtype=torch.float32)
    # the posterior sample agrees with diffusers' VAE given the same eps
    dist = vae.encode(x * (m < 0.5)).latent_dist
    eps = torch.randn(z.shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    assert rel_err(z, spec.latent.scale * (dist.mean + dist.std * eps)) < 1e-4

    sigmas = get_sigmas("normal", model.sigmas, steps)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   timestep_spacing="leading", prediction_type="epsilon")
    common = dict(image=x, mask_image=m, masked_image_latents=z, latents=noise.clone(), strength=1.0,
                  guidance_scale=cfg, sigmas=sigmas.tolist(), output_type="latent", height=h, width=w,
                  prompt_embeds=ctx, negative_prompt_embeds=nctx)
    if xl:
        pipe = StableDiffusionXLInpaintPipeline(vae=vae, text_encoder=texts[0], text_encoder_2=texts[1],
                                                tokenizer=None, tokenizer_2=None, unet=unet, scheduler=sched,
                                                requires_aesthetics_score=False)
        ref = pipe(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=npooled, **common).images
    else:
        pipe = StableDiffusionInpaintPipeline(vae=vae, text_encoder=texts[0], tokenizer=None, unet=unet,
                                              scheduler=sched, safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False)
        ref = pipe(**common).images

    ours = generate(model, GenerateParams(prompt=prompt, negative_prompt=negative, width=w, height=h, steps=steps,
                                          cfg=cfg, seed=seed, sampler="euler", schedule="normal",
                                          inputs={"image": image, "mask": mask}))
    assert ours.latents.shape == ref.shape == (1, 4, 6, 8)
    assert ref.abs().max() > 0.1
    err = rel_err(ours.latents, ref)
    print(f"{name}: final latent max rel err {err:.2e}")
    assert err < 1e-4
    # the concat matters: a run with another mask ends elsewhere
    other = Image.fromarray(255 - np.asarray(mask))
    moved = generate(model, GenerateParams(prompt=prompt, negative_prompt=negative, width=w, height=h, steps=steps,
                                           cfg=cfg, seed=seed, sampler="euler", schedule="normal",
                                           inputs={"image": image, "mask": other})).latents
    assert rel_err(moved, ref) > 1e-2
    # and the mask latent is the nearest-neighbour downsampling of m (what diffusers' prepare_mask_latents does)
    assert torch.equal(F.interpolate(m, size=(6, 8)), m[:, :, ::8, ::8])
