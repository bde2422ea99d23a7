"""Pixel-analysis scorer for the demo model: no learned model, only plain image measurements.

For one image it finds
- the background color: median of the 2-pixel border, snapped to the nearest palette color;
- the foreground: the largest 4-connected blob of pixels far from the background color;
- the foreground color: median of the blob's core pixels (eroded once), nearest palette color;
- the shape class from two geometric ratios of the blob:
    solidity = area / convex-hull area  (a 5-point star is ~0.55, convex shapes ~1)
    extent   = area / bounding-box area (square 1, circle pi/4 = 0.785, triangle 0.5);
- the position from the blob's bounding-box center (thirds of the image; corners need both coordinates off-center).
`score` compares that with the prompt's ground truth.

A second, independent color rule (`judge_colors`, issue 15) uses no blob: the median of the 1-pixel border names
the background, the median of every pixel far from that color names the foreground. `color_rule_evaluate` applies
it to the 12 simple prompts of `simple_color_prompts` ("a <color> <shape> on a <color> background").
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from .data import COLORS, ShapeSpec

_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # (6, 3)
_NAMES = list(COLORS)
FG_DISTANCE = 80.0        # RGB distance from the background above which a pixel is foreground


@dataclass(frozen=True)
class Analysis:
    """What pixel analysis sees in one image."""

    background: str
    color: str | None      # None when no foreground blob was found
    shape: str | None
    position: str | None
    area: int              # blob pixels
    extent: float
    solidity: float
    cx: float
    cy: float


def nearest_color(rgb: np.ndarray) -> str:
    """Palette name nearest to an RGB triple (0-255)."""
    d = ((_PALETTE - np.asarray(rgb, dtype=np.float32)[None]) ** 2).sum(-1)
    return _NAMES[int(d.argmin())]


# A pixel is "far" from the background when it is more than half the smallest distance between two palette
# colors away from the background's median: such a pixel cannot be a slightly-off shade of the background.
_GAPS = np.sqrt(((_PALETTE[:, None] - _PALETTE[None]) ** 2).sum(-1))  # (6, 6)
FAR_DISTANCE = float(_GAPS[_GAPS > 0].min()) / 2


def judge_colors(image) -> tuple[str | None, str]:
    """(foreground, background) color names of one image by the independent rule; foreground None when no pixel is
    far from the background. Background: nearest palette color to the median of the outermost pixel ring.
    Foreground: nearest palette color to the median of the pixels farther than FAR_DISTANCE from that median."""
    img = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)  # (H, W, 3)
    ring = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])  # (2W + 2H - 4, 3)
    bg_rgb = np.median(ring, axis=0)
    far = np.sqrt(((img - bg_rgb) ** 2).sum(-1)) > FAR_DISTANCE  # (H, W)
    fg = nearest_color(np.median(img[far], axis=0)) if far.any() else None
    return fg, nearest_color(bg_rgb)


def simple_color_prompts() -> list[tuple[str, str, str]]:
    """12 prompts "a <color> <shape> on a <color> background" (no size, no position): (prompt, fg, bg).

    Each palette color is the foreground twice and the background twice; the shapes cycle."""
    from .data import COLOR_NAMES, SHAPES

    out = []
    for i in range(12):
        fg, bg = COLOR_NAMES[i % 6], COLOR_NAMES[(i + 1 + i // 6) % 6]
        out.append((f"a {fg} {SHAPES[i % 4]} on a {bg} background", fg, bg))
    return out


def color_rule_evaluate(model, cfg: float = 5.0, seeds: tuple[int, ...] = (1, 2), steps: int = 20,
                        sampler: str = "euler") -> tuple[float, list[dict]]:
    """Generate the simple prompts once per seed (64x64, public pipeline) and judge them with `judge_colors`.
    Returns (fraction with both colors right, rows of prompt, seed, expected and judged colors)."""
    from sd.pipeline import GenerateParams, generate

    rows = []
    for prompt, fg, bg in simple_color_prompts():
        for seed in seeds:
            params = GenerateParams(prompt=prompt, negative_prompt="", width=64, height=64, steps=steps, cfg=cfg,
                                    seed=seed, sampler=sampler, schedule="normal", batch_size=1)
            image = generate(model, params).images[0]
            rows.append(dict(prompt=prompt, seed=seed, image=image, expected=(fg, bg), judged=judge_colors(image)))
    return sum(r["expected"] == r["judged"] for r in rows) / max(len(rows), 1), rows


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of a boolean (H, W) mask."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best, best_size, label = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        label += 1
        labels[y0, x0] = label
        queue, size = deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    queue.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best if best else np.zeros_like(mask)


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of (N, 2) points (Andrew's monotone chain, then the shoelace formula)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = np.array(lower[:-1] + upper[:-1], dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def classify_shape(extent: float, solidity: float) -> str:
    """Shape class from the blob's extent (area / bbox) and solidity (area / hull)."""
    if solidity < 0.78:
        return "star"
    if extent > 0.89:
        return "square"
    if extent > 0.64:
        return "circle"
    return "triangle"


