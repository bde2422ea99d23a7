"""Full-size SD 1.5 / SDXL: our engine against diffusers on the same random weights, whole process, paired runs.

No real weights exist on this machine, so a random-weight checkpoint is written once in the exact released key
layout (tests/data/checkpoint-keys/sd1.json or sdxl_base.json; SD 1.5 stored in float32 like
v1-5-pruned-emaonly.safetensors, SDXL in float16 like sd_xl_base_1.0.safetensors). Then each run is its own
process (imports included, as a user starts one), alternating ours and diffusers (ABAB...), and each reports its
phases: imports, load (file -> models ready), text (prompt + negative), every sampler step, VAE decode (to 8-bit
PIL), and the peak RSS after each phase (VmHWM). The images must agree: max |diff| of the PNGs is printed and
checked against --max-diff (3 in float32). Before the first run the whole file is read once, so every run finds it
in the page cache (otherwise the first run, always ours, pays the disk read in its load and the UNet's first step).
`--low-memory` runs ours in that mode (diffusers' side unchanged): the whole-process peak of the mode against
diffusers' default.

diffusers' side: its own single-file converters (`convert_ldm_*_checkpoint`, what `from_single_file` runs) into
models built on the meta device and assigned (the low-memory path `from_single_file` takes with accelerate), its
StableDiffusion(XL)Pipeline with EulerDiscreteScheduler given our Karras sigmas, the same initial latent, and the
prompt embeddings of its converted text encoders on our token ids (no CLIP tokenizer files exist offline).

    .venv/bin/python bench/full_size.py --layout sd1 --size 512 --steps 4 --pairs 2
    .venv/bin/python bench/full_size.py --layout sd1 --size 512 --steps 4 --dtype bfloat16 --pairs 1
    .venv/bin/python bench/full_size.py --layout sdxl_base --size 1024 --steps 2 --pairs 1

Run it under `flock /tmp/heavy.lock` on a shared machine: SD 1.5 float32 needs ~7 GB per process, SDXL ~14 GB.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

T_START = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT, NEGATIVE = "a photo of a cat sitting on a wooden table, best quality", ""
SCHEDULE = {"sd1": (0.00085, 0.012), "sdxl_base": (0.00085, 0.012)}   # linear_start, linear_end
STORED = {"sd1": "float32", "sdxl_base": "float16"}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_full(layout: str, path: Path) -> Path:
    """Random weights for every tensor of the released layout (the tests' init rule), the schedule buffers real."""
    import torch
    from safetensors.torch import save_file

    from tests.tiny import _random_like, reference_shapes, schedule_buffers

    if path.exists():
        return path
    dtype = getattr(torch, STORED[layout])
    buffers = schedule_buffers(*SCHEDULE[layout])
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, shape in reference_shapes(layout).items():
        if k.endswith("position_ids"):
            sd[k] = torch.arange(shape[-1])[None]
        elif k in buffers:
            sd[k] = buffers[k]
        else:
            sd[k] = _random_like(k, tuple(shape), g).to(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp))
    tmp.rename(path)
    return path


# ---------------------------------------------------------------------------------------------------- children
def child_ours(a, marks: dict) -> "object":
    import torch

    import sd.pipeline as pl
    from sd.cpu_tuning import tune_allocator

    if not a.no_tuning and not a.low_memory:   # as app.py / the CLI: no allocator tuning under --low-memory
        tune_allocator()   # what `python -m sd` and app.py do first
    from transformers import CLIPTextModel  # noqa: F401  (sd.text imports it on first use; here with the imports,
    #                                                   as diffusers' side imports it up front)
    torch.set_num_threads(a.threads)
    marks["imports"] = (time.perf_counter(), peak_rss_mb())
    model = pl.load_model(a.ckpt, dtype=a.dtype, low_memory=a.low_memory)
    marks["load"] = (time.perf_counter(), peak_rss_mb())
    steps: list[float] = []
    real_guided, real_decode = pl.guided_denoiser, pl.decode_latents_info

    def guided(*args, **kw):
        out = real_guided(*args, **kw)
        marks["text"] = (time.perf_counter(), peak_rss_mb())
        return out

    def decode(*args, **kw):
        marks["sampling"] = (time.perf_counter(), peak_rss_mb())
        return real_decode(*args, **kw)

    pl.guided_denoiser, pl.decode_latents_info = guided, decode
    p = pl.GenerateParams(prompt=PROMPT, negative_prompt=NEGATIVE, width=a.size, height=a.size, steps=a.steps,
                          cfg=a.cfg, seed=a.seed, sampler="euler", schedule="karras", batch_size=a.batch)
    res = pl.generate(model, p, callback=lambda info: steps.append(time.perf_counter()))
    marks["decode"] = (time.perf_counter(), peak_rss_mb())
    marks["steps"] = steps
    return res.images


