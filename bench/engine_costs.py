"""Our engine's costs on the full-size SD 1.5 UNet (random weights, released layout, float32), in one process:

- threads: one CFG step (the UNet on the batched cond + uncond pair) at 512x512 with 1 and 2 torch threads,
  interleaved 1, 2, 1, 2 ... (--thread-pairs), wall and CPU time (getrusage user + sys), with the load average;
- scaling: seconds per step against resolution (--sizes, batch 1) and against batch size (--batches, 512x512), and
  images per minute of the sampling alone at 20 steps (60 * batch / (20 * step s); text and decode not counted);
- preview: the app's live preview of a step (sd.preview.preview_image of the denoised latent at the app's preview
  size) against one 512x512 step: the ratio must stay under 2%.

The checkpoint is bench/full_size.py's (written once into .bench/). Run it alone on the machine when possible:

    flock /tmp/heavy.lock .venv/bin/python bench/engine_costs.py --sizes 256 512 768 --batches 1 2 4
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.full_size import PROMPT, write_full  # noqa: E402


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[256, 512, 768])
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--thread-pairs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="threads of the scaling and preview measurements")
    ap.add_argument("--dir", default=str(ROOT / ".bench"))
    ap.add_argument("--ckpt", default=None, help="another SD 1.x file (a tiny one to try the script)")
    a = ap.parse_args()

    import torch

    import sd.pipeline as pl
    from sd.cpu_tuning import tune_allocator
    from sd.preview import preview_image

    tune_allocator()
    ckpt = a.ckpt or write_full("sd1", Path(a.dir) / "full_sd1.safetensors")
    model = pl.load_model(ckpt)
    dens: dict = {}

    def step(size: int, batch: int, threads: int) -> tuple[float, float, torch.Tensor]:
        """(wall s, CPU s, denoised) of one guided Euler step's denoiser call at `size`, `batch`."""
        torch.set_num_threads(threads)
        key = (size, batch)
        if key not in dens:
            p = pl.GenerateParams(prompt=PROMPT, width=size, height=size, batch_size=batch, cfg=7.0, seed=1)
            dens[key] = pl.guided_denoiser(model, p)
        x = torch.randn(batch, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0)) * 14.6
        sigma = torch.full((batch,), 14.6)
        t, c = time.perf_counter(), cpu_s()
        with torch.no_grad():
            out = dens[key](x, sigma)   # (B, 4, h, w): the CFG-combined denoised estimate
        return time.perf_counter() - t, cpu_s() - c, out

    step(256, 1, a.threads)   # the weights fault in from the file (not timed)
    print(f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)

    print("\nthreads, one 512x512 CFG step (interleaved)")
    rows: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    for _ in range(a.thread_pairs):
        for n in (1, 2):
            w, c, _ = step(512, 1, n)
            rows[n].append((w, c))
            print(f"  {n} thread(s): wall {w:6.2f} s  cpu {c:6.2f} s  (load {os.getloadavg()[0]:.1f})", flush=True)
    for n, r in rows.items():
        print(f"{n} thread(s): mean wall {sum(x for x, _ in r) / len(r):.2f} s, "
              f"mean cpu {sum(y for _, y in r) / len(r):.2f} s over {len(r)} step(s)")

    print(f"\nscaling ({a.threads} thread(s), float32)")
    print(f"{'size':>6}{'batch':>7}{'s/step':>9}{'cpu s':>8}{'img/min @20 steps':>19}")
    t512 = None
    for size, batch in [(s, 1) for s in a.sizes] + [(512, b) for b in a.batches if b != 1]:
        w, c, den = step(size, batch, a.threads)
        if (size, batch) == (512, 1):
            t512, den512 = w, den
        print(f"{size:>6}{batch:>7}{w:>9.2f}{c:>8.2f}{60 * batch / (20 * w):>19.3f}", flush=True)

    if t512 is None:
        t512, _, den512 = step(512, 1, a.threads)
    torch.set_num_threads(a.threads)
    n = 20
    t = time.perf_counter()
    for _ in range(n):
        preview_image(den512, "sd1", (512, 512))   # app.preview_size(512, 512) = (512, 512)
    prev = (time.perf_counter() - t) / n
    print(f"\npreview of a 512x512 step: {prev * 1e3:.2f} ms against a {t512:.2f} s step: {100 * prev / t512:.3f}% "
          f"(bound 2%)")


if __name__ == "__main__":
    main()