def classify_position(cx: float, cy: float, size: int = 64) -> str:
    """Position name from the blob center: a corner needs both coordinates outside the middle band."""
    lo, hi = size * 25 / 64, size * 39 / 64
    horiz = "left" if cx < lo else "right" if cx > hi else ""
    vert = "top" if cy < lo else "bottom" if cy > hi else ""
    if horiz and vert:
        return f"{vert} {horiz}"
    if not horiz and not vert:
        return "center"
    return "off-center " + (vert or horiz)  # never a correct answer: the prompts name corners or center


def analyze(image) -> Analysis:
    """Measure one image (PIL image or (H, W, 3) uint8 array)."""
    img = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)
    h, w, _ = img.shape
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                             img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background = nearest_color(bg_rgb)
    dist = np.sqrt(((img - bg_rgb) ** 2).sum(-1))  # (H, W)
    blob = _largest_component(dist > FG_DISTANCE)
    area = int(blob.sum())
    if area < 12:
        return Analysis(background, None, None, None, area, 0.0, 0.0, -1.0, -1.0)
    ys, xs = np.nonzero(blob)
    # core pixels: blob pixels whose 4 neighbours are in the blob too (skip anti-aliased edges)
    pad = np.pad(blob, 1)
    core = blob & pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    pixels = img[core] if core.sum() >= 4 else img[blob]
    color = nearest_color(np.median(pixels, axis=0))
    # areas measured on pixel squares: bbox and hull use pixel corners, so a filled square has extent 1
    bbox = float((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    hull = max(_hull_area(corners), 1.0)
    extent, solidity = area / bbox, min(area / hull, 1.0)
    # position from the bounding-box center (a triangle's centroid sits low in its box)
    cx, cy = float(xs.min() + xs.max() + 1) / 2, float(ys.min() + ys.max() + 1) / 2
    return Analysis(background, color, classify_shape(extent, solidity), classify_position(cx, cy, w),
                    area, extent, solidity, cx, cy)


def score(image, target: ShapeSpec, background: str) -> dict[str, bool]:
    """Which attributes of one image match its prompt: color, background, shape, position."""
    a = analyze(image)
    return {
        "color": a.color == target.color,
        "background": a.background == background,
        "shape": a.shape == target.shape,
        "position": a.position == target.position,
    }


def summarize(scores: list[dict[str, bool]]) -> dict[str, float]:
    """Fraction correct per attribute, plus "colors" = both foreground and background right."""
    n = max(len(scores), 1)
    out = {k: sum(s[k] for s in scores) / n for k in ("color", "background", "shape", "position")}
    out["colors"] = sum(s["color"] and s["background"] for s in scores) / n
    return out


def evaluate(model, cfg: float, count: int | None = None, seeds: tuple[int, ...] = (1,), steps: int = 20,
             sampler: str = "euler") -> tuple[dict[str, float], list[dict]]:
    """Generate every held-out prompt (the first `count`) once per seed through the public pipeline
    (`sd.pipeline.generate`, 64x64) and score the images. Returns (summary, rows); each row holds the
    prompt, seed, image, analysis and per-attribute scores."""
    from sd.pipeline import GenerateParams, generate

    from .data import held_out_prompts

    rows = []
    for prompt, target, background in held_out_prompts(count):
        for seed in seeds:
            params = GenerateParams(prompt=prompt, negative_prompt="", width=64, height=64, steps=steps, cfg=cfg,
                                    seed=seed, sampler=sampler, schedule="normal", batch_size=1)
            image = generate(model, params).images[0]
            rows.append(dict(prompt=prompt, seed=seed, image=image, analysis=analyze(image),
                             score=score(image, target, background)))
    return summarize([r["score"] for r in rows]), rows