def child_diffusers(a, marks: dict) -> "object":
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.loaders import single_file_utils as sfu
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sd.checkpoint import open_checkpoint
    from sd.families import detect
    from sd.loader import training_sigmas
    from sd.families import get_family
    from sd.pipeline import initial_noise
    from sd.schedules import get_sigmas
    from tests.test_parity_pipeline import diffusers_text, ldm_yaml

    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    marks["imports"] = (time.perf_counter(), peak_rss_mb())
    from accelerate import init_empty_weights

    opened = open_checkpoint(a.ckpt)
    spec = detect(opened.shapes())   # the layout numbers diffusers' config functions need
    model_sigmas, _ = training_sigmas(opened, get_family(spec.family))   # the file's alphas_cumprod, as ours
    ckpt = load_file(a.ckpt)
    yaml = ldm_yaml(spec)

    def build(cls, cfg, sd):
        with init_empty_weights():   # parameters on meta, buffers real: what from_single_file does
            m = cls(**cfg) if isinstance(cfg, dict) else cls(cfg)
        m.load_state_dict(sd, strict=False, assign=True)
        return m.to(dtype).eval().requires_grad_(False)

    ucfg = sfu.create_unet_diffusers_config_from_ldm(yaml, ckpt)
    unet = build(UNet2DConditionModel, ucfg, sfu.convert_ldm_unet_checkpoint(ckpt, ucfg))
    vcfg = sfu.create_vae_diffusers_config_from_ldm(yaml, ckpt)
    vae = build(AutoencoderKL, vcfg, sfu.convert_ldm_vae_checkpoint(ckpt, vcfg))
    texts = []
    for t in spec.text_encoders:
        cfg = CLIPTextConfig(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp,
                             num_hidden_layers=t.layers, num_attention_heads=t.heads,
                             max_position_embeddings=t.context_length, hidden_act=t.act,
                             projection_dim=t.projection_dim or t.width)
        if t.naming == "hf":
            sd = sfu.convert_ldm_clip_checkpoint(ckpt, remove_prefix=t.prefix)
            sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
            texts.append(build(CLIPTextModel, cfg, sd))
        else:
            with init_empty_weights():
                shell = CLIPTextModelWithProjection(cfg)
            texts.append(build(CLIPTextModelWithProjection, cfg,
                               sfu.convert_open_clip_checkpoint(shell, ckpt, prefix=t.prefix)))
    left = [n for m in (unet, vae, *texts) for n, t in m.named_parameters() if t.is_meta]
    assert not left, f"parameters not loaded: {left[:5]}"
    del ckpt
    marks["load"] = (time.perf_counter(), peak_rss_mb())
    with torch.no_grad():
        c, pooled = diffusers_text(texts, spec, PROMPT)
        n, npooled = diffusers_text(texts, spec, NEGATIVE)
    marks["text"] = (time.perf_counter(), peak_rss_mb())
    sigmas = get_sigmas("karras", model_sigmas, a.steps)   # (steps + 1,), ending at 0 as diffusers expects
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   timestep_spacing="leading")
    lat = initial_noise(a.seed, (a.batch, 4, a.size // 8, a.size // 8))
    steps: list[float] = []

    def on_step(pipe, i, t, kw):
        steps.append(time.perf_counter())
        if i == a.steps - 1:
            marks["sampling"] = (time.perf_counter(), peak_rss_mb())
        return kw

    common = dict(guidance_scale=a.cfg, latents=lat.to(dtype), sigmas=sigmas.tolist(), height=a.size,
                  width=a.size, prompt_embeds=c.repeat(a.batch, 1, 1), negative_prompt_embeds=n.repeat(a.batch, 1, 1),
                  callback_on_step_end=on_step, output_type="pil")
    if a.layout == "sdxl_base":
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=texts[0], text_encoder_2=texts[1], tokenizer=None,
                                         tokenizer_2=None, unet=unet, scheduler=sched, force_zeros_for_empty_prompt=True)
        common.update(pooled_prompt_embeds=pooled.repeat(a.batch, 1),
                      negative_pooled_prompt_embeds=torch.zeros_like(npooled).repeat(a.batch, 1),
                      negative_prompt_embeds=torch.zeros_like(n).repeat(a.batch, 1, 1))
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=texts[0], tokenizer=None, unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        images = pipe(**common).images
    marks["decode"] = (time.perf_counter(), peak_rss_mb())
    marks["steps"] = steps
    return images


def run_child(a) -> None:
    marks: dict = {"start": (T_START, peak_rss_mb())}
    images = (child_ours if a.child == "ours" else child_diffusers)(a, marks)
    for i, im in enumerate(images):
        im.save(f"{a.out}.{i}.png")
    marks["save"] = (time.perf_counter(), peak_rss_mb())
    Path(a.out + ".json").write_text(json.dumps(marks))


# ------------------------------------------------------------------------------------------------------ parent
PHASES = ["imports", "load", "text", "sampling", "decode", "save"]


def phase_times(m: dict) -> dict:
    out, prev = {}, m["start"][0]
    for ph in PHASES:
        out[ph] = m[ph][0] - prev
        prev = m[ph][0]
    out["peak_mb"] = {ph: m[ph][1] for ph in PHASES}
    st = [m["text"][0], *m["steps"]]
    out["step_s"] = [b - a for a, b in zip(st, st[1:])]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layout", default="sd1", choices=["sd1", "sdxl_base"])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--pairs", type=int, default=2, help="ABAB pairs (ours, diffusers) of whole-process runs")
    ap.add_argument("--max-diff", type=int, default=None, help="PNG parity bound (default 3 in float32)")
    ap.add_argument("--dir", default=str(ROOT / ".bench"))
    ap.add_argument("--no-tuning", action="store_true", help="ours without sd.cpu_tuning (to measure its effect)")
    ap.add_argument("--low-memory", action="store_true", help="ours in --low-memory mode (diffusers unchanged)")
    ap.add_argument("--child", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return run_child(a)

    import numpy as np
    from PIL import Image

    d = Path(a.dir)
    t = time.perf_counter()
    ckpt = write_full(a.layout, d / f"full_{a.layout}.safetensors")
    print(f"checkpoint {ckpt.name}: {ckpt.stat().st_size / 2**30:.2f} GiB ({time.perf_counter() - t:.0f} s to write "
          f"or find)", flush=True)
    t = time.perf_counter()
    with open(ckpt, "rb") as f:   # into the page cache for every run alike (see the module docstring)
        while f.read(1 << 26):
            pass
    print(f"read once into the page cache: {time.perf_counter() - t:.1f} s", flush=True)
    results: dict[str, list[dict]] = {"ours": [], "diffusers": []}
    diffs = []
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    for pair in range(a.pairs):
        order = ["ours", "diffusers"] if pair % 2 == 0 else ["diffusers", "ours"]
        outs = {}
        for impl in order:
            out = str(d / f"run_{impl}_{pair}")
            t = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--child", impl, "--ckpt", str(ckpt), "--out", out,
                            *sys.argv[1:]], check=True, env=env)
            r = phase_times(json.loads(Path(out + ".json").read_text()))
            r["wall"] = time.perf_counter() - t
            results[impl].append(r)
            outs[impl] = out
            print(f"  pair {pair} {impl:<9} wall {r['wall']:7.1f} s  peak {max(r['peak_mb'].values()):7.0f} MiB",
                  flush=True)
        for i in range(a.batch):
            x, y = (np.asarray(Image.open(f"{outs[k]}.{i}.png"), dtype=np.int16) for k in ("ours", "diffusers"))
            diffs.append(int(np.abs(x - y).max()))
    report(a, results, diffs)


