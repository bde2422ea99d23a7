"""Comparison grids (AUTOMATIC1111's X/Y/Z plot, `scripts/xyz_grid.py`, and more): one request varied along up to
three axes, every cell a plain `sd.pipeline.generate` run, drawn as one labelled image.

Axes (`AXES`): sampler, schedule, steps, cfg, seed, checkpoint (each at its own default size unless the size is
given), sdxl_original_size / sdxl_target_size (WIDTHxHEIGHT) and sdxl_crop (LEFTxTOP, the crop's x and y), shift
(SD3's flow shift), lora (the weight of every `<lora:NAME:w>` tag of the prompt) and prompt (A1111's "Prompt S/R":
the first value is searched for in the prompt and negative prompt, every value replaces it, the first included).
Values are written as A1111 does: comma lists (csv quoting allowed), integer ranges "1-5", "1-10 (+2)", "10-1 (-3)",
"1-10 [4]" (4 values spread evenly), the same with decimals for the number axes. One deviation: a range without a
step that runs down ("10-1") counts down by 1 (A1111 gives no values for it).

`run_grid` plans every cell first (every value checked: a bad one is a one-line ValueError before anything runs),
refuses a grid of more than MAX_UNCONFIRMED cells unless confirmed, then runs the cells grouped by checkpoint (each
checkpoint loaded once, through the caller's loader: the app's and the CLI's ModelCache), reports one progress over
the whole grid's steps, and checks `stop` between cells and between the steps of a cell: a stopped grid keeps the
cells done (a cell stopped half-way is dropped).
"""
from __future__ import annotations

import csv
import math
import re
import threading
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .pnginfo import build_parameters, num
from .samplers import DISPLAY_NAMES, sampler_from_display
from .schedules import SCHEDULE_DISPLAY_NAMES, SCHEDULES

MAX_UNCONFIRMED = 300   # a grid of more cells runs only when confirmed (app: a checkbox; CLI: --yes)
MAX_CELLS = 1000        # never more (the app's batch count x size tops out at 800 images)
MIN_CELL = 128          # grid cells are drawn at least this large (the cell PNGs keep their own size)


@dataclass(frozen=True)
class Axis:
    """One kind of axis: its name on the command line / API, its label in the grid, how its values parse."""

    name: str
    label: str
    kind: str        # "int", "float", "text", "size"
    help: str


AXES: dict[str, Axis] = {a.name: a for a in (
    Axis("sampler", "Sampler", "text", "sampler names (Euler, DPM++ 2M Karras, heun, ...)"),
    Axis("schedule", "Schedule type", "text", "schedules (Normal, Karras, exponential, ...)"),
    Axis("steps", "Steps", "int", "step counts"),
    Axis("cfg", "CFG Scale", "float", "CFG scales"),
    Axis("seed", "Seed", "int", "seeds"),
    Axis("checkpoint", "Checkpoint name", "text", "checkpoints (each at its own default size)"),
    Axis("sdxl_original_size", "Original size", "size", "SDXL original sizes WIDTHxHEIGHT"),
    Axis("sdxl_crop", "Crop", "size", "SDXL crop offsets LEFTxTOP"),
    Axis("sdxl_target_size", "Target size", "size", "SDXL target sizes WIDTHxHEIGHT"),
    Axis("shift", "Shift", "float", "SD3 flow shifts"),
    Axis("lora", "LoRA weight", "float", "weights of the prompt's <lora:NAME:w> tags"),
    Axis("prompt", "Prompt S/R", "text", "Prompt S/R: the first value is searched, each value replaces it"),
)}


# ----------------------------------------------------------------------------------------------------
# values, as A1111's xyz_grid parses them

_INT_RANGE = re.compile(r"^\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\(\s*([+-]\s*\d+)\s*\))?\s*$")
_INT_COUNT = re.compile(r"^\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)\s*\[\s*(\d+)\s*\]\s*$")
_F = r"[+-]?\s*\d+(?:\.\d*)?"
_FLOAT_RANGE = re.compile(rf"^\s*({_F})\s*-\s*({_F})(?:\s*\(\s*([+-]\s*\d+(?:\.\d*)?)\s*\))?\s*$")
_FLOAT_COUNT = re.compile(rf"^\s*({_F})\s*-\s*({_F})\s*\[\s*(\d+)\s*\]\s*$")
_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def _split(text: str) -> list[str]:
    """A1111: the values are one csv row (quotes keep commas); blanks dropped."""
    row = next(csv.reader([text], skipinitialspace=True), [])
    return [v.strip() for v in row if v.strip()]


