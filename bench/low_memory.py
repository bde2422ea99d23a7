"""Peak memory of the low-memory mode (`--low-memory`) against the normal mode, whole process, on full-size weights.

Each mode runs in its own process (normal, low, normal, low ... for --pairs), one torch thread, on the random-weight
checkpoint in the released layout that bench/full_size.py writes (SD 1.5 float32 by default), and reports the peak
RSS (VmHWM) after load, after the text conditioning, after sampling and after the decode, the wall and CPU time
(getrusage user + sys) of the whole process, and the PNG max |normal - low| (0 while the latent fits one 64x64
decode tile, i.e. up to 512x512; larger images differ near the tile seams, sd.vae.decode_tiled).

    flock /tmp/heavy.lock .venv/bin/python bench/low_memory.py --layout sd1 --size 512 --steps 1
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

T_START = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.full_size import NEGATIVE, PROMPT, peak_rss_mb, write_full  # noqa: E402


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(a) -> None:
    import torch

    import sd.pipeline as pl
    from sd.cpu_tuning import tune_allocator

    tune_allocator()
    torch.set_num_threads(a.threads)
    low = a.child == "low"
    marks = {"imports": peak_rss_mb()}
    model = pl.load_model(a.ckpt, dtype=a.dtype, low_memory=low)
    marks["load"] = peak_rss_mb()
    real_guided, real_decode = pl.guided_denoiser, pl.decode_latents_info

    def guided(*args, **kw):
        out = real_guided(*args, **kw)
        marks["text"] = peak_rss_mb()
        return out

    def decode(*args, **kw):
        marks["sampling"] = peak_rss_mb()
        return real_decode(*args, **kw)

    pl.guided_denoiser, pl.decode_latents_info = guided, decode
    p = pl.GenerateParams(prompt=PROMPT, negative_prompt=NEGATIVE, width=a.size, height=a.size, steps=a.steps,
                          cfg=7.0, seed=1, sampler="euler", schedule="karras")
    res = pl.generate(model, p)
    marks["decode"] = peak_rss_mb()
    res.images[0].save(a.out + ".png")
    marks["wall_s"], marks["cpu_s"] = time.perf_counter() - T_START, cpu_s()
    Path(a.out + ".json").write_text(json.dumps(marks))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layout", default="sd1", choices=["sd1", "sdxl_base"])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=1)
    ap.add_argument("--dir", default=str(ROOT / ".bench"))
    ap.add_argument("--child", choices=["normal", "low"], help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    import numpy as np
    from PIL import Image

    d = Path(a.dir)
    ckpt = write_full(a.layout, d / f"full_{a.layout}.safetensors")
    runs: dict[str, list[dict]] = {"normal": [], "low": []}
    for pair in range(a.pairs):
        for mode in ("normal", "low") if pair % 2 == 0 else ("low", "normal"):
            out = str(d / f"lowmem_{mode}_{pair}")
            subprocess.run([sys.executable, __file__, "--child", mode, "--ckpt", str(ckpt), "--out", out,
                            *sys.argv[1:]], check=True)
            runs[mode].append(json.loads(Path(out + ".json").read_text()))
            print(f"  pair {pair} {mode:<6} peak {max(v for k, v in runs[mode][-1].items() if not k.endswith('_s')):7.0f}"
                  f" MiB  wall {runs[mode][-1]['wall_s']:6.1f} s", flush=True)
    x, y = (np.asarray(Image.open(d / f"lowmem_{m}_0.png"), dtype=np.int16) for m in ("normal", "low"))
    print(f"\n{a.layout} {a.size}x{a.size}, {a.steps} step(s), {a.dtype}, {a.threads} thread(s); first pair")
    print(f"{'peak RSS (VmHWM) after':<24}{'normal MiB':>12}{'low MiB':>10}{'low/normal':>12}")
    n, lo = runs["normal"][0], runs["low"][0]
    for k in ("imports", "load", "text", "sampling", "decode"):
        print(f"{k:<24}{n[k]:>12.0f}{lo[k]:>10.0f}{lo[k] / n[k]:>12.3f}")
    for k in ("wall_s", "cpu_s"):
        print(f"{'whole process ' + k:<24}{n[k]:>12.1f}{lo[k]:>10.1f}{lo[k] / n[k]:>12.3f}")
    print(f"PNG max |normal - low|: {int(np.abs(x - y).max())}")


if __name__ == "__main__":
    main()
