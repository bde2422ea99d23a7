"""Activation peak of a full-size UNet step and a VAE decode tile, counted on the meta device (nothing computed).

For a run this CPU cannot do in useful time (SDXL 1024 in float16: bench/cpu_dtypes.py measures half-precision
convolutions here at ~0.3 GFLOP/s, hours per step), the low-memory mode's peak is estimated from parts that can be
measured exactly: the weights loaded at the time (the UNet while sampling, the VAE while decoding, counted from the
released layout) plus the largest sum of live tensors during one forward, counted by a dispatch mode over the same
network built on the meta device (every op output that is not a view is added when made and taken off when freed). CPU SDPA's fused kernel is not chosen on the
meta device, so attention is counted with its full (B, heads, T, T) score matrix: an upper bound.

    .venv/bin/python bench/meta_peak.py --layout sdxl_base --size 1024 --dtype float16
"""
from __future__ import annotations

import argparse
import math
import sys
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


class LiveBytes(TorchDispatchMode):
    """Peak of the bytes held by live, non-view op outputs inside the mode."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _freed(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out   # a view or an in-place result: no new memory
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                n = t.numel() * t.element_size()
                self.live += n
                weakref.finalize(t, self._freed, n)
        self.peak = max(self.peak, self.live)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layout", default="sdxl_base")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--dtype", default="float16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args()

    from sd.families import detect
    from sd.families.shapes import UNET
    from sd.loader import build_network
    from sd.pipeline import TILE
    from sd.vq import build_first_stage
    from tests.tiny import reference_shapes

    dtype = getattr(torch, a.dtype)
    shapes = reference_shapes(a.layout)
    spec = detect(shapes)
    gib = 2**30
    weights = {part: sum(math.prod(s) for k, s in shapes.items() if k.startswith(pre)) * dtype.itemsize / gib
               for part, pre in [("unet", UNET), ("vae", "first_stage_model."),
                                 ("text", ("cond_stage_model.", "conditioner."))]}
    unet = build_network(spec, device="meta", dtype=dtype).eval()
    h = a.size // spec.latent.factor
    b = 2 * a.batch   # CFG: cond + uncond in one call
    x = torch.empty(b, spec.unet.in_channels, h, h, device="meta", dtype=dtype)
    t = torch.empty(b, device="meta", dtype=dtype)
    ctx = torch.empty(b, 77, spec.unet.context_dim, device="meta", dtype=dtype)
    kw = {"y": torch.empty(b, spec.unet.adm_in_channels, device="meta", dtype=dtype)} if spec.unet.adm_in_channels else {}
    with torch.no_grad(), LiveBytes() as m:
        unet(x, t, context=ctx, **kw)
    pair_peak = m.peak / gib
    with torch.no_grad(), LiveBytes() as m:   # --low-memory: sd.pipeline.one_by_one, one image of the pair at a time
        unet(x[:1], t[:1], context=ctx[:1], **{k: v[:1] for k, v in kw.items()})
    unet_peak = m.peak / gib
    vae = build_first_stage(spec.vae, device="meta", dtype=dtype).eval()
    tile = min(TILE, h)
    with torch.no_grad(), LiveBytes() as m:
        vae.decode(torch.empty(a.batch, spec.latent.channels, tile, tile, device="meta", dtype=dtype))
    vae_peak = m.peak / gib
    print(f"{a.layout} {a.size}x{a.size}, batch {a.batch} (CFG pair {b}), {a.dtype}")
    print(f"weights GiB: UNet {weights['unet']:.2f}, text towers {weights['text']:.2f}, VAE {weights['vae']:.2f}")
    print(f"activation peak GiB (upper bounds): the CFG pair in one UNet call {pair_peak:.2f}, one image "
          f"{unet_peak:.2f}, one {tile}x{tile}-latent decode tile {vae_peak:.2f}")
    print(f"low-memory mode, sampling: UNet + one image's activations = {weights['unet'] + unet_peak:.2f} GiB "
          f"(+ the process: Python, torch, ~0.5 GiB)")
    print(f"low-memory mode, decode: VAE + one tile = {weights['vae'] + vae_peak:.2f} GiB (the UNet is dropped "
          f"before the decode)")
    print(f"normal mode: all weights + the pair's activations = {sum(weights.values()) + pair_peak:.2f} GiB")


if __name__ == "__main__":
    main()