def _n(s: str) -> str:
    return s.replace(" ", "")


def _range(start: float, end: float, step: float) -> list[float]:
    """start, start + step, ... up to end inclusive (either direction); a step of the wrong sign gives [start]."""
    if step == 0:
        raise ValueError("a range step of 0 never ends")
    n = math.floor((end - start) / step + 1e-9)
    return [start + k * step for k in range(max(0, n) + 1)]


def parse_values(axis: Axis, text: str) -> list:
    """The values of one axis from A1111's notation; ValueError naming the bad value."""
    out: list = []
    for v in _split(text):
        if axis.kind == "int":
            m, c = _INT_RANGE.match(v), _INT_COUNT.match(v)
            if c:
                a, b, k = int(_n(c[1])), int(_n(c[2])), int(c[3])
                out += [int(x) for x in np.linspace(a, b, k)]
            elif m:
                a, b = int(_n(m[1])), int(_n(m[2]))
                step = int(_n(m[3])) if m[3] else (1 if b >= a else -1)
                out += [int(x) for x in _range(a, b, step)]
            else:
                try:
                    out.append(int(v))
                except ValueError:
                    raise ValueError(f"{axis.name}={text}: {v!r} is not a whole number or a range like 1-5, "
                                     "1-10 (+2), 1-10 [4]") from None
        elif axis.kind == "float":
            m, c = _FLOAT_RANGE.match(v), _FLOAT_COUNT.match(v)
            if c:
                a, b, k = float(_n(c[1])), float(_n(c[2])), int(c[3])
                out += [round(float(x), 10) for x in np.linspace(a, b, k)]
            elif m:
                a, b = float(_n(m[1])), float(_n(m[2]))
                step = float(_n(m[3])) if m[3] else (1.0 if b >= a else -1.0)
                out += [round(x, 10) for x in _range(a, b, step)]
            else:
                try:
                    x = float(v)
                except ValueError:
                    x = float("nan")
                if not math.isfinite(x):
                    raise ValueError(f"{axis.name}={text}: {v!r} is not a number or a range like 1-5, "
                                     "1.5-3 (+0.5), 1-2 [5]")
                out.append(x)
        elif axis.kind == "size":
            m = _SIZE.match(v)
            if not m:
                raise ValueError(f"{axis.name}={text}: {v!r} is not a size like 1024x768")
            out.append((int(m[1]), int(m[2])))
        else:
            out.append(v)
    if not out:
        raise ValueError(f"{axis.name}: no values given")
    return out


def value_text(axis: Axis, v) -> str:
    """How a value is written in the grid's labels."""
    if axis.name == "sampler":
        s, sched = v
        return DISPLAY_NAMES[s] + (f" {SCHEDULE_DISPLAY_NAMES[sched]}" if sched else "")
    if axis.name == "schedule":
        return SCHEDULE_DISPLAY_NAMES[v]
    if axis.kind == "size":
        return f"{v[0]}x{v[1]}"
    if axis.kind in ("int", "float"):
        return num(v)
    return str(v)


@dataclass
class GridAxis:
    """An axis of one grid: its kind and its parsed values (sampler values are (sampler, schedule or None))."""

    axis: Axis
    values: list
    source: str = ""     # as given

    @property
    def labels(self) -> list[str]:
        return [f"{self.axis.label}: {value_text(self.axis, v)}" for v in self.values]


def parse_axis(spec: str) -> GridAxis:
    """"name=values" (as the CLI's --x/--y/--z) -> GridAxis; ValueError for an unknown name or a bad value."""
    name, sep, text = str(spec).partition("=")
    return make_axis(name.strip(), text if sep else "")


def make_axis(name: str, text: str) -> GridAxis:
    """An axis from its name and its values text (A1111 notation)."""
    axis = AXES.get(name.strip().lower().replace(" ", "_").replace("-", "_"))
    if axis is None:
        raise ValueError(f"unknown grid axis {name!r}; choose one of {', '.join(AXES)} (written NAME=VALUES)")
    values = parse_values(axis, text)
    if axis.name == "sampler":
        values = [sampler_from_display(v) for v in values]
    elif axis.name == "schedule":
        by_label = {v.lower(): k for k, v in SCHEDULE_DISPLAY_NAMES.items()}
        bad = [v for v in values if v not in SCHEDULES and v.lower() not in by_label]
        if bad:
            raise ValueError(f"schedule={text}: unknown schedule {bad[0]!r}; choose from "
                             f"{', '.join(SCHEDULE_DISPLAY_NAMES.values())}")
        values = [v if v in SCHEDULES else by_label[v.lower()] for v in values]
    return GridAxis(axis, values, text)


