"""Speed of our engine against diffusers on the same weights, in the same run.

Builds one checkpoint in a released key layout (default: SD1 structure at reduced width, so it runs on a laptop
CPU; `--width-scale 1` approaches the real model), loads it through our loader and through diffusers' single-file
converters, then times (a) one UNet forward with CFG batch 2 and (b) a whole N-step Euler + CFG generation
including text encoding and VAE decode, both implementations on the same inputs, and prints the ratio.

    .venv/bin/python bench/engine_vs_diffusers.py --layout sd1 --size 256 --steps 10 --repeats 3
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_parity_pipeline import diffusers_parts, diffusers_text  # noqa: E402
from tests.tiny import write_tiny  # noqa: E402


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layout", default="sd1", choices=["sd1", "sd2_768_v", "sdxl_base"])
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from sd.pipeline import GenerateParams, generate, initial_noise, load_model
    from sd.schedules import get_sigmas

    path = write_tiny(args.layout, ROOT / ".bench" / f"{args.layout}.safetensors")
    pred = "v" if args.layout == "sd2_768_v" else "eps"
    model = load_model(path, device=args.device, prediction=pred)
    unet, vae, texts = diffusers_parts(path, model.spec)
    unet, vae = unet.to(args.device), vae.to(args.device)
    texts = [t.to(args.device) for t in texts]
    spec = model.spec
    h = w = args.size
    lat = (2, spec.latent.channels, h // 8, w // 8)
    x = torch.randn(lat, device=args.device)
    t = torch.full((2,), 500.0, device=args.device)
    prompt = "a photo of a cat"
    with torch.no_grad():
        ctx, pooled = diffusers_text(texts, spec, prompt)
        ctx2 = torch.cat([ctx, ctx]).to(args.device)
        y = None
        kw = {}
        if spec.unet.adm_in_channels:
            y = torch.randn(2, spec.unet.adm_in_channels, device=args.device)
            kw = {"added_cond_kwargs": {"text_embeds": torch.cat([pooled, pooled]).to(args.device),
                                        "time_ids": torch.zeros(2, 6, device=args.device)}}
        ours_unet = best_of(lambda: model.parts.unet(x, t, context=ctx2, y=y), args.repeats)
        ref_unet = best_of(lambda: unet(x, t, encoder_hidden_states=ctx2, **kw), args.repeats)

        sigmas = get_sigmas("normal", model.sigmas, args.steps)
        noise = initial_noise(0, (1, *lat[1:]))
        sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading",
                                       prediction_type="v_prediction" if pred == "v" else "epsilon")
        nctx, npooled = diffusers_text(texts, spec, "")
        common = dict(guidance_scale=7.0, latents=noise.to(args.device), sigmas=sigmas.tolist(), height=h, width=w,
                      prompt_embeds=ctx, negative_prompt_embeds=nctx, output_type="pt")
        if args.layout == "sdxl_base":
            pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=texts[0], text_encoder_2=texts[1], tokenizer=None,
                                             tokenizer_2=None, unet=unet, scheduler=sched)
            common.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=npooled)
        else:
            pipe = StableDiffusionPipeline(vae=vae, text_encoder=texts[0], tokenizer=None, unet=unet, scheduler=sched,
                                           safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        params = GenerateParams(prompt=prompt, width=w, height=h, steps=args.steps, cfg=7.0, seed=0)
        ours_gen = best_of(lambda: generate(model, params), args.repeats)

        def ref_generation():
            # diffusers' side encodes the prompts too (converted encoders on the same token ids), as ours does
            c, pl = diffusers_text(texts, spec, prompt)
            n, npl = diffusers_text(texts, spec, "")
            extra = dict(pooled_prompt_embeds=pl, negative_pooled_prompt_embeds=npl) if args.layout == "sdxl_base" else {}
            return pipe(**{**common, "prompt_embeds": c, "negative_prompt_embeds": n, **extra})

        ref_gen = best_of(ref_generation, args.repeats)

    n_params = sum(p.numel() for p in model.parts.unet.parameters())
    print(f"layout {args.layout} (reduced width, UNet {n_params / 1e6:.1f}M params), {w}x{h}, device {args.device}, "
          f"{args.threads} threads, torch {torch.__version__}")
    print(f"{'what':<38}{'ours s':>10}{'diffusers s':>13}{'ours/diffusers':>16}")
    print(f"{'UNet forward, batch 2 (CFG)':<38}{ours_unet:>10.4f}{ref_unet:>13.4f}{ours_unet / ref_unet:>16.3f}")
    gen_name = f"generation, {args.steps} Euler steps + CFG"
    print(f"{gen_name:<38}{ours_gen:>10.4f}{ref_gen:>13.4f}{ours_gen / ref_gen:>16.3f}")
    print("(ratio < 1: ours is faster; generation = prompt + negative encoding, sampling, VAE decode, for both)")


if __name__ == "__main__":
    main()
