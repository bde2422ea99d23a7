"""The built-in demo model: a tiny SD 1.x-layout checkpoint trained by `sd.train` on procedural shapes.

`DEMO_CHECKPOINT` is used by `python app.py` and `python -m sd generate` when no other checkpoint is given.
See README.md in this folder for how it was trained and how to reproduce it.
"""
from __future__ import annotations

from pathlib import Path

DEMO_CHECKPOINT: Path = Path(__file__).resolve().parent / "shapes-sd1.safetensors"

EXAMPLE_PROMPTS: list[str] = [
    "a red circle on a blue background",
    "a small yellow star in the top left corner on a black background",
    "a large green square in the bottom right corner on a white background",
    "a blue triangle in the top right corner on a yellow background",
    "a white star in the center on a red background",
    "a small red circle on the left and a small blue square on the right on a white background",
]
