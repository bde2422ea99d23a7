"""Cost of applying a LoRA per request (sd.lora's hooked forwards) on a full-size SD 1.x UNet, CPU float32.

Builds the released SD 1.x UNet (random weights: the cost does not depend on them), a kohya-style rank-R LoRA on every
attention / feed-forward / proj Linear and Conv (what LoRA trainers target by default), and times one UNet forward
plain, with the LoRA hooked (y = base(x) + up(down(x)) per layer), and with the LoRA merged into a copy (the
alternative: one-off merge cost + a second copy of the patched weights). Prints the numbers measured in one run.

    .venv/bin/python bench/lora_cost.py [--side 32] [--rank 16] [--threads 2]
"""
from __future__ import annotations

import argparse
import copy
import time
from types import SimpleNamespace

import torch
from torch import nn

from sd.lora import LoraFile, Patch, apply_loras
from sd.unet import UNetModel, unet_config_for


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", type=int, default=32, help="latent side (32 = a 256 px image)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    unet = UNetModel(unet_config_for("sd1")).eval().requires_grad_(False)
    patches = {}
    for name, m in unet.named_modules():
        if isinstance(m, nn.Linear) and ".transformer_blocks." in name or (
                isinstance(m, nn.Conv2d) and name.endswith(("proj_in", "proj_out"))):
            out, inn = m.weight.shape[:2]
            k = m.weight.shape[2:]
            patches["lora_unet_" + name.replace(".", "_")] = Patch("lora", {
                "lora_down": 0.01 * torch.randn(a.rank, inn, *k), "lora_up": 0.01 * torch.randn(out, a.rank, *(1,) * len(k))},
                alpha=float(a.rank))
    lf = LoraFile(__import__("pathlib").Path("bench.safetensors"), patches)
    parts = SimpleNamespace(unet=unet, text_encoders=[])
    x, t, ctx = torch.randn(2, 4, a.side, a.side), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768)

    def timed(net) -> float:
        with torch.no_grad():
            net(x, t, context=ctx)
            t0 = time.perf_counter()
            for _ in range(a.repeat):
                net(x, t, context=ctx)
        return (time.perf_counter() - t0) / a.repeat

    import sd.lora as L

    L.lora_hash = lambda p: "-"          # the bench LoRA has no file
    t0 = time.perf_counter()
    merged_unet = copy.deepcopy(unet)
    for name, m in merged_unet.named_modules():
        p = lf.patches.get("lora_unet_" + name.replace(".", "_"))
        if p is not None:
            m.weight += p.dense(tuple(m.weight.shape)) * p.scale()
    merge = time.perf_counter() - t0
    plain = hooked = merged = float("inf")
    for _ in range(2):   # interleaved, best of two: a shared machine's load hits all three alike
        plain = min(plain, timed(unet))
        t0 = time.perf_counter()
        with apply_loras(parts, [(lf, 1.0, 1.0)]) as applied:
            setup = time.perf_counter() - t0
            hooked = min(hooked, timed(unet))
        merged = min(merged, timed(merged_unet))
    extra = sum(p.numel() * 4 for n, m in unet.named_modules() if "lora_unet_" + n.replace(".", "_") in lf.patches
                for p in [m.weight])
    print(f"SD 1.x UNet, batch 2 (CFG), {a.side}x{a.side} latent, {a.threads} threads, rank {a.rank} on "
          f"{applied.modules} layers:")
    print(f"  plain  {plain:.2f} s/forward")
    print(f"  hooked {hooked:.2f} s/forward ({hooked / plain:.3f}x), setup {setup * 1e3:.0f} ms per request")
    print(f"  merged {merged:.2f} s/forward after a {merge:.2f} s merge into a copy (+{extra / 2**20:.0f} MiB for the "
          f"patched weights alone; a deepcopy as here holds the whole UNet twice)")


if __name__ == "__main__":
    main()