def report(a, results: dict, diffs: list[int]) -> None:
    def med(impl, key):
        return float(np.median([r[key] for r in results[impl]]))

    import numpy as np

    print(f"\n{a.layout} {a.size}x{a.size}, {a.steps} Euler + Karras steps, CFG {a.cfg}, batch {a.batch}, {a.dtype}, "
          f"{a.threads} threads, {a.pairs} pair(s){', ours --low-memory' if a.low_memory else ''}; medians")
    print(f"{'phase':<24}{'ours s':>10}{'diffusers s':>13}{'ours/diffusers':>16}")
    rows = [(ph, ph) for ph in PHASES] + [("whole process (wall)", "wall")]
    for name, key in rows:
        o, r = med("ours", key), med("diffusers", key)
        print(f"{name:<24}{o:>10.2f}{r:>13.2f}{o / r if r else math.nan:>16.3f}")
    o = float(np.median([np.median(r["step_s"]) for r in results["ours"]]))
    r = float(np.median([np.median(r["step_s"]) for r in results["diffusers"]]))
    print(f"{'one UNet step (median)':<24}{o:>10.2f}{r:>13.2f}{o / r:>16.3f}")
    po = max(max(r["peak_mb"].values()) for r in results["ours"])
    pr = max(max(r["peak_mb"].values()) for r in results["diffusers"])
    print(f"{'peak RSS MiB':<24}{po:>10.0f}{pr:>13.0f}{po / pr:>16.3f}")
    for ph in ("load", "text", "sampling", "decode"):
        print(f"  peak after {ph:<10} ours {results['ours'][0]['peak_mb'][ph]:7.0f}  diffusers "
              f"{results['diffusers'][0]['peak_mb'][ph]:7.0f} MiB")
    bound = a.max_diff if a.max_diff is not None else (3 if a.dtype == "float32" else 255)
    print(f"PNG max |ours - diffusers| per image: {diffs} (bound {bound})")
    if max(diffs) > bound:
        sys.exit(f"pixels differ by {max(diffs)} > {bound}: the timing comparison is not like for like")


if __name__ == "__main__":
    main()
