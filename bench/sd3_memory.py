"""Peak memory of one full-size SD3.5 generation on the CPU, per phase, with the text encoders freed before the MMDiT
runs (the default, sd.text_encoders.Resident) and kept loaded (`--keep-text-encoders`). Issue 16 item 8.

Writes random-weight files in the exact released layouts, tensor by tensor (never the whole file in memory):
the MMDiT + VAE checkpoint from tests/data/checkpoint-keys/<layout>.json, and the separate text encoders
clip_l / clip_g / t5xxl (the bundled keys of sd3_medium.json without their `text_encoders.<name>.transformer.`
prefix, as the separate files name them) in bf16 or fp16; then runs one generation per mode in a fresh process
and prints the peak resident set size (VmHWM, reset between phases through /proc/self/clear_refs) of each phase:
load (load_model), text (prompt and negative through CLIP-L, CLIP-G, T5), sampling (the MMDiT steps), decode.

    flock /tmp/heavy.lock .venv/bin/python bench/sd3_memory.py --dir /tmp/sd3mem --dtype bfloat16

Compute on a CPU without bf16/fp16 instructions is slow (~3 GFLOPS a core), so the run is small where memory does
not depend on it: --size 64 (a 64x64 image), --steps 1, CFG 1 (one MMDiT pass; the negative is still encoded), which
the table states. The files are deleted afterwards unless --keep-files.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))   # run as `python bench/sd3_memory.py`: the engine is the repository's sd/
KEYS = ROOT / "tests" / "data" / "checkpoint-keys"
ST_DTYPE = {"bfloat16": "BF16", "float16": "F16"}
TEXT = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
        "t5xxl_fp16": "text_encoders.t5xxl.transformer."}


def layout(name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in json.loads((KEYS / f"{name}.json").read_text())["tensors"].items()}


def write_random_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str) -> int:
    """A safetensors file of `shapes`, written one tensor at a time from a 16M-value random pool (N(0, 0.02); 1-D
    `*.weight` tensors, the norms' scales, 1 + N(0, 0.02)). Returns the bytes of tensor data."""
    import torch

    tdt = getattr(torch, dtype)
    size = torch.finfo(tdt).bits // 8
    g = torch.Generator().manual_seed(0)
    pool = (torch.randn(1 << 24, generator=g) * 0.02).to(tdt)          # (16M,)
    header, off = {}, 0
    for k, s in shapes.items():
        n = math.prod(s) * size
        header[k] = {"dtype": ST_DTYPE[dtype], "shape": list(s), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for k, s in shapes.items():
            n = math.prod(s)
            reps = -(-n // pool.numel())
            t = (pool.repeat(reps) if reps > 1 else pool)[:n]
            if len(s) == 1 and k.endswith(".weight"):
                t = t + 1
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes())
    return off


def write_files(folder: Path, name: str, dtype: str) -> dict[str, float]:
    """models/checkpoints/<layout>.safetensors and models/text_encoders/{clip_l,clip_g,t5xxl_fp16}.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "text_encoders").mkdir(exist_ok=True)
    sizes = {}
    shapes = layout(name)
    net = {k: s for k, s in shapes.items() if k.startswith(("model.diffusion_model.", "first_stage_model."))}
    sizes[name] = write_random_safetensors(folder / f"{name}.safetensors", net, dtype) / 1e9
    bundled = layout("sd3_medium")
    for file, prefix in TEXT.items():
        part = {k[len(prefix):]: s for k, s in bundled.items() if k.startswith(prefix)}
        sizes[file] = write_random_safetensors(folder / "text_encoders" / f"{file}.safetensors", part, dtype) / 1e9
    # T5's real spiece.model cannot be fetched here: a small sentencepiece model with T5's special ids stands in
    # (prompts still become 77 tokens, so T5's cost and memory are the real ones)
    from tests.tiny_sd3 import write_tiny_spiece

    write_tiny_spiece(folder / "text_encoders" / "spiece.model")
    return sizes


# ----------------------------------------------------------------------------------------------- one run


def hwm_gib() -> float:
    """Peak resident set size since the last reset (VmHWM), GiB."""
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 2**20


def reset_hwm() -> None:
    Path("/proc/self/clear_refs").write_text("5")   # Linux >= 4.0: resets VmHWM to the current RSS


def run_once(folder: Path, name: str, dtype: str, keep: bool, size: int, steps: int, cfg: float) -> dict:
    import torch

    from sd.pipeline import GenerateParams, generate, load_model
    from sd.text_encoders import TextSources

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    out, t0 = {"base": hwm_gib()}, time.time()
    reset_hwm()
    model = load_model(folder / f"{name}.safetensors", dtype=dtype, sources=TextSources(keep=keep))
    out["load"], out["load_s"] = hwm_gib(), time.time() - t0
    marks = {"t": time.time()}
    reset_hwm()

    def first_forward(module, inputs):
        if "text" not in out:
            out["text"], out["text_s"] = hwm_gib(), time.time() - marks["t"]
            marks["t"] = time.time()
            reset_hwm()

    hook = model.parts.unet.register_forward_pre_hook(first_forward)
    vae = model.parts.vae
    plain_decode = vae.decode

    def decode(z):
        del vae.decode   # once: a float32 re-decode (a deep copy of the VAE) must not inherit this wrapper
        if "sampling" not in out:
            out["sampling"], out["sampling_s"] = hwm_gib(), time.time() - marks["t"]
            marks["t"] = time.time()
            reset_hwm()
        return plain_decode(z)

    vae.decode = decode
    p = GenerateParams(prompt="a photo of an astronaut riding a horse on the moon", negative_prompt="",
                       width=size, height=size, steps=steps, cfg=cfg, seed=0)
    res = generate(model, p)
    out["decode"], out["decode_s"] = hwm_gib(), time.time() - marks["t"]
    hook.remove()
    out["notes"] = res.info.get("notes", [])
    out["finite"] = bool(torch.isfinite(res.latents).all())
    return out


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, help="scratch folder for the written files")
    ap.add_argument("--layout", default="sd35_large", choices=["sd35_large", "sd35_medium", "sd3_medium"])
    ap.add_argument("--dtype", default="bfloat16", choices=list(ST_DTYPE))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--cfg", type=float, default=1.0)
    ap.add_argument("--modes", default="free,keep", help="free (the default: towers freed), keep, or both")
    ap.add_argument("--keep-files", action="store_true")
    ap.add_argument("--run", choices=["free", "keep"], help=argparse.SUPPRESS)   # the child process
    args = ap.parse_args(argv)
    folder = Path(args.dir)
    if args.run:
        print(json.dumps(run_once(folder, args.layout, args.dtype, args.run == "keep", args.size, args.steps,
                                  args.cfg)))
        return 0
    t = time.time()
    sizes = write_files(folder, args.layout, args.dtype)
    print(f"wrote {', '.join(f'{k} {v:.2f} GB' for k, v in sizes.items())} ({args.dtype}) in {time.time() - t:.0f} s",
          flush=True)
    rows = {}
    try:
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--dir", str(folder), "--layout", args.layout, "--dtype", args.dtype,
                   "--size", str(args.size), "--steps", str(args.steps), "--cfg", str(args.cfg), "--run", mode]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if done.returncode:
                print(f"{mode}: failed\n{done.stderr[-3000:]}", flush=True)
                continue
            rows[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            print(mode, json.dumps(rows[mode]), flush=True)
    finally:
        if not args.keep_files:
            for f in [folder / f"{args.layout}.safetensors", folder / "text_encoders" / "spiece.model",
                      *[folder / "text_encoders" / f"{k}.safetensors" for k in TEXT]]:
                f.unlink(missing_ok=True)
    print(f"\n{args.layout} ({args.dtype}, random weights, CPU, {args.size}x{args.size}, {args.steps} step, CFG "
          f"{args.cfg:g}): peak RSS per phase, GiB")
    print("| text encoders | load | text | sampling | decode | whole run |")
    print("|---|---|---|---|---|---|")
    for mode, r in rows.items():
        label = "freed (default)" if mode == "free" else "kept (--keep-text-encoders)"
        peak = max(r["load"], r["text"], r["sampling"], r["decode"])
        print(f"| {label} | {r['load']:.1f} | {r['text']:.1f} | {r['sampling']:.1f} | {r['decode']:.1f} | {peak:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
