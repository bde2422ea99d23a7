"""Procedural "shapes" dataset for the built-in demo model: no download, generated on the fly.

Each sample is a 64x64 RGB image of one (sometimes two) flat-colored shapes on a flat background, with a
plain-English caption such as "a small yellow star in the top left corner on a black background".
A sample is a pure function of (index, seed), so the dataset is deterministic and needs no storage.

Held-out split: some (color, shape, position) combinations never appear as a single-shape training caption
(`is_held_out`); the evaluator (`sd.demo.evaluate`) generates only from those.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64                 # image side in pixels
SUPERSAMPLE = 4           # shapes are drawn at 4x and box-filtered down (anti-aliased edges)

# One palette for shapes and backgrounds; colors are far apart in RGB so pixel analysis can tell them.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOR_NAMES = tuple(COLORS)
SHAPES = ("circle", "square", "triangle", "star")
POSITIONS = ("center", "top left", "top right", "bottom left", "bottom right")
SIZES = {"small": 10.0, "": 13.0, "large": 16.0}  # size word -> radius (half of the bounding box side)

# Shape centers per position (pixels, x and y); training jitters them by up to JITTER pixels.
POSITION_CENTERS = {
    "center": (32.0, 32.0),
    "top left": (19.0, 19.0),
    "top right": (45.0, 19.0),
    "bottom left": (19.0, 45.0),
    "bottom right": (45.0, 45.0),
}
JITTER = 2.0
TWO_SHAPE_FRACTION = 0.15  # share of samples with two shapes ("... on the left and ... on the right")
STAR_INNER = 0.45          # inner/outer radius of the 5-point star


@dataclass(frozen=True)
class ShapeSpec:
    """One shape in an image: what the caption says about it and where it is drawn."""

    color: str
    shape: str
    position: str          # one of POSITIONS, or "left" / "right" in two-shape images
    size: str              # key of SIZES
    cx: float              # center x in pixels
    cy: float              # center y in pixels


@dataclass(frozen=True)
class Sample:
    """A rendered image with its caption and the ground truth the evaluator checks."""

    image: np.ndarray      # (64, 64, 3) uint8
    caption: str
    shapes: tuple[ShapeSpec, ...]
    background: str


def is_held_out(color: str, shape: str, position: str) -> bool:
    """The (color, shape, position) combinations kept out of training: 20 of the 6*4*5 = 120.

    Every color, shape and position still occurs in training, only these exact combinations do not.
    """
    c, s, p = COLOR_NAMES.index(color), SHAPES.index(shape), POSITIONS.index(position)
    return (c + 2 * s + 3 * p) % 6 == 0


def held_out_combinations() -> list[tuple[str, str, str]]:
    """All held-out (color, shape, position) triples in a fixed order."""
    return [(c, s, p) for c in COLOR_NAMES for s in SHAPES for p in POSITIONS if is_held_out(c, s, p)]


def caption_for(color: str, shape: str, position: str, background: str, size: str = "",
                say_center: bool = True) -> str:
    """Plain-English caption of a single-shape image."""
    words = ["a"] + ([size] if size else []) + [color, shape]
    if position != "center":
        words += ["in the", position, "corner"]
    elif say_center:
        words += ["in the center"]
    words += ["on a", background, "background"]
    return " ".join(words)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a triangle (apex up, fills half its bounding box) or a 5-point star, at scale."""
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    pts = []
    for i in range(10):
        ang = -np.pi / 2 + i * np.pi / 5
        rad = r if i % 2 == 0 else r * STAR_INNER
        pts.append((cx + rad * np.cos(ang), cy + rad * np.sin(ang)))
    # the star's outer points span [-r, r] horizontally only approximately; center it vertically
    ys = [p[1] for p in pts]
    dy = (cy - (min(ys) + max(ys)) / 2)
    return [(x, y + dy) for x, y in pts]


