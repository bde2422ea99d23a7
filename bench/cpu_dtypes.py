"""float32 against bfloat16 / float16 compute on this CPU: one SD-sized 3x3 convolution (320 -> 320 channels) and
one attention-sized matmul (4096 x 640 @ 640 x 640), one thread, GFLOP/s of each dtype.

On a CPU without native bf16 / fp16 arithmetic (AVX2 only: no AVX-512 BF16, no AMX, no AVX512-FP16), torch runs
half-precision convolutions through slow reference paths; this says how slow before anyone samples in bfloat16.

    .venv/bin/python bench/cpu_dtypes.py
"""
from __future__ import annotations

import time

import torch


def main() -> None:
    torch.set_num_threads(1)
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    print("CPU flags:", " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16")
                                 if f" {f}" in flags) or "none of avx2/avx512")
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 320, 32, 32, generator=g), torch.randn(320, 320, 3, 3, generator=g)
    a, b = torch.randn(4096, 640, generator=g), torch.randn(640, 640, generator=g)
    conv_flop, mm_flop = 2 * 320 * 320 * 9 * 32 * 32, 2 * 4096 * 640 * 640
    print(f"{'dtype':<16}{'conv GFLOP/s':>14}{'matmul GFLOP/s':>16}")
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        xx, ww, aa, bb = x.to(dt), w.to(dt), a.to(dt), b.to(dt)
        torch.nn.functional.conv2d(xx, ww, padding=1)   # warm-up (kernel choice)
        t = time.perf_counter()
        torch.nn.functional.conv2d(xx, ww, padding=1)
        c = time.perf_counter() - t
        t = time.perf_counter()
        aa @ bb
        m = time.perf_counter() - t
        print(f"{str(dt).removeprefix('torch.'):<16}{conv_flop / c / 1e9:>14.2f}{mm_flop / m / 1e9:>16.2f}", flush=True)


if __name__ == "__main__":
    main()