# ----------------------------------------------------------------------------------------------------
# cells

_LORA_TAG = re.compile(r"<lora:([^:>]+)((?::[^>]*)?)>")


def _set_lora_weight(prompt: str, w: float) -> str:
    if not _LORA_TAG.search(prompt):
        raise ValueError("the lora axis sets the weight of the prompt's <lora:NAME:w> tags, and the prompt has none")
    return _LORA_TAG.sub(lambda m: f"<lora:{m[1]}:{num(w)}>", prompt)


def apply_value(p, axis: GridAxis, v, search: str | None = None):
    """The request `p` (GenerateParams) with one axis value set. SDXL sizes are given WIDTHxHEIGHT (crop LEFTxTOP)
    and stored (height, width) / (top, left) as GenerateParams keeps them."""
    name = axis.axis.name
    if name == "sampler":
        s, sched = v
        return replace(p, sampler=s, schedule=sched or p.schedule)
    if name in ("schedule", "steps", "cfg", "seed"):
        return replace(p, **{name: v})
    if name in ("sdxl_original_size", "sdxl_target_size", "sdxl_crop"):
        return replace(p, **{name: (v[1], v[0])})
    if name == "shift":
        return replace(p, inputs={**(p.inputs or {}), "shift": v})
    if name == "lora":
        return replace(p, prompt=_set_lora_weight(p.prompt, v))
    if name == "prompt":
        return replace(p, prompt=p.prompt.replace(search, v), negative_prompt=p.negative_prompt.replace(search, v))
    return p   # checkpoint: chosen by the cell, not a request field


@dataclass
class Cell:
    """One cell: where it is, the checkpoint value it uses (None: the grid's), its request, and once run its
    image and infotext."""

    index: tuple[int, int, int]          # (x, y, z)
    checkpoint: str | None
    params: object                       # GenerateParams
    image: Image.Image | None = None
    infotext: str = ""


@dataclass
class GridResult:
    cells: list[Cell]                    # the cells run, in the order they ran
    axes: list[GridAxis | None]          # x, y, z (None: not used)
    image: Image.Image | None = None     # the labelled grid (every z grid, stacked)
    stopped: bool = False
    total: int = 0                       # cells planned
    notes: list[str] = field(default_factory=list)


def plan_cells(base, axes: list[GridAxis | None]) -> list[Cell]:
    """Every cell's request in x-fastest order (z, then y, then x); checks the Prompt S/R search and the lora tags
    first. The size is the request's; a checkpoint axis's cells get theirs when the checkpoint is loaded."""
    x, y, z = (list(axes) + [None, None, None])[:3]
    searches = {}
    for a in (x, y, z):
        if a is not None and a.axis.name == "prompt":
            s = a.values[0]
            if s not in base.prompt and s not in base.negative_prompt:
                raise ValueError(f"Prompt S/R: {s!r} (the first value) is not in the prompt or the negative prompt")
            searches[id(a)] = s
    dims = [len(a.values) if a is not None else 1 for a in (x, y, z)]
    total = dims[0] * dims[1] * dims[2]
    if total > MAX_CELLS:
        raise ValueError(f"this grid has {total} cells; at most {MAX_CELLS} are run")
    cells = []
    for iz in range(dims[2]):
        for iy in range(dims[1]):
            for ix in range(dims[0]):
                p, ckpt = base, None
                for a, i in ((x, ix), (y, iy), (z, iz)):
                    if a is None:
                        continue
                    if a.axis.name == "checkpoint":
                        ckpt = a.values[i]
                    else:
                        p = apply_value(p, a, a.values[i], searches.get(id(a)))
                cells.append(Cell((ix, iy, iz), ckpt, p))
    return cells