def render(shapes: tuple[ShapeSpec, ...], background: str) -> np.ndarray:
    """Draw the shapes on a flat background. Returns (64, 64, 3) uint8."""
    s = SUPERSAMPLE
    img = Image.new("RGB", (SIZE * s, SIZE * s), COLORS[background])
    draw = ImageDraw.Draw(img)
    for sh in shapes:
        r = SIZES[sh.size] * s
        cx, cy = sh.cx * s, sh.cy * s
        fill = COLORS[sh.color]
        if sh.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif sh.shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(sh.shape, cx, cy, r), fill=fill)
    img = img.resize((SIZE, SIZE), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8).copy()


def _single(rng: np.random.Generator) -> tuple[tuple[ShapeSpec, ...], str, str]:
    """A single-shape training sample whose (color, shape, position) is not held out."""
    while True:
        color = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        position = POSITIONS[rng.integers(len(POSITIONS))]
        if not is_held_out(color, shape, position):
            break
    background = rng.choice([c for c in COLOR_NAMES if c != color])
    size = list(SIZES)[rng.integers(len(SIZES))]
    x0, y0 = POSITION_CENTERS[position]
    cx, cy = x0 + rng.uniform(-JITTER, JITTER), y0 + rng.uniform(-JITTER, JITTER)
    spec = ShapeSpec(color, shape, position, size, cx, cy)
    caption = caption_for(color, shape, position, background, size, say_center=bool(rng.integers(2)))
    return (spec,), str(background), caption


def _pair(rng: np.random.Generator) -> tuple[tuple[ShapeSpec, ...], str, str]:
    """Two shapes side by side: "a red circle on the left and a blue star on the right on a ... background"."""
    c1, c2 = rng.choice(COLOR_NAMES, size=2, replace=False)
    background = rng.choice([c for c in COLOR_NAMES if c not in (c1, c2)])
    s1, s2 = SHAPES[rng.integers(len(SHAPES))], SHAPES[rng.integers(len(SHAPES))]
    size = ["small", ""][rng.integers(2)]
    cy = 32.0 + rng.uniform(-JITTER, JITTER)
    left = ShapeSpec(str(c1), s1, "left", size, 17.0 + rng.uniform(-JITTER, JITTER), cy)
    right = ShapeSpec(str(c2), s2, "right", size, 47.0 + rng.uniform(-JITTER, JITTER), cy)
    sz = f"{size} " if size else ""
    caption = (f"a {sz}{c1} {s1} on the left and a {sz}{c2} {s2} on the right "
               f"on a {background} background")
    return (left, right), str(background), caption


def make_sample(index: int, seed: int = 0) -> Sample:
    """Training sample number `index` of the dataset with this seed (deterministic)."""
    rng = np.random.default_rng([seed, index])
    if rng.uniform() < TWO_SHAPE_FRACTION:
        shapes, background, caption = _pair(rng)
    else:
        shapes, background, caption = _single(rng)
    return Sample(render(shapes, background), caption, shapes, background)


def make_batch(start: int, count: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Images (count, 64, 64, 3) uint8 and their captions for indices start .. start+count-1."""
    samples = [make_sample(i, seed) for i in range(start, start + count)]
    return np.stack([s.image for s in samples]), [s.caption for s in samples]


def held_out_prompts(count: int | None = None) -> list[tuple[str, ShapeSpec, str]]:
    """Evaluation prompts built only from held-out combinations: (caption, target shape, background).

    Background and size cycle deterministically; the target's cx/cy are the nominal position centers.
    """
    out = []
    combos = held_out_combinations()
    for i, (color, shape, position) in enumerate(combos):
        bgs = [c for c in COLOR_NAMES if c != color]
        background = bgs[(i * 7) % len(bgs)]
        size = list(SIZES)[i % len(SIZES)]
        cx, cy = POSITION_CENTERS[position]
        out.append((caption_for(color, shape, position, background, size),
                    ShapeSpec(color, shape, position, size, cx, cy), background))
    return out if count is None else out[:count]
