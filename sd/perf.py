"""The CLI's and the app's performance flags (issue 14): `--low-memory` and `--threads`.

--low-memory   nothing stays loaded between uses: the text towers, the UNet (for the sampling, dropped before the
               decode) and the VAE are read from the file for each use and dropped after (sd.loader._dropped, the
               mechanism of SD3's text towers), and the decode runs in 64x64-latent tiles (sd.vae.decode_tiled).
               Measured with bench/full_size.py --low-memory and bench/low_memory.py (README "Performance").
--threads N    torch's intra-op threads (default: torch's own, one per core). Measured with bench/engine_costs.py.
"""
from __future__ import annotations

import argparse


def add_flags(ap: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    ap.add_argument("--low-memory", action="store_true",
                    help="load each part only for its use (text encoders, UNet, VAE read from the file per "
                         "request and dropped after), tiled VAE decode")
    ap.add_argument("--threads", type=int, default=None, metavar="N",
                    help="torch CPU threads (default: torch's, one per core)")


def apply_threads(n: int | None) -> None:
    """torch.set_num_threads(n) for a positive n; None keeps torch's default. ValueError in one line otherwise."""
    if n is None:
        return
    if n < 1:
        raise ValueError(f"--threads must be at least 1, got {n}")
    import torch

    torch.set_num_threads(n)