def cell_infotext(model, p, res) -> str:
    """The cell's `parameters` text (A1111 infotext), as the app writes it for a single image."""
    return build_parameters(
        prompt=p.prompt, negative_prompt=p.negative_prompt, steps=p.steps, sampler=p.sampler, schedule=p.schedule,
        cfg=p.cfg, seed=p.seed, width=p.width, height=p.height, model_name=model.name, model_hash=model.short_hash,
        family=model.spec.family, clip_skip=p.clip_skip, inputs=p.inputs, extra_fields=res.info.get("infotext"),
        sdxl_original_size=p.sdxl_original_size, sdxl_crop=p.sdxl_crop, sdxl_target_size=p.sdxl_target_size,
        aesthetic_score=p.aesthetic_score, negative_aesthetic_score=p.negative_aesthetic_score)


def run_grid(base, axes: list[GridAxis | None], load: Callable[[str | None], object], *,
             size_of: Callable[[object], tuple[int, int]] | None = None, confirm: bool = False,
             progress: Callable[[int, int, str], None] | None = None,
             on_cell: Callable[[Cell, int, int], None] | None = None,
             stop: threading.Event | Callable[[], bool] | None = None) -> GridResult:
    """Run a grid. `base`: the GenerateParams every cell starts from; `axes`: [x, y, z] (None or missing: unused).
    `load(value)`: the LoadedModel of a checkpoint axis value (None: the grid's own checkpoint); called once per
    checkpoint, cells grouped by it. `size_of(model)`: (width, height) for a checkpoint's cells (None: the base
    request's size). `progress(done_steps, total_steps, text)`: one progress over the grid; `on_cell(cell, done,
    total)` after each cell; `stop`: checked between cells and steps (the cell it stops is dropped). More than
    MAX_UNCONFIRMED cells need `confirm`."""
    from .pipeline import check_params, generate

    axes = (list(axes) + [None, None, None])[:3]
    cells = plan_cells(base, axes)
    n = len(cells)
    if n > MAX_UNCONFIRMED and not confirm:
        raise ValueError(f"this grid has {n} cells, over the {MAX_UNCONFIRMED} that run without asking: confirm it "
                         "(app: tick 'run a grid over 300 cells'; CLI: --yes)")
    stopped = (stop.is_set if isinstance(stop, threading.Event) else stop) or (lambda: False)
    order = sorted(range(n), key=lambda i: _first_index(cells, cells[i].checkpoint))   # grouped by checkpoint
    models: dict[str | None, object] = {}
    total_steps = sum(c.params.steps for c in cells)
    done_steps = 0
    result = GridResult([], axes, total=n)
    for k, i in enumerate(order):
        if stopped():
            result.stopped = True
            break
        cell = cells[i]
        if cell.checkpoint not in models:
            models.clear()                                   # the previous group is done: one model held at a time
            model = load(cell.checkpoint)
            models[cell.checkpoint] = model
            group = [c for c in cells if c.checkpoint == cell.checkpoint]
            for c in group:                                   # the checkpoint's size, then every request checked
                if size_of is not None and cell.checkpoint is not None:
                    w, h = size_of(model)
                    c.params = replace(c.params, width=w, height=h)
                check_params(model.spec, c.params)
        model = models[cell.checkpoint]
        base_done = done_steps

        def on_step(info: dict, base_done=base_done, k=k) -> None:
            if progress is not None:
                progress(base_done + info["step"] + 1, total_steps, f"cell {k + 1}/{n}, step {info['step'] + 1}"
                         f"/{info['total']}")

        res = generate(model, cell.params, callback=on_step, stop=stop)
        if res.stopped:                                       # stopped inside this cell: it is not kept
            result.stopped = True
            break
        done_steps += cell.params.steps
        cell.image, cell.infotext = res.images[0], cell_infotext(model, cell.params, res)
        for note in res.info.get("notes", []):
            if note not in result.notes:
                result.notes.append(note)
        result.cells.append(cell)
        if on_cell is not None:
            on_cell(cell, k + 1, n)
    result.image = grid_image(result)
    return result


def _first_index(cells: list[Cell], ckpt) -> int:
    return next(i for i, c in enumerate(cells) if c.checkpoint == ckpt)


# ----------------------------------------------------------------------------------------------------
# the picture


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:   # Pillow without FreeType
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """Words of `text` in lines no wider than `width` pixels (a word longer than that gets its own line)."""
    lines, cur = [], ""
    for word in text.split(" "):
        trial = f"{cur} {word}".strip()
        if cur and draw.textlength(trial, font=font) > width:
            lines.append(cur)
            cur = word
        else:
            cur = trial
    return lines + ([cur] if cur else [])


def draw_grid(images: list[list[Image.Image | None]], x_labels: list[str], y_labels: list[str],
              title: str = "") -> Image.Image:
    """One labelled grid: images[row][col] (None: a cell not run, left blank), column labels on top, row labels on
    the left, an optional title above. Cells of different sizes are fitted into the largest cell's box; cells with a
    side under MIN_CELL pixels are drawn enlarged (nearest neighbour, a whole factor)."""
    cw = max((im.width for row in images for im in row if im is not None), default=64)
    ch = max((im.height for row in images for im in row if im is not None), default=64)
    up = -(-MIN_CELL // min(cw, ch))          # small cells (the demo's 64 px) are shown larger, by a whole factor
    cw, ch = cw * up, ch * up
    fs = max(12, min(cw, ch) // 10)
    font = _font(fs)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = fs + 4
    pad = 6
    left = 0 if not any(y_labels) else min(max(int(probe.textlength(t, font=font)) for t in y_labels) + 2 * pad,
                                           max(cw, 160))
    col_lines = [_wrap(probe, t, font, cw - 2) for t in x_labels] if any(x_labels) else [[]]
    top = max(len(c) for c in col_lines) * line + (2 * pad if any(x_labels) else 0)
    title_h = (len(_wrap(probe, title, font, left + cw * len(images[0]))) * line + pad) if title else 0
    cols, rows = len(images[0]), len(images)
    out = Image.new("RGB", (left + cols * cw, title_h + top + rows * ch), "white")
    d = ImageDraw.Draw(out)
    if title:
        for j, t in enumerate(_wrap(d, title, font, out.width - 2 * pad)):
            d.text((pad, pad // 2 + j * line), t, fill="black", font=font)
    for c, lines in enumerate(col_lines):
        for j, t in enumerate(lines):
            x = left + c * cw + (cw - d.textlength(t, font=font)) / 2
            d.text((x, title_h + pad + j * line), t, fill="black", font=font)
    for r, t in enumerate(y_labels):
        lines = _wrap(d, t, font, left - 2 * pad) if left else []
        y0 = title_h + top + r * ch + (ch - len(lines) * line) / 2
        for j, s in enumerate(lines):
            d.text((pad, y0 + j * line), s, fill="black", font=font)
    for r, row in enumerate(images):
        for c, im in enumerate(row):
            if im is None:
                continue
            k = min(cw / im.width, ch / im.height)
            fit = im if k == 1 else im.resize((max(1, round(im.width * k)), max(1, round(im.height * k))),
                                              Image.NEAREST if k == int(k) else Image.LANCZOS)
            out.paste(fit.convert("RGB"), (left + c * cw + (cw - fit.width) // 2,
                                           title_h + top + r * ch + (ch - fit.height) // 2))
    return out


def grid_image(result: GridResult) -> Image.Image | None:
    """The grid of every z value (each through `draw_grid`, titled with its z label), stacked top to bottom."""
    if not result.cells:
        return None
    x, y, z = result.axes
    nx, ny, nz = (len(a.values) if a is not None else 1 for a in (x, y, z))
    by = {c.index: c.image for c in result.cells}
    parts = []
    for iz in range(nz):
        images = [[by.get((ix, iy, iz)) for ix in range(nx)] for iy in range(ny)]
        parts.append(draw_grid(images, x.labels if x is not None else [""] * nx,
                               y.labels if y is not None else [""] * ny, z.labels[iz] if z is not None else ""))
    if len(parts) == 1:
        return parts[0]
    out = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts)), "white")
    top = 0
    for p in parts:
        out.paste(p, (0, top))
        top += p.height
    return out


def save_grid(result: GridResult, folder) -> dict:
    """grid.png (its `parameters` text names the axes) and one cell-X-Y-Z.png per cell with its own infotext.
    Returns {"grid": path, "cells": [paths]}."""
    from pathlib import Path

    from PIL.PngImagePlugin import PngInfo

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for c in result.cells:
        info = PngInfo()
        info.add_text("parameters", c.infotext)
        path = out / f"cell-{c.index[0]}-{c.index[1]}-{c.index[2]}.png"
        c.image.save(path, pnginfo=info)
        paths.append(str(path))
    grid = None
    if result.image is not None:
        info = PngInfo()
        info.add_text("parameters", "Grid: " + "; ".join(f"{n} = {a.axis.name}={a.source}" for n, a in
                                                        zip("XYZ", result.axes) if a is not None))
        grid = out / "grid.png"
        result.image.save(grid, pnginfo=info)
    return {"grid": str(grid) if grid else None, "cells": paths}


# ----------------------------------------------------------------------------------------------------
# command line: python -m sd grid --x sampler=euler,heun --y cfg=3,7 [--z ...] --prompt ... --out DIR


def add_parser(sub) -> None:
    """The `grid` sub-command of `python -m sd`."""
    g = sub.add_parser("grid", help="an X/Y/Z comparison grid (A1111's X/Y/Z plot)",
                       description="Axes: " + "; ".join(f"{a.name} ({a.help})" for a in AXES.values())
                       + ". Values: comma lists, 1-5, 1-10 (+2), 1-10 [4].")
    g.add_argument("--x", required=True, metavar="NAME=VALUES", help="the columns, e.g. sampler=euler,heun")
    g.add_argument("--y", default=None, metavar="NAME=VALUES", help="the rows, e.g. cfg=3,7")
    g.add_argument("--z", default=None, metavar="NAME=VALUES", help="one grid per value, stacked")
    g.add_argument("--checkpoint", default=None, help="a .safetensors/.ckpt file (default: the built-in demo model); "
                   "a checkpoint axis takes files too, and 'demo'")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--width", type=int, default=None, help="default: each checkpoint's own size")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--cfg", type=float, default=7.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--sampler", default="euler")
    g.add_argument("--schedule", default="normal")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    g.add_argument("--models-dir", default=None, metavar="DIR", help="its LoRA and embeddings folders are searched")
    g.add_argument("--loras-dir", default=None, metavar="DIR")
    g.add_argument("--yes", action="store_true", help=f"run a grid of more than {MAX_UNCONFIRMED} cells")
    g.add_argument("--out", default="outputs/grid", metavar="DIR", help="grid.png and one PNG per cell")
    g.set_defaults(func=cmd_grid)


def _checkpoint_file(value: str | None, default):
    from pathlib import Path

    from .checkpoint import CheckpointError
    from .demo import DEMO_CHECKPOINT

    if value is None:
        return default
    if value.lower() == "demo":
        return DEMO_CHECKPOINT
    if not Path(value).is_file():
        raise CheckpointError(f"checkpoint={value}: no such file; give checkpoint files (or demo)")
    return Path(value)


def cmd_grid(args) -> int:
    import json
    import sys

    from .demo import DEMO_CHECKPOINT
    from .pipeline import GenerateParams, ModelCache, default_size
    from .samplers import sampler_from_display

    axes = [parse_axis(a) if a else None for a in (args.x, args.y, args.z)]
    names = [a.axis.name for a in axes if a is not None]
    if len(set(names)) != len(names):
        raise ValueError(f"an axis is given twice ({', '.join(names)}); use each at most once")
    base_file = _checkpoint_file(args.checkpoint, DEMO_CHECKPOINT)
    for a in axes:
        if a is not None and a.axis.name == "checkpoint":
            for v in a.values:
                _checkpoint_file(v, base_file)
    sampler, sched = sampler_from_display(args.sampler)
    cache = ModelCache()
    load = lambda v: cache.get(_checkpoint_file(v, base_file), args.device, args.dtype)  # noqa: E731

    def own_size(model) -> tuple[int, int]:
        side = default_size(model.spec, is_demo=model.path.resolve() == DEMO_CHECKPOINT.resolve())
        return args.width or side, args.height or side

    w, h = own_size(load(None))
    base = GenerateParams(prompt=args.prompt, negative_prompt=args.negative_prompt, width=w, height=h,
                          steps=args.steps, cfg=args.cfg, seed=args.seed, sampler=sampler,
                          schedule=sched or args.schedule, models_dir=args.models_dir, loras_dir=args.loras_dir)

    def progress(done: int, total: int, text: str) -> None:
        print(f"\r{text} ({done}/{total} steps)", end="", file=sys.stderr, flush=True)

    result = run_grid(base, axes, load, size_of=own_size, confirm=args.yes, progress=progress)
    print(file=sys.stderr)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    saved = save_grid(result, args.out)
    print(json.dumps({**saved, "cells_planned": result.total, "stopped": result.stopped}))
    return 0
